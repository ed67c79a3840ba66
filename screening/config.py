"""Typed settings for the worker, read from the ``[screening]`` table of ``config.toml``."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from screening.renderer import ReportPriority
from training.api import (
    ConfigError,
    StrictSettings,
    format_validation_error,
    parse_training_config,
    read_toml,
    resolve_paths,
)

# Why half precision is float16 only: with model v2 on real photos, bfloat16 (8 mantissa bits) moved the DR, DME and
# referable probabilities by up to 0.03 from float32 and turned one referral over at the threshold; float16
# (11 bits) stayed within 0.003 (8 photos, 2026-11-30).
BFLOAT16_REFUSED = ("it moved probabilities by up to 0.03 from float32 and changed a referral on real photos; "
                    "use 'float16' (within 0.003) or 'float32'")

# Each may end in a field number, ``_1`` ... ``_99``, as cameras number the fields of one eye and visit
# (``A1234_OD_20251120_2.jpg``): the second field is another photo of the same eye, graded and shown beside the first.
# Eyes: L/R, LE/RE (UK clinics), OS/OD, left/right; dates: YYYYMMDD or YYYY-MM-DD (A1234_RE_2025-11-20.jpg).
DEFAULT_PATTERNS = (
    r"^(?P<patient>[A-Za-z]+\d+)_(?P<eye>L|R|LE|RE|OD|OS|left|right)(?:_\d{1,2})?$",
    r"^(?P<patient>[A-Za-z0-9-]+)_(?P<eye>L|R|LE|RE|OD|OS|left|right)_(?P<date>\d{8}|\d{4}-\d{2}-\d{2})(?:_\d{1,2})?$",
    # no eye in the name: the eye is read from the photo when it is clear enough (screening/checks.py), else refused
    r"^(?P<patient>[A-Za-z]+\d+)$",
    r"^(?P<patient>[A-Za-z0-9-]+)_(?P<date>\d{8}|\d{4}-\d{2}-\d{2})(?:_\d{1,2})?$",
)


def default_site() -> str:
    """This machine's short host name: where a worker without a ``site`` setting records its results."""
    name = re.sub(r"[^\w .-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "local"


class ScreeningSettings(StrictSettings):
    inbox: Path = Path("inbox")
    reports: Path = Path("reports")
    archive: Path = Path("archive")
    rejected: Path = Path("rejected")
    work_dir: Path = Path("work")
    database: str = "sqlite:///screening.db"
    checkpoint: Path = Path("models/baseline.pt")
    quality_model: Path = Path("models/quality.pt")  # gradability verdict (`dr-train fit-quality`)
    laterality_model: Path = Path("models/laterality.pt")  # eye from the photo (`dr-train fit-laterality`)
    # What an exam with an ungradable eye leads to: "recall" for new photos, or "refer" for an examination.
    ungradable_rule: Literal["recall", "refer"] = "recall"
    # "detect": photos may be upright or inverted (rotated 180 degrees, as some cameras and exports show them);
    # "upright": this site's cameras never invert, so the eye follows the optic disc's side alone.
    photo_orientation: Literal["detect", "upright"] = "detect"
    observer: Literal["native", "polling"] = "native"
    poll_interval: float = Field(1.0, gt=0)
    sweep_interval: float = Field(30.0, gt=0)
    stable_seconds: float = Field(2.0, ge=0)
    batch_size: int = Field(1, ge=1)
    threads: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # GPU only (device = "cuda"): autocast precision of the forward pass, and the GPU memory (GB) a batch may
    # use: the batch size is then derived from the model's measured memory per image, at most batch_size
    # when that is set too (screening/inference.py). The CPU always runs float32 with batch_size.
    precision: Literal["float32", "float16"] = "float32"
    gpu_memory_gb: float = Field(0.0, ge=0)
    filename_patterns: tuple[str, ...] = DEFAULT_PATTERNS
    report_retries: int = Field(3, ge=1)
    report_renderer: Literal["process", "inline"] = "process"
    # The render process's CPU priority (screening/renderer.py): "idle" takes only CPU nothing else wants (grading
    # first); "low" (niceness 10 above the worker's) and "normal" keep reports coming on a machine that other work
    # keeps busy.
    report_priority: ReportPriority = "idle"
    clinic_name: str = "Diabetic Eye Screening Service"
    # Hard limits on what a dropped file may cost, checked before it is decoded (over them: a recorded rejection).
    max_file_bytes: int = Field(256 * 1024 * 1024, gt=0)
    max_pixels: int = Field(50_000_000, gt=0)  # width x height, read from the header
    max_pages: int = Field(4, ge=1)  # pages (IFDs) of a TIFF, thumbnails included
    # A file whose image data stops short (still being copied, truncated, corrupt) stays in the inbox and is
    # read again when it changes; once unchanged this long it is rejected as incomplete or corrupt.
    incomplete_grace: float = Field(300.0, ge=0)
    # Several workers on one inbox and database (screening/claims.py): this worker's site, recorded on each
    # result (the audit counts per site: dr-screen audit --by-site), and how long a claim on a photo or on a
    # visit's report lasts unless renewed; a worker that dies releases its claims after this long.
    site: str = Field(default_factory=default_site, min_length=1, max_length=64, pattern=r"^[\w .-]+$")
    claim_lease_seconds: float = Field(60.0, ge=1)
    # Hidden and temporary names (.part, ~$, dotfiles, a sidecar without its photo) are left alone while they
    # are in use; unchanged this long, they are rejected with a reason so that nothing lies in the inbox unseen.
    abandoned_after: float = Field(3600.0, gt=0)
    # several photographs (fields) of one eye in a visit: which one gives the eye's result (all are shown)
    eye_result: Literal["worst", "latest"] = "worst"
    # the review page (dr-screen serve); any address but loopback requires a login
    review_host: str = "127.0.0.1"
    review_port: int = Field(8765, ge=1, le=65535)

    @field_validator("precision", mode="before")
    @classmethod
    def _no_bfloat16(cls, value: object) -> object:
        if value == "bfloat16":
            raise ValueError(f"precision = 'bfloat16' is not offered: {BFLOAT16_REFUSED}")
        return value

    @field_validator("precision", "gpu_memory_gb")
    @classmethod
    def _gpu_settings_need_cuda(cls, value: str | float, info: ValidationInfo) -> str | float:
        assert info.field_name is not None  # a field validator always has its field's name
        default = cls.model_fields[info.field_name].default
        if value != default and info.data.get("device") != "cuda":
            raise ValueError(f"{info.field_name} = {value!r} is for a GPU: set device = 'cuda' as well, or remove "
                             f"{info.field_name} (the CPU runs float32 with batch_size)")
        return value

    def gpu_batch_cap(self) -> int | None:
        """The most images per GPU forward when the batch is sized by ``gpu_memory_gb``: ``batch_size`` if the
        config sets it, else no cap of ours (None). Not used unless ``gpu_memory_gb`` is set."""
        return self.batch_size if "batch_size" in self.model_fields_set else None

    @field_validator("database")
    @classmethod
    def _database_url(cls, url: str) -> str:
        """SQLite (the default, nothing to install) or PostgreSQL through psycopg 3 (a project dependency);
        a bare ``postgresql://`` URL gets the psycopg driver rather than SQLAlchemy's default psycopg2."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError(
                f"{url!r} is not a usable database URL: use sqlite:///screening.db or "
                "postgresql+psycopg://user:password@host/dbname"
            ) from None
        backend, _, driver = parsed.drivername.partition("+")  # by name: loading an unknown dialect would raise
        if backend == "postgresql" and not driver:
            return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        if backend == "sqlite" or (backend == "postgresql" and driver == "psycopg"):
            return url
        raise ValueError(
            f"database {parsed.drivername!r} is not supported (not a usable database URL here): use sqlite:///... or "
            "postgresql+psycopg://..."
        )

    @field_validator("filename_patterns")
    @classmethod
    def _compile(cls, pats: tuple[str, ...]) -> tuple[str, ...]:
        for p in pats:
            try:
                rx = re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {exc}") from None
            if "patient" not in rx.groupindex:
                raise ValueError(f"pattern {p!r} has no (?P<patient>...) group")
        return pats

    @property
    def demo_checkpoint(self) -> Path:
        """Where a demo model is trained when ``checkpoint`` is missing (``dr-screen run``); reviewed reports
        look here too for the model that graded a visit."""
        return self.work_dir / "demo-model.pt"

    def resolved_database(self, base: Path) -> str:
        """A relative SQLite path in the URL resolves against the config folder too."""
        prefix = "sqlite:///"
        if self.database.startswith(prefix) and not self.database.startswith(prefix + "/"):
            rest = self.database[len(prefix):]
            if rest and rest != ":memory:":
                return prefix + str((base / rest).resolve())
        return self.database


def parse_screening_settings(raw: dict[str, Any], path: str | Path) -> ScreeningSettings:
    path = Path(path)
    try:
        s = ScreeningSettings.model_validate(raw.get("screening", {}))
    except ValidationError as exc:
        msg = format_validation_error(exc, path).replace("key '", "key 'screening.")
        raise ConfigError(msg) from None
    base = path.resolve().parent
    resolved: ScreeningSettings = resolve_paths(s, base)
    return resolved.model_copy(update={"database": resolved.resolved_database(base)})


def load_screening_settings(path: str | Path) -> ScreeningSettings:
    """Read ``config.toml`` once; the whole file is validated (training tables too) so typos anywhere fail."""
    raw = read_toml(path)
    parse_training_config(raw, path)
    return parse_screening_settings(raw, path)

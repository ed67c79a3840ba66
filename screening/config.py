"""Typed settings for the worker, read from the ``[screening]`` table of ``config.toml``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from training.api import (
    ConfigError,
    StrictSettings,
    format_validation_error,
    parse_training_config,
    read_toml,
    resolve_paths,
)

DEFAULT_PATTERNS = (
    r"^(?P<patient>[A-Za-z]+\d+)_(?P<eye>L|R|OD|OS|left|right)$",
    r"^(?P<patient>[A-Za-z0-9-]+)_(?P<eye>L|R|OD|OS|left|right)_(?P<date>\d{8})$",
    # no eye in the name: the eye is read from the photo when it is clear enough (screening/checks.py), else refused
    r"^(?P<patient>[A-Za-z]+\d+)$",
    r"^(?P<patient>[A-Za-z0-9-]+)_(?P<date>\d{8})$",
)


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
    filename_patterns: tuple[str, ...] = DEFAULT_PATTERNS
    report_retries: int = Field(3, ge=1)
    report_renderer: Literal["process", "inline"] = "process"
    clinic_name: str = "Diabetic Eye Screening Service"
    # Hard limits on what a dropped file may cost, checked before it is decoded (over them: a recorded rejection).
    max_file_bytes: int = Field(256 * 1024 * 1024, gt=0)
    max_pixels: int = Field(50_000_000, gt=0)  # width x height, read from the header
    max_pages: int = Field(4, ge=1)  # pages (IFDs) of a TIFF, thumbnails included
    # A file whose image data stops short (still being copied, truncated, corrupt) stays in the inbox and is
    # read again when it changes; once unchanged this long it is rejected as incomplete or corrupt.
    incomplete_grace: float = Field(300.0, ge=0)
    # Hidden and temporary names (.part, ~$, dotfiles, a sidecar without its photo) are left alone while they
    # are in use; unchanged this long, they are rejected with a reason so that nothing lies in the inbox unseen.
    abandoned_after: float = Field(3600.0, gt=0)
    # several photographs (fields) of one eye in a visit: which one gives the eye's result (all are shown)
    eye_result: Literal["worst", "latest"] = "worst"
    # the review page (dr-screen serve); any address but loopback requires a login
    review_host: str = "127.0.0.1"
    review_port: int = Field(8765, ge=1, le=65535)

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

"""Typed settings for the worker, read from the ``[screening]`` table of ``config.toml``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from training.config import ConfigError, _Strict, format_validation_error, read_toml, resolve_paths

DEFAULT_PATTERNS = (
    r"^(?P<patient>[A-Za-z]+\d+)_(?P<eye>L|R|OD|OS|left|right)$",
    r"^(?P<patient>[A-Za-z0-9-]+)_(?P<eye>L|R|OD|OS|left|right)_(?P<date>\d{8})$",
)


class ScreeningSettings(_Strict):
    inbox: Path = Path("inbox")
    reports: Path = Path("reports")
    archive: Path = Path("archive")
    rejected: Path = Path("rejected")
    work_dir: Path = Path("work")
    database: str = "sqlite:///screening.db"
    checkpoint: Path = Path("models/baseline.pt")
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
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    gpu_memory_gb: float = Field(0.0, ge=0)
    filename_patterns: tuple[str, ...] = DEFAULT_PATTERNS
    report_retries: int = Field(3, ge=1)
    report_renderer: Literal["process", "inline"] = "process"
    clinic_name: str = "Diabetic Eye Screening Service"

    @field_validator("precision", "gpu_memory_gb")
    @classmethod
    def _gpu_settings_need_cuda(cls, value: str | float, info: ValidationInfo) -> str | float:
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
                f"{url!r} is not a database URL: use sqlite:///screening.db or postgresql+psycopg://user:password@host/dbname"
            ) from None
        backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
        if backend == "postgresql" and "+" not in parsed.drivername:
            return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        if backend == "sqlite" or (backend == "postgresql" and driver == "psycopg"):
            return url
        raise ValueError(
            f"database {parsed.drivername!r} is not supported: use sqlite:///... or postgresql+psycopg://..."
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

    def resolved_database(self, base: Path) -> str:
        """A relative SQLite path in the URL resolves against the config folder too."""
        prefix = "sqlite:///"
        if self.database.startswith(prefix) and not self.database.startswith(prefix + "/"):
            rest = self.database[len(prefix):]
            if rest and rest != ":memory:":
                return prefix + str((base / rest).resolve())
        return self.database


def parse_screening_settings(raw: dict, path: str | Path) -> ScreeningSettings:
    path = Path(path)
    try:
        s = ScreeningSettings.model_validate(raw.get("screening", {}))
    except ValidationError as exc:
        msg = format_validation_error(exc, path).replace("key '", "key 'screening.")
        raise ConfigError(msg) from None
    base = path.resolve().parent
    s = resolve_paths(s, base)
    return s.model_copy(update={"database": s.resolved_database(base)})


def load_screening_settings(path: str | Path) -> ScreeningSettings:
    """Read ``config.toml`` once; the whole file is validated (training tables too) so typos anywhere fail."""
    from training.config import parse_training_config

    raw = read_toml(path)
    parse_training_config(raw, path)
    return parse_screening_settings(raw, path)

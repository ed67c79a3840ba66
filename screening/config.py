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

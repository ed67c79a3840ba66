"""Typed settings for data, model and training, parsed once from ``config.toml``.

The file is read with :mod:`tomllib` and validated with pydantic models that forbid unknown keys,
so a typo fails at start-up with the key and the file named. Relative paths resolve against the
folder holding the config file. The ``[screening]`` table belongs to the worker and is validated
there; this module only checks that it is a table.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message says where and why."""


class StrictSettings(BaseModel):
    """Settings that refuse unknown keys (a typo fails at start-up, naming the key) and stay as read.
    Public: the worker's ``[screening]`` table is validated the same way."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Strict(StrictSettings):
    """The base of the training settings below (a class, not an alias, so that type checkers see the fields)."""


class IdridSegmentationSource(_Strict):
    kind: Literal["idrid-segmentation"]
    path: Path
    subset: str = "a. Training Set"


class IdridGradingSource(_Strict):
    kind: Literal["idrid-grading"]
    path: Path
    subset: Literal["train", "test"] = "train"


class KaggleSource(_Strict):
    kind: Literal["kaggle"]
    path: Path
    splits: tuple[str, ...] = ("train", "valid", "test")


class ManifestSource(_Strict):
    kind: Literal["manifest"]
    path: Path
    # Column holding the DME label; srahim calls its binary flag "maculopathy".
    dme_column: str = "dme_grade"
    # True when the DME column is a binary present/absent flag, not IDRiD's 0/1/2 risk.
    dme_binary: bool = False
    # The source's name in per-source metrics, weights and --upright-source ("manifest:<name>"); default: the CSV's
    # folder. Two CSVs in folders of one name need names of their own.
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")

    @property
    def source_name(self) -> str:
        return f"manifest:{self.name or self.path.parent.name}"


Source = Annotated[
    Union[IdridSegmentationSource, IdridGradingSource, KaggleSource, ManifestSource],
    Field(discriminator="kind"),
]


def _multiple_of_32(v: int | None, info: ValidationInfo) -> int | None:
    if v is not None and v % 32:
        raise ValueError(f"{info.field_name} must be a multiple of 32 (the encoder downsamples 32x), got {v}")
    return v


def _empty_is_none(v: Any) -> Any:
    """An empty string in the TOML file means "not set"."""
    return None if v in ("", None) else v


class DataSettings(_Strict):
    sources: tuple[Source, ...] = ()
    cache_dir: Path = Path(".cache/preprocessed")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    split_seed: int = 13
    # Another config whose split this one keeps: its patients stay on the side they were on there (a model
    # initialised from a network trained on that split is then never evaluated on patients it trained on).
    pin_split: Path | None = None

    _no_pin_when_empty = field_validator("pin_split", mode="before")(_empty_is_none)

    @model_validator(mode="after")
    def _fractions(self) -> "DataSettings":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self

    @model_validator(mode="after")
    def _distinct_manifests(self) -> "DataSettings":
        """One manifest listed twice would fail later as every image 'listed by two sources'; two manifests of one
        source name (``manifest:<folder>``) were merged in per-source metrics, weights and ``--upright-source`` (an ML
        engineer's check): both are said here."""
        seen: dict[str, Path] = {}
        for source in self.sources:
            if not isinstance(source, ManifestSource):
                continue
            if source.path in seen.values():
                raise ValueError(f"the manifest {source.path} is listed twice in [data].sources: remove one")
            name = source.source_name
            if name in seen:
                raise ValueError(f"two manifest sources ({seen[name]} and {source.path}) would share the source name "
                                 f"'{name}' (taken from the folder): give each a name of its own (name = \"...\")")
            seen[name] = source.path
        return self


class ModelSettings(_Strict):
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet34"
    image_size: int = Field(512, ge=64, le=2048)
    pretrained_weights: Path | None = None
    decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    contrast: Literal["none", "local-mean"] = "none"
    # What the DR/DME heads read: the pooled encoder features, or those plus the lesion head's evidence (v2).
    grade_inputs: Literal["features", "features+lesions"] = "features"
    head_hidden: int = Field(256, ge=8)  # hidden units of the DR/DME heads (a grade-heads checkpoint records its own)

    _image_size_multiple_of_32 = field_validator("image_size")(_multiple_of_32)
    _no_weights_when_empty = field_validator("pretrained_weights", mode="before")(_empty_is_none)


class TrainSettings(_Strict):
    out_dir: Path = Path("runs/baseline")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(8, ge=1)
    lr_patience: int = Field(3, ge=0)
    seg_weight: float = Field(0.6, ge=0)
    cls_weight: float = Field(0.4, ge=0)
    dme_weight: float = Field(0.5, ge=0, le=1)
    balance_classes: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    target_sensitivity: float = Field(0.90, gt=0, le=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    balanced_sampling: bool = False  # draw images with weight 1/sqrt(frequency of their DR grade)
    # draw each image with weight (1 / its source's share) ** power: 0 = as the sources come, 0.5 = as the grading
    # stage weighs them (APTOS's 1,600 photos no longer drown IDRiD's 290), 1 = every source equally often
    source_weight_power: float = Field(0.0, ge=0.0, le=1.0)
    # Lesion stage (experiments/README.md E5): train on random crops of the image_size image, start from an
    # earlier checkpoint, train and validate on the lesion-annotated images only.
    crop_size: int | None = Field(None, ge=32)
    init_from: Path | None = None
    lesion_only: bool = False  # only lesion-annotated images; the DR/DME heads are left as they are
    samples_per_epoch: int | None = Field(None, ge=1)  # images drawn per epoch (default: the training split's size)
    # "bf16": training steps under bfloat16 autocast (about 2x faster on CPUs with AVX512-BF16 or AMX, and on
    # recent GPUs); validation and everything exported stay float32. Each epoch's row in history.json records it.
    precision: Literal["fp32", "bf16"] = "fp32"

    _crop_multiple_of_32 = field_validator("crop_size")(_multiple_of_32)
    _no_init_when_empty = field_validator("init_from", mode="before")(_empty_is_none)


class TrainingConfig(_Strict):
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    # Owned and validated by the screening package; kept opaque here.
    screening: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _crop_fits(self) -> "TrainingConfig":
        crop = self.train.crop_size
        if crop is not None and crop > self.model.image_size:
            raise ValueError(f"train.crop_size ({crop}) must not exceed model.image_size ({self.model.image_size})")
        return self


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into :class:`ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (pass --config or create it from the README)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def format_validation_error(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid settings"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}' (remove it or check its spelling)")
        else:
            lines.append(f"  key '{loc}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def resolve_paths(model: BaseModel, base: Path) -> Any:
    """Return a copy of a settings model with every relative Path made absolute against ``base``."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            updates[name] = value if value.is_absolute() else (base / value)
        elif isinstance(value, BaseModel):
            updates[name] = resolve_paths(value, base)
        elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
            updates[name] = tuple(resolve_paths(v, base) for v in value)
    return model.model_copy(update=updates)


def parse_training_config(raw: dict[str, Any], path: str | Path) -> TrainingConfig:
    path = Path(path)
    try:
        cfg = TrainingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from None
    resolved: TrainingConfig = resolve_paths(cfg, path.resolve().parent)
    return resolved


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read and validate ``config.toml``; the only place training reads its settings."""
    return parse_training_config(read_toml(path), path)

"""The public surface of ``training`` for code that uses a trained model: the screening worker, benchmarks.

``screening`` imports from here and from :mod:`training.common` (hashing, atomic writes, safe names, the
label vocabulary, the fundus threshold) and from nowhere else in ``training``
(``tests/screening/test_boundaries.py`` checks it). What is here, by area:

* **model**: :class:`MultiTaskNet` and its :class:`ModelConfig` / :class:`MultiTaskOutput`; :func:`lesion_evidence`
  (what v2 evidence heads read besides the features, held constant for Grad-CAM);
* **checkpoint**: :func:`load_model` (rebuild a model and its metadata from a checkpoint file),
  :class:`CheckpointError`; a checkpoint may carry the lesion-evidence grader (alone, or blended with the
  network's heads), applied with :func:`grades_with_grader` on :func:`features_of`, and its referral rule is
  :func:`referable_score`;
  :func:`train_demo_model` makes a synthetic-data checkpoint when no real one exists;
* **transforms**: the evaluation preset :func:`eval_transforms` and the preprocessing it expects
  (:func:`crop_square`, :func:`resize_square`; :func:`fundus_bbox`, the crop box it takes, which the worker keeps to
  map the model's masks back onto the original photo), :func:`fundus_mask`, :func:`channel_max`;
* **intake checks** (issue 13): the gradability verdict :func:`assess_quality` (with :class:`QualityVerdict`,
  :data:`REASONS`, :data:`REASON_TEXT`, :func:`load_quality_model`) and the eye read from the photo
  :func:`predict_laterality` (with :class:`LateralityPrediction`, :func:`load_laterality_model`); both model files
  raise :class:`CheckpointError` subclasses when missing or unusable;
* **device**: :func:`resolve_device`, without the training loop;
* **settings**: the config file is one TOML file for both packages; :func:`read_toml`,
  :func:`parse_training_config` (the worker validates the whole file), :class:`StrictSettings`,
  :func:`format_validation_error`, :func:`resolve_paths`, :class:`ConfigError`.

Anything else in ``training`` may change without notice to ``screening``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The settings need only pydantic: imported now. Everything else needs torch (seconds to import), so it is
# imported on first use (PEP 562): ``dr-screen audit``, ``init-db`` and the review commands that never touch a
# model start without torch, while ``from training.api import load_model`` works as before.
from training.config import (
    ConfigError,
    StrictSettings,
    format_validation_error,
    parse_training_config,
    read_toml,
    resolve_paths,
)
from training.labels import REASON_TEXT, REASONS  # the gradability reasons' words: no torch

if TYPE_CHECKING:
    from training.checkpoint import CheckpointError, load_model
    from training.data.transforms import (
        channel_max,
        crop_square,
        eval_transforms,
        fundus_bbox,
        fundus_mask,
        resize_square,
    )
    from training.device import resolve_device
    from training.grader import features_of, grades_with_grader, uses_segmentation
    from training.laterality import LateralityModelError, LateralityPrediction, load_laterality_model
    from training.laterality import predict as predict_laterality
    from training.metrics import calibrated_referable, referable_score
    from training.model import ModelConfig, MultiTaskNet, MultiTaskOutput, lesion_evidence
    from training.quality import QualityModelError, QualityVerdict, load_quality_model
    from training.quality import assess as assess_quality

# name here -> (module, name there); the two renamed ones are the laterality and quality entry points.
_LAZY = {
    "CheckpointError": ("training.checkpoint", "CheckpointError"), "load_model": ("training.checkpoint", "load_model"),
    **{n: ("training.data.transforms", n) for n in (
        "channel_max", "crop_square", "eval_transforms", "fundus_bbox", "fundus_mask", "resize_square")},
    "resolve_device": ("training.device", "resolve_device"),
    **{n: ("training.grader", n) for n in ("features_of", "grades_with_grader", "uses_segmentation")},
    **{n: ("training.laterality", n) for n in ("LateralityModelError", "LateralityPrediction", "load_laterality_model")},
    "predict_laterality": ("training.laterality", "predict"),
    **{n: ("training.metrics", n) for n in ("calibrated_referable", "referable_score")},
    **{n: ("training.model", n) for n in ("ModelConfig", "MultiTaskNet", "MultiTaskOutput", "lesion_evidence")},
    **{n: ("training.quality", n) for n in (
        "QualityModelError", "QualityVerdict", "load_quality_model")},
    "assess_quality": ("training.quality", "assess"),
}


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported when first asked for."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = where
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def train_demo_model(output: Path, work: Path, *, minutes: float = 3.0, progress: bool = True) -> Path:
    """Train a small model on synthetic images (about ``minutes``) and export it to ``output``; its
    provenance says "synthetic", so reports made with it carry the demo watermark. The training loop is
    imported only when this is called."""
    from training.demo import train_demo_model as train

    return train(output, work, minutes=minutes, progress=progress)


__all__ = [
    "REASONS", "REASON_TEXT", "CheckpointError", "ConfigError", "LateralityModelError", "LateralityPrediction",
    "ModelConfig", "MultiTaskNet", "MultiTaskOutput", "QualityModelError", "QualityVerdict", "StrictSettings",
    "assess_quality", "channel_max", "crop_square", "eval_transforms", "features_of", "grades_with_grader",
    "format_validation_error", "fundus_bbox", "fundus_mask", "lesion_evidence", "load_laterality_model", "load_model",
    "load_quality_model", "parse_training_config", "predict_laterality", "read_toml", "referable_score", "calibrated_referable",
    "resize_square", "resolve_device", "resolve_paths", "train_demo_model", "uses_segmentation",
]

"""Worker fixtures: a tiny random-init checkpoint, settings in tmp_path, synthetic fundus JPEGs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from screening.config import ScreeningSettings
from training.checkpoint import labels_dict, save_checkpoint
from training.model import ModelConfig, build_model


def make_checkpoint(path: Path, kind: str = "synthetic", image_size: int = 64, backbone: str = "resnet18",
                    grade_inputs: str = "features") -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, image_size=image_size, decoder_channels=(16, 16, 16, 8, 8), grade_inputs=grade_inputs)
    model = build_model(cfg)
    return save_checkpoint(path, {
        "model_state": model.state_dict(), "model_config": cfg.to_dict(), "labels": labels_dict(),
        "thresholds": {"referable": 0.5, "lesion": 0.5}, "provenance": {"kind": kind},
        "metrics": {"validation": {"val_kappa": 0.5, "val_ref_auc": 0.75}}, "model_version": f"test-{kind}-v1",
    })


def make_quality_model(path: Path, always: tuple[str, ...] = ()) -> Path:
    """A gradability model (training.quality's format) whose verdict does not depend on the photo: every reason
    in ``always`` is given (probability ~1), no other (~0). Worker tests then know what the verdict will be."""
    from training.quality import FEATURE_NAMES, REASONS, pack_model

    n = len(FEATURE_NAMES)
    model = pack_model(np.zeros(n), np.ones(n), [np.zeros((n, 1)), np.zeros((1, len(REASONS)))],
                       [np.zeros(1), np.array([10.0 if r in always else -10.0 for r in REASONS])],
                       {r: 0.5 for r in REASONS}, {}, {"kind": "test"})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def make_laterality_model(path: Path, confident: float = 0.999, side_gain: float = 1.0) -> Path:
    """A laterality model that takes photos as upright. By default it is never confident (side_gain 1: at most
    ~73 %), so the synthetic photos' random eyes never contradict their names; pass side_gain=20, confident=0.8 for
    one that reads the eye from the disc side."""
    from training.laterality import pack_model

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pack_model(side_gain, 0.0, 20.0, confident, {}, {"kind": "test"}), path)
    return path


def write_fundus(path: Path, seed: int = 0, size: int = 256, eye: str | None = None, dr_grade: int | None = None) -> Path:
    """A synthetic fundus JPEG; pass ``dr_grade=0`` where the optic disc must be found by brightness (the
    laterality checks): bright synthetic exudates can outshine it."""
    from training.data.synthetic import make_fundus

    f = make_fundus(np.random.default_rng(seed), size=size, eye=eye, dr_grade=dr_grade)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    """:func:`make_checkpoint` for tests that need a variant (test modules cannot import conftest)."""
    return make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo.pt")


@pytest.fixture(scope="session")
def intake_models(tmp_path_factory) -> dict[str, Path]:
    """Quality models (always gradable, always one reason) and laterality models (never / often confident)."""
    folder = tmp_path_factory.mktemp("intake-models")
    return {
        "gradable": make_quality_model(folder / "gradable.pt"),
        "blurred": make_quality_model(folder / "blurred.pt", ("blurred",)),
        "dark_blurred": make_quality_model(folder / "dark_blurred.pt", ("too_dark", "blurred")),
        "not_fundus": make_quality_model(folder / "not_fundus.pt", ("not_fundus",)),
        "unsure_eye": make_laterality_model(folder / "unsure.pt"),
        "sure_eye": make_laterality_model(folder / "sure.pt", confident=0.8, side_gain=20.0),
    }


@pytest.fixture
def settings(tmp_path, tiny_checkpoint, intake_models) -> ScreeningSettings:
    return ScreeningSettings(
        inbox=tmp_path / "inbox", reports=tmp_path / "reports", archive=tmp_path / "archive",
        rejected=tmp_path / "rejected", work_dir=tmp_path / "work", database=f"sqlite:///{tmp_path / 'db.sqlite'}",
        checkpoint=tiny_checkpoint, stable_seconds=0.1, poll_interval=0.1, sweep_interval=0.5, batch_size=4,
        threads=1, device="cpu", quality_model=intake_models["gradable"], laterality_model=intake_models["unsure_eye"],
    )

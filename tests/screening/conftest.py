"""Worker fixtures: a tiny random-init checkpoint, settings in tmp_path, synthetic fundus JPEGs, and a real
worker run over them (``worked``: results, pictures and draft PDFs on disk, for the review tests)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from screening.config import ScreeningSettings
from training.checkpoint import labels_dict, save_checkpoint
from training.model import ModelConfig, build_model

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


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


def write_fundus(path: Path, seed: int = 0, size: int = 256) -> Path:
    from training.data.synthetic import make_fundus

    f = make_fundus(np.random.default_rng(seed), size=size)
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


@pytest.fixture
def settings(tmp_path, tiny_checkpoint) -> ScreeningSettings:
    return ScreeningSettings(
        inbox=tmp_path / "inbox", reports=tmp_path / "reports", archive=tmp_path / "archive",
        rejected=tmp_path / "rejected", work_dir=tmp_path / "work", database=f"sqlite:///{tmp_path / 'db.sqlite'}",
        checkpoint=tiny_checkpoint, stable_seconds=0.1, poll_interval=0.1, sweep_interval=0.5, batch_size=4,
        threads=1, device="cpu",
    )


@dataclasses.dataclass
class Worked:
    settings: ScreeningSettings
    factory: sessionmaker[Session]
    exams: dict[str, int]  # patient code -> exam id


def run_worker(settings: ScreeningSettings, photos: dict[str, int]) -> Worked:
    """Grade ``photos`` (file name -> synthetic seed) with the tiny checkpoint; reports rendered inline."""
    from sqlalchemy import select

    from screening.db import init_db, make_engine, make_session_factory, session_scope
    from screening.db.models import Patient
    from screening.inference import Predictor
    from screening.pipeline import Worker

    settings = settings.model_copy(update={"report_renderer": "inline"})
    for name, seed in photos.items():
        write_fundus(settings.inbox / name, seed=seed)
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    with Worker(settings, Predictor(settings.checkpoint, "cpu", 1), factory, TEMPLATES) as worker:
        out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.failed) == (len(photos), 0)
    with session_scope(factory) as s:
        exams = {p.code: p.exams[0].id for p in s.scalars(select(Patient))}
    return Worked(settings, factory, exams)


@pytest.fixture
def worked(settings) -> Worked:
    """P1: both eyes, P2: right eye only, graded and reported by the real worker."""
    return run_worker(settings, {"P1_R.jpg": 1, "P1_L.jpg": 2, "P2_R.jpg": 3})

"""Tiny synthetic data sets and tiny-model configs for the training-loop, checkpoint and CLI tests.

Everything lives under pytest's tmp folders; models are resnet18 at 64 px with a thin decoder so
that a run of a few steps takes seconds on a shared CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import DataSettings, ManifestSource, ModelSettings, TrainingConfig, TrainSettings
from training.data.synthetic import write_synthetic_dataset

torch.set_num_threads(1)

TINY_MODEL = ModelSettings(backbone="resnet18", image_size=64, decoder_channels=(16, 16, 16, 8, 8), dropout=0.0)


def tiny_config(csv: Path, out_dir: Path, cache_dir: Path, **train: object) -> TrainingConfig:
    """A config for a tiny CPU run on the manifest ``csv``; ``train`` overrides TrainSettings fields."""
    settings = dict(out_dir=out_dir, epochs=1, batch_size=4, lr=1e-3, patience=5, lr_patience=2, seed=0,
                    device="cpu", max_steps_per_epoch=2, balance_classes=False)
    settings.update(train)
    return TrainingConfig(
        data=DataSettings(sources=(ManifestSource(kind="manifest", path=csv),), cache_dir=cache_dir,
                          val_fraction=0.25, test_fraction=0.25, split_seed=0),
        model=TINY_MODEL,
        train=TrainSettings(**settings),
    )


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic images (8 patients, DR grades balanced), 96 px, with lesion masks."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", 16, size=96, seed=0)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tiny_csv: Path, shared_cache: Path, tmp_path: Path):
    """``make_config(**train_overrides)`` -> a tiny TrainingConfig writing to ``tmp_path/run``."""

    def build(**train: object) -> TrainingConfig:
        train.setdefault("out_dir", tmp_path / "run")
        return tiny_config(tiny_csv, train.pop("out_dir"), shared_cache, **train)  # type: ignore[arg-type]

    return build


@pytest.fixture(scope="session")
def trained_run(tiny_csv: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingConfig, Path]:
    """One epoch of two steps with the tiny model; returns (config, out_dir holding best.pt/last.pt)."""
    from training.train import run_training

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_config(tiny_csv, out, shared_cache)
    run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    return cfg, out


@pytest.fixture(scope="session")
def tiny_config_factory():
    """:func:`tiny_config` for tests that build their own data (test modules cannot import conftest)."""
    return tiny_config

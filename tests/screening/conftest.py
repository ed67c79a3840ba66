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


@pytest.fixture
def small_fs():
    """Mount a small tmpfs over a folder (``small_fs(folder, size="1m", readonly=False)``), to make a full or
    read-only disk for real; unmounted afterwards. Needs root (CI runs as root); skipped with the reason
    otherwise. ``small_fs.remount(folder, readonly)`` flips a mounted one."""
    import os
    import subprocess

    mounted: list[Path] = []

    def mount(folder: Path, size: str = "1m", readonly: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a full or read-only file system is made by mounting a small tmpfs, which needs root")
        folder.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    def remount(folder: Path, readonly: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if readonly else 'rw'}", str(folder)], check=True)

    mount.remount = remount  # type: ignore[attr-defined]
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler

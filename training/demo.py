"""A small demo model trained on synthetic fundus images, so the product runs before a real model exists.

Every checkpoint made here has ``provenance.kind == "synthetic"``: the worker watermarks its
reports "demo model, not for clinical use".
"""

from __future__ import annotations

from pathlib import Path

from training.checkpoint import export_checkpoint
from training.config import DataSettings, ManifestSource, ModelSettings, TrainingConfig, TrainSettings
from training.data.synthetic import write_synthetic_dataset
from training.train import run_training


def demo_config(work: Path, image_size: int = 128, epochs: int = 30, seed: int = 0) -> TrainingConfig:
    csv = work / "data" / "labels.csv"
    return TrainingConfig(
        data=DataSettings(sources=(ManifestSource(kind="manifest", path=csv),), cache_dir=work / "cache",
                          val_fraction=0.2, test_fraction=0.0, split_seed=seed),
        model=ModelSettings(backbone="resnet18", image_size=image_size, decoder_channels=(64, 32, 32, 16, 16), dropout=0.1),
        train=TrainSettings(out_dir=work / "run", epochs=epochs, batch_size=8, lr=2e-3, patience=epochs, lr_patience=3,
                            seed=seed, device="cpu", balance_classes=False),
    )


def train_demo_model(
    output: Path, work: Path, minutes: float = 3.0, n_images: int = 200, image_size: int = 128, seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic data set under ``work``, train for about ``minutes`` and export to ``output``."""
    work = Path(work).resolve()
    cfg = demo_config(work, image_size, seed=seed)
    csv = cfg.data.sources[0].path
    if not csv.is_file():
        write_synthetic_dataset(csv.parent, n_images, size=256, seed=seed)
    run_training(cfg, kind="synthetic", resume=False, progress=progress, command="dr-train demo",
                 max_seconds=minutes * 60, log=print if progress else (lambda _msg: None))
    return export_checkpoint(cfg.train.out_dir / "best.pt", output, half=False)

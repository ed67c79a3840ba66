"""Learnability: the demo model, trained for about two minutes on CPU, beats chance on unseen synthetic images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from training.checkpoint import load_model
from training.config import ManifestSource
from training.data.cache import build_cache
from training.data.dataset import FundusDataset
from training.data.sources import load_manifest
from training.data.synthetic import write_synthetic_dataset
from training.data.transforms import eval_transforms
from training.demo import train_demo_model
from training.engine import predict
from training.metrics import classification_metrics, segmentation_metrics

# Epoch-bounded (seeded, so the same model every run whatever the CPU load); minutes is only a cap.
EPOCHS = 8
MAX_MINUTES = 6.0
# Measured on held-out data (lr 1e-3, AVX2 machine, the best epoch shipped then): after 8 epochs kappa 0.61,
# referable AUC 0.97, OD Dice 0.81 (after 14: 0.63, 0.96, 0.89, for 60 s more of the suite). On an AVX-512 machine
# the best-scoring epoch was the third, with OD Dice 0.000; the last epoch, which the demo now ships, 0.43, 0.96, 0.88.
# The run is seeded but not the same on every CPU type (float kernels differ), so the recipe must learn with margin.
# Chance is kappa 0, AUC 0.5, Dice ~0.
THRESHOLDS = {"kappa": 0.3, "ref_auc": 0.75, "od_dice": 0.45}


@pytest.mark.slow
def test_demo_model_learns_beyond_chance(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two cores shared with other work were ~10x slower
    try:
        started = time.perf_counter()
        path = train_demo_model(tmp_path / "demo.pt", tmp_path / "work", minutes=MAX_MINUTES, epochs=EPOCHS, progress=False)
        print(f"demo training took {time.perf_counter() - started:.0f}s")
        history = json.loads((tmp_path / "work" / "run" / "history.json").read_text())
        assert len(history) == EPOCHS, "the time cap cut training short: the machine is far slower than expected"

        model, meta = load_model(path)
        assert meta["provenance"]["kind"] == "synthetic"
        size = model.config.image_size
        # Held-out: a fresh synthetic set drawn with another seed, never seen in training or validation.
        held_csv = write_synthetic_dataset(tmp_path / "held-out", 60, size=256, seed=123)
        records = load_manifest(ManifestSource(kind="manifest", path=held_csv))
        build_cache(records, size, tmp_path / "held-cache", progress=False)
        loader = DataLoader(FundusDataset(records, size, tmp_path / "held-cache", eval_transforms(size)), batch_size=16)
        preds = predict(model, loader, torch.device("cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)

    cls = classification_metrics(preds.dr_probs, preds.dme_probs, preds.dr_true, preds.dme_true)
    seg = segmentation_metrics(preds.seg_probs, preds.seg_masks)
    kappa = cls["dr"].get("quadratic_kappa") or 0.0
    ref_auc = cls["referable"].get("auc") or 0.5
    od_dice = seg["OD"]["dice"]
    print(f"held-out: DR kappa {kappa:.3f}, referable AUC {ref_auc:.3f}, OD Dice {od_dice:.3f}")
    assert kappa > THRESHOLDS["kappa"] or ref_auc > THRESHOLDS["ref_auc"], (kappa, ref_auc)
    assert od_dice > THRESHOLDS["od_dice"], od_dice


"""Evaluate a checkpoint on a split of the configured data: metrics.json + plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from training.checkpoint import load_model
from training.config import TrainingConfig
from training.data.dataset import FundusDataset
from training.data.sources import load_all
from training.data.split import split_by_patient
from training.data.transforms import eval_transforms
from training.engine import predict, resolve_device
from training.evaluation import write_evaluation


def evaluate_checkpoint(
    cfg: TrainingConfig, checkpoint: Path, split: str = "val", out_dir: Path | None = None,
    tta: bool = False, bootstrap: int = 1000, progress: bool = True,
) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    model, meta = load_model(checkpoint, device)
    size = model.config.image_size
    sp = meta["provenance"].get("split", {})
    records = load_all(cfg.data)
    splits = split_by_patient(
        records, sp.get("val_fraction", cfg.data.val_fraction), sp.get("test_fraction", cfg.data.test_fraction),
        sp.get("seed", cfg.data.split_seed),
    )
    recs = splits[split]
    if not recs:
        raise ValueError(f"split {split!r} is empty; check [data] val_fraction/test_fraction")
    loader = DataLoader(FundusDataset(recs, size, cfg.data.cache_dir, eval_transforms(size, model.config.contrast)), batch_size=cfg.train.batch_size)
    preds = predict(model, loader, device, progress=progress, tta_flip=tta)
    out_dir = out_dir or checkpoint.parent / f"eval-{split}{'-tta' if tta else ''}"
    metrics = write_evaluation(
        out_dir, preds.dr_probs, preds.dme_probs, preds.dr_true, preds.dme_true,
        preds.seg_probs, preds.seg_masks, threshold=float(meta["thresholds"]["referable"]),
        target_sensitivity=float(meta["thresholds"].get("target_sensitivity", 0.9)), bootstrap=bootstrap,
    )
    seg = metrics.get("segmentation") or {}
    summary = {
        "checkpoint": str(checkpoint), "model_version": meta["model_version"], "split": split, "images": len(recs),
        "tta": tta, "images_per_s": round(preds.images_per_s, 2),
        "dr_kappa": metrics["dr"].get("quadratic_kappa"),
        "dr_kappa_ci95": metrics["dr"].get("quadratic_kappa_ci95"),
        "dr_accuracy": metrics["dr"].get("accuracy"),
        "referable": {k: v for k, v in metrics["referable"].items() if not k.endswith("_reason")},
        "lesion_aupr": {k: (v or {}).get("aupr") for k, v in seg.items()} if seg else None,
        "od_dice": (seg.get("OD") or {}).get("dice") if seg else None,
    }
    return {"summary": summary, "metrics": metrics, "out_dir": out_dir}

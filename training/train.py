"""From settings to a validated, self-describing checkpoint: data -> split -> cache -> loaders -> fit."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from training.checkpoint import file_sha256, git_commit, labels_dict, make_version, read_checkpoint
from training.config import ConfigError, TrainingConfig, TrainSettings
from training.data.cache import build_cache
from training.data.dataset import FundusDataset, class_counts
from training.data.records import Record, fingerprints
from training.data.sources import load_all
from training.data.split import configured_split
from training.data.transforms import eval_transforms, train_transforms
from training.engine import FitState, Predictions, fit, resolve_device, seed_everything
from training.evaluation import plot_history
from training.losses import MultiTaskLoss, inverse_frequency_weights
from training.metrics import choose_threshold, classification_metrics, referable_labels, referable_score, segmentation_metrics
from training.model import ModelConfig, MultiTaskNet, build_model


def model_config_from(cfg: TrainingConfig) -> ModelConfig:
    m = cfg.model
    return ModelConfig(backbone=m.backbone, image_size=m.image_size, decoder_channels=tuple(m.decoder_channels),
                       dropout=m.dropout, contrast=m.contrast, grade_inputs=m.grade_inputs,
                       head_hidden=m.head_hidden)


def data_summary(splits: dict[str, list[Record]]) -> dict[str, Any]:
    """What the model saw: counts per split, source, DR grade, DME label and mask availability."""
    out: dict[str, Any] = {}
    for name, recs in splits.items():
        out[name] = {
            "images": len(recs),
            "patients": len({r.patient_id for r in recs}),
            "by_source": dict(Counter(r.source for r in recs)),
            "dr_grades": {str(k): v for k, v in sorted(Counter(r.dr_grade for r in recs if r.has_grade).items())},
            "dme_labels": {str(k): v for k, v in sorted(Counter(r.dme_grade for r in recs if r.has_dme).items())},
            "with_masks": sum(r.has_masks for r in recs),
        }
    return out


def score_predictions(preds: Predictions) -> tuple[float, dict[str, float]]:
    """Model-selection score on validation: mean of DR kappa, referable AUC and mean lesion AUPR (those defined)."""
    cls = classification_metrics(preds.dr_probs, preds.dme_probs, preds.dr_true, preds.dme_true)
    metrics: dict[str, float] = {}
    if cls["dr"].get("quadratic_kappa") is not None:
        metrics["kappa"] = cls["dr"]["quadratic_kappa"]
    if cls["dr"].get("accuracy") is not None:
        metrics["dr_acc"] = cls["dr"]["accuracy"]
    if cls["referable"].get("auc") is not None:
        metrics["ref_auc"] = cls["referable"]["auc"]
    if preds.seg_probs is not None:
        seg = segmentation_metrics(preds.seg_probs, preds.seg_masks, max_pixels=400_000)
        auprs = {c: v["aupr"] for c, v in seg.items() if v is not None and v.get("aupr") is not None}
        for c, v in auprs.items():
            metrics[f"aupr_{c}"] = v
        if auprs:
            metrics["aupr_mean"] = float(np.mean(list(auprs.values())))
    parts = [metrics[k] for k in ("kappa", "ref_auc", "aupr_mean") if k in metrics]
    return (float(np.mean(parts)) if parts else -float(preds.losses.get("val_total", 0.0))), metrics


DEFAULT_THRESHOLD = 0.5


def threshold_basis(dr_true: Any, dme_true: Any) -> str | None:
    """Why the referral threshold cannot be chosen on these validation labels (None when it can): it needs referable
    and non-referable photos, and DR 0-1 without a DME grade is neither (a DR-only set such as APTOS's)."""
    y = referable_labels(np.asarray(dr_true), np.asarray(dme_true))
    known = set(y[y >= 0].tolist())
    if len(known) == 2:
        return None
    missing = "non-referable" if 1 in known else "referable" if 0 in known else "referable or non-referable"
    return (f"the validation split has no {missing} photo with a known answer (DR 0-1 counts as non-referable only "
            f"with a DME grade), so the referral threshold stays at {DEFAULT_THRESHOLD}, not chosen for the target "
            "sensitivity: add a source with DME grades or more validation patients")


def referral_threshold(preds: Predictions, target_sensitivity: float) -> float:
    if threshold_basis(preds.dr_true, preds.dme_true) is not None:
        return DEFAULT_THRESHOLD
    y = referable_labels(preds.dr_true, preds.dme_true)
    s = referable_score(preds.dr_probs, preds.dme_probs)
    return float(choose_threshold(y, s, target_sensitivity))


def init_weights(model: MultiTaskNet, path: Path) -> dict[str, Any]:
    """Start from the weights of an earlier checkpoint of the same architecture (the input size may differ).

    Returns what the new checkpoint records about that starting point (its provenance: what it was trained on).
    """
    ckpt = read_checkpoint(path)
    theirs, ours = dict(ckpt["model_config"]), model.config.to_dict()
    diff = [k for k in ours if k != "image_size" and theirs.get(k) != ours[k]]
    if diff:
        raise ValueError(f"train.init_from {path}: its model differs from [model] in {', '.join(diff)} "
                         f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}); use the same settings or drop init_from")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()})
    prov = ckpt.get("provenance", {})
    return {"checkpoint": str(path), "sha256": file_sha256(path), "model_version": ckpt.get("model_version"),
            **{k: prov[k] for k in ("command", "started", "git_commit", "data", "train_config", "init_from") if k in prov}}


class EpochSampler(WeightedRandomSampler):
    """Weighted sampling with replacement whose draws depend only on (seed, epoch), not on earlier epochs.

    Why: a resumed run must draw exactly the batches the uninterrupted run would have drawn; a generator
    that runs on from epoch to epoch would restart from the seed after an interruption.
    """

    def __init__(self, weights: list[float], num_samples: int, seed: int) -> None:
        self.seed = seed
        super().__init__(weights, num_samples=num_samples, replacement=True, generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        assert self.generator is not None
        self.generator.manual_seed(self.seed * 100_003 + epoch)


@dataclass
class TrainingData:
    splits: dict[str, list[Record]]
    train: DataLoader[dict[str, Any]]
    val: DataLoader[dict[str, Any]]


def make_loaders(cfg: TrainingConfig, records: list[Record] | None = None, progress: bool = True) -> TrainingData:
    records = load_all(cfg.data) if records is None else records
    if not records:
        raise ValueError("no training images: add sources under [data] in the config")
    splits = configured_split(cfg.data, records)
    if not splits["train"] or not splits["val"]:  # found before the cache is built and an epoch is spent
        raise ValueError(f"the split has {len(splits['train'])} training and {len(splits['val'])} validation images "
                         f"({len(records)} images of {len({r.patient_id for r in records})} patients, val_fraction "
                         f"{cfg.data.val_fraction}): both need patients; add images or change [data] val_fraction")
    size = cfg.model.image_size
    build_cache(records, size, cfg.data.cache_dir, progress=progress)
    contrast = cfg.model.contrast
    train_recs, val_recs = splits["train"], splits["val"]
    if cfg.train.lesion_only:  # the split stays the one of all sources: same patients on the same side
        train_recs, val_recs = [r for r in train_recs if r.has_masks], [r for r in val_recs if r.has_masks]
        if not train_recs or not val_recs:
            raise ValueError("train.lesion_only: the training and validation splits need lesion-annotated images "
                             f"(got {len(train_recs)} and {len(val_recs)}); add an idrid-segmentation source")
    train_ds = FundusDataset(train_recs, size, cfg.data.cache_dir,
                             train_transforms(size, seed=cfg.train.seed, contrast=contrast, crop=cfg.train.crop_size))
    val_ds = FundusDataset(val_recs, size, cfg.data.cache_dir, eval_transforms(size, contrast))
    # Lesion-annotated images are few; draw them more often so the segmentation head keeps learning.
    seg_share = sum(r.has_masks for r in train_recs) / max(len(train_recs), 1)
    boost = 1.0 if seg_share == 0 or seg_share >= 0.25 else min(4.0, 0.25 / seg_share)
    weights = [boost if r.has_masks else 1.0 for r in train_recs]
    if cfg.train.balanced_sampling and any(r.has_grade for r in train_recs):
        counts = np.maximum(class_counts(train_recs), 1)
        weights = [w * (float(counts.max()) / counts[r.dr_grade]) ** 0.5 if r.has_grade else w
                   for w, r in zip(weights, train_recs)]
    if cfg.train.source_weight_power > 0:
        share = Counter(r.source for r in train_recs)
        weights = [w * (len(train_recs) / share[r.source]) ** cfg.train.source_weight_power
                   for w, r in zip(weights, train_recs)]
    sampler = EpochSampler(weights, cfg.train.samples_per_epoch or len(weights), cfg.train.seed)
    kw: dict[str, Any] = dict(batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers,
                              persistent_workers=cfg.train.num_workers > 0)
    return TrainingData(
        {**splits, "train": train_recs, "val": val_recs},
        DataLoader(train_ds, sampler=sampler, drop_last=len(train_ds) > cfg.train.batch_size, **kw),
        DataLoader(val_ds, shuffle=False, **kw),
    )


# Settings a resumed run may change: how long it goes on, where it runs. Any other change would mix two recipes in one
# model while its checkpoint named only the last (a resume with --lr 0.1 kept the old rate and recorded the new one).
# Precision may change (E8's run resumed in bf16 after starting in fp32), as may the loader's workers, the steps cap
# (a smoke run) and init_from (read only when a run starts, never on a resume).
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "out_dir", "num_workers", "precision",
                               "max_steps_per_epoch", "init_from"})


def check_resumable(last: Path, cfg: TrainingConfig, mcfg: ModelConfig, summary: dict[str, Any]) -> None:
    """Refuse to resume ``last`` under other settings or data than it was trained with, naming each difference."""
    ckpt = read_checkpoint(last)
    prov = ckpt.get("provenance", {})
    differences = []
    before_train, now_train = prov.get("train_config", {}), json.loads(cfg.train.model_dump_json())
    # a key the run's checkpoint lacks was added to the settings since: the run had its default
    defaults = json.loads(TrainSettings().model_dump_json())
    for key in sorted(set(before_train) | set(now_train)):
        before = before_train.get(key, defaults.get(key))
        if key not in RESUMABLE_CHANGES and before != now_train.get(key):
            differences.append(f"train.{key} {before!r} -> {now_train.get(key)!r}")
    before_model = json.loads(json.dumps(ckpt.get("model_config", {})))
    now_model = json.loads(json.dumps(mcfg.to_dict()))
    for key in sorted(set(before_model) | set(now_model)):
        if before_model.get(key) != now_model.get(key):
            differences.append(f"model.{key} {before_model.get(key)!r} -> {now_model.get(key)!r}")
    before_split = {k: v for k, v in prov.get("split", {}).items() if k != "seen"}
    now_split = {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction, "seed": cfg.data.split_seed}
    if before_split and before_split != now_split:
        differences.append(f"data split {before_split} -> {now_split}")
    if prov.get("data") is not None and json.loads(json.dumps(prov["data"])) != json.loads(json.dumps(summary)):
        differences.append("the data (its images or patients per split differ: a source was added, removed or changed)")
    if differences:
        raise ConfigError(f"{last} was trained with other settings than this command's, so resuming would mix two "
                          f"recipes in one model: {'; '.join(differences)}. Resume with the run's settings, start over "
                          "with --restart (replaces that run's checkpoints), or give another --out-dir")


def run_training(
    cfg: TrainingConfig, kind: str = "real", resume: bool = True, progress: bool = True,
    records: list[Record] | None = None, command: str | None = None, log: Callable[[str], None] = print,
    max_seconds: float | None = None,
) -> FitState:
    """Train with the settings; writes best.pt/last.pt, history.json, curves.png and splits.json to out_dir."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    data = make_loaders(cfg, records, progress)
    out_dir = cfg.train.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = data_summary(data.splits)
    (out_dir / "splits.json").write_text(json.dumps(
        {k: [str(r.image) for r in v] for k, v in data.splits.items()} | {"summary": summary}, indent=1))
    log("data: " + ", ".join(f"{k} {v['images']} images / {v['patients']} patients" for k, v in summary.items()))

    mcfg = model_config_from(cfg)
    if resume and (out_dir / "last.pt").is_file():
        check_resumable(out_dir / "last.pt", cfg, mcfg, summary)
    elif (out_dir / "best.pt").is_file() or (out_dir / "last.pt").is_file():
        log(f"starting over: the earlier run's checkpoints and history in {out_dir} are replaced as this one goes")
    model = build_model(mcfg, cfg.model.pretrained_weights)
    init_from = init_weights(model, cfg.train.init_from) if cfg.train.init_from is not None else None
    model = model.to(device)
    counts = class_counts(data.splits["train"])
    dr_w = inverse_frequency_weights(counts.tolist()) if cfg.train.balance_classes and counts.all() else None
    loss_fn = MultiTaskLoss(cfg.train.cls_weight, cfg.train.seg_weight, cfg.train.dme_weight, dr_w).to(device)
    params = list(model.parameters())
    if cfg.train.lesion_only:  # no DR/DME labels here: leave those heads exactly as they are (weight decay included)
        params = [p for name, p in model.named_parameters() if not name.startswith(("dr_head.", "dme_head."))]
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=cfg.train.lr_patience)
    started = datetime.now(timezone.utc)
    version = make_version(mcfg, kind, started)
    command = command or " ".join(sys.argv)
    last_preds: dict[str, Predictions] = {}
    seen = {k: fingerprints(data.splits[k]) for k in ("train", "val")}
    not_chosen = threshold_basis([r.dr_grade for r in data.splits["val"]], [r.dme_grade for r in data.splits["val"]])
    if not_chosen:
        log(f"warning: {not_chosen}")

    def score_fn(preds: Predictions) -> tuple[float, dict[str, float]]:
        last_preds["val"] = preds
        return score_predictions(preds)

    def payload(row: dict[str, float]) -> dict[str, Any]:
        threshold = referral_threshold(last_preds["val"], cfg.train.target_sensitivity)
        return {
            "model_version": version,
            "model_config": mcfg.to_dict(),
            "labels": labels_dict(),
            "thresholds": {"referable": threshold, "lesion": 0.5, "target_sensitivity": cfg.train.target_sensitivity,
                           "referable_source": not_chosen or "chosen on the validation split for the target sensitivity"},
            "provenance": {
                "kind": kind, "command": command, "started": started.isoformat(), "git_commit": git_commit(),
                "data": summary, "pretrained_weights": str(cfg.model.pretrained_weights or "none (random init)"),
                "train_config": json.loads(cfg.train.model_dump_json()),
                "split": {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction, "seed": cfg.data.split_seed,
                          # what evaluate checks its split against (training.evaluate.check_unseen)
                          "seen": {"train": seen["train"], "val": seen["val"]}},
            } | ({"init_from": init_from} if init_from else {}),
            "metrics": {"validation": {k: float(v) for k, v in row.items()}},
        }

    return fit(
        model, data.train, data.val, loss_fn, optimizer, scheduler, out_dir, cfg.train.epochs, cfg.train.patience,
        device, score_fn, payload, max_steps=cfg.train.max_steps_per_epoch, resume=resume, progress=progress,
        plot_fn=plot_history, log=log, max_seconds=max_seconds, seed=cfg.train.seed, precision=cfg.train.precision,
    )

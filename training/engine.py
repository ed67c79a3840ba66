"""The training loop as plain functions (torchvision references style).

``train_one_epoch`` and ``predict`` are the building blocks; ``fit`` runs epochs with
ReduceLROnPlateau, early stopping, ``best.pt``/``last.pt`` checkpoints, resume from ``last.pt``,
a ``history.json`` and a training-curve plot.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.device import resolve_device as resolve_device  # re-exported: callers of the training loop import it here
from training.losses import MultiTaskLoss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PRECISIONS = ("fp32", "bf16")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_one_epoch(
    model: nn.Module, loader: Iterable[dict[str, Any]], loss_fn: MultiTaskLoss, optimizer: torch.optim.Optimizer,
    device: torch.device, epoch: int, max_steps: int | None = None, progress: bool = True,
    precision: str = "fp32",
) -> dict[str, float]:
    """One pass over ``loader``. ``precision="bf16"``: the forward and backward passes run under bfloat16
    autocast (weights, optimiser state and the loss stay float32; no loss scaling is needed with bfloat16's
    float32 range). On this project's CPUs (AVX512-BF16) a step costs about half as long (experiments/README.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model.train()
    sums: dict[str, float] = {}
    n = 0
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if max_steps is not None and total is not None:
        total = min(total, max_steps)
    bar = tqdm(loader, total=total, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    t0 = time.perf_counter()
    images = 0
    for step, batch in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        batch = _to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch["image"])
        parts = loss_fn(type(out)(*(t.float() for t in out)), batch)
        if not torch.isfinite(parts.total):
            raise FloatingPointError(f"loss became {float(parts.total)} at epoch {epoch} step {step}; lower [train] lr")
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        for k, v in parts.as_floats().items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        images += batch["image"].shape[0]
        bar.set_postfix(loss=f"{sums['total'] / n:.4f}")
    elapsed = time.perf_counter() - t0
    stats = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
    stats["train_images_per_s"] = images / elapsed if elapsed > 0 else 0.0
    return stats


@dataclass
class Predictions:
    """Everything an evaluation needs, on the CPU as numpy arrays."""

    dr_probs: np.ndarray
    dme_probs: np.ndarray
    dr_true: np.ndarray
    dme_true: np.ndarray
    seg_probs: np.ndarray | None = None  # (M, 5, H, W) float16 for the M samples that have masks
    seg_masks: np.ndarray | None = None  # (M, 5, H, W) uint8
    extra: np.ndarray | None = None  # rows of predict's ``extra`` callback, one per sample
    losses: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0


@torch.inference_mode()
def predict(
    model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, loss_fn: MultiTaskLoss | None = None,
    progress: bool = True, tta_flip: bool = False, extra: Callable[[Any], np.ndarray] | None = None,
) -> Predictions:
    """Run the model over a loader; keep lesion maps only for samples that have masks. ``extra``, called with
    each batch's output (the photos' own pass, never the mirrored one), returns rows kept as ``Predictions.extra``:
    what a caller needs from the full lesion maps (the grader's evidence) without a second forward pass."""
    model.eval()
    dr, dme, dr_t, dme_t, seg_p, seg_m = [], [], [], [], [], []
    rows: list[np.ndarray] = []
    sums: dict[str, float] = {}
    n = images = 0
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc="predict", leave=False, disable=not progress):
        batch = _to_device(batch, device)
        out = model(batch["image"])
        if extra is not None:
            rows.append(np.asarray(extra(out)))
        if loss_fn is not None:
            for k, v in loss_fn(out, batch).as_floats().items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        dr_logits, dme_logits, seg_logits = out.dr_logits, out.dme_logits, out.seg_logits
        if tta_flip:
            flipped = model(torch.flip(batch["image"], dims=[3]))
            dr_logits = (dr_logits.softmax(1) + flipped.dr_logits.softmax(1)).log()
            dme_logits = (dme_logits.softmax(1) + flipped.dme_logits.softmax(1)).log()
            seg_logits = (seg_logits + torch.flip(flipped.seg_logits, dims=[3])) / 2
        dr.append(dr_logits.softmax(1).float().cpu())
        dme.append(dme_logits.softmax(1).float().cpu())
        dr_t.append(batch["dr"].cpu())
        dme_t.append(batch["dme"].cpu())
        has = batch["has_masks"].bool()
        if bool(has.any()):
            seg_p.append(torch.sigmoid(seg_logits[has]).half().cpu())
            seg_m.append(batch["masks"][has].to(torch.uint8).cpu())
        images += batch["image"].shape[0]
    elapsed = time.perf_counter() - t0
    if not dr:
        raise ValueError("the data loader gave no batches: nothing to predict (is the split empty?)")

    def cat(xs: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(xs).numpy()

    return Predictions(
        dr_probs=cat(dr), dme_probs=cat(dme), dr_true=cat(dr_t), dme_true=cat(dme_t),
        seg_probs=cat(seg_p) if seg_p else None, seg_masks=cat(seg_m) if seg_m else None,
        extra=np.concatenate(rows) if rows else None,
        losses={f"val_{k}": v / n for k, v in sums.items()} if n else {},
        images_per_s=images / elapsed if elapsed > 0 else 0.0,
    )


def _eta(history: list[dict[str, float]], epochs: int) -> str:
    """'ETA 12 min for 4 more epochs' from the mean time of the epochs run so far."""
    left = epochs - len(history)
    if left <= 0:
        return "last epoch"
    mean = float(np.mean([h["seconds"] for h in history]))
    return f"ETA {left * mean / 60:.0f} min for {left} more epoch{'s' if left > 1 else ''}"


class EarlyStopping:
    """Stop when the monitored score has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float = 1e-4, best: float = -math.inf, bad_epochs: int = 0) -> None:
        self.patience, self.min_delta, self.best, self.bad_epochs = patience, min_delta, best, bad_epochs

    def step(self, score: float) -> bool:
        """Record a score; returns True when it is a new best."""
        if score > self.best + self.min_delta:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class FitState:
    epoch: int = 0
    best_score: float = -math.inf
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: nn.Module,
    train_loader: Iterable[dict[str, Any]],
    val_loader: Iterable[dict[str, Any]],
    loss_fn: MultiTaskLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    out_dir: Path,
    epochs: int,
    patience: int,
    device: torch.device,
    score_fn: Callable[[Predictions], tuple[float, dict[str, float]]],
    checkpoint_payload: Callable[[dict[str, float]], dict[str, Any]],
    max_steps: int | None = None,
    resume: bool = True,
    progress: bool = True,
    plot_fn: Callable[[list[dict[str, float]], Path], None] | None = None,
    log: Callable[[str], None] = print,
    max_seconds: float | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> FitState:
    """Train until ``epochs`` or early stopping; resumable from ``out_dir/last.pt``.

    ``score_fn`` turns validation predictions into (score to maximise, metrics);
    ``checkpoint_payload(metrics)`` returns the metadata part of a checkpoint (config, labels,
    thresholds, provenance...) to which model/optimizer/scheduler state are added here.

    Resuming is exact (with ``num_workers = 0``): model, optimiser, scheduler, early-stopping state and the
    torch random state come from ``last.pt``, and the sampler and augmentation are reseeded per epoch
    (``set_epoch``), so an interrupted run continues with the batches the uninterrupted run would draw.
    Each epoch is logged with its time and an ETA for the epochs left (early stopping may end sooner).
    """
    from training.checkpoint import read_checkpoint, save_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    state = FitState()
    last = out_dir / "last.pt"
    if resume and last.is_file():
        ckpt = read_checkpoint(last)
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler.load_state_dict(ckpt["scheduler_state"])
        state = FitState(ckpt["epoch"], ckpt["best_score"], ckpt["bad_epochs"], list(ckpt["history"]))
        torch.set_rng_state(ckpt["torch_rng"])
        log(f"resumed from {last} after epoch {state.epoch} (best score {state.best_score:.4f})")
    stopper = EarlyStopping(patience, best=state.best_score, bad_epochs=state.bad_epochs)
    started = time.perf_counter()

    while state.epoch < epochs and not stopper.should_stop:
        if max_seconds is not None and state.epoch > 0 and time.perf_counter() - started > max_seconds:
            log(f"time budget of {max_seconds:.0f}s reached after epoch {state.epoch}")
            break
        epoch = state.epoch + 1
        for part in (getattr(train_loader, "sampler", None), getattr(train_loader, "dataset", None)):
            if part is not None and hasattr(part, "set_epoch"):
                part.set_epoch(epoch, seed)
        t0 = time.perf_counter()
        row: dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                 "train_bf16": float(precision == "bf16")}
        row.update(train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch, max_steps, progress, precision))
        preds = predict(model, val_loader, device, loss_fn, progress)
        score, metrics = score_fn(preds)
        row.update(preds.losses)
        row.update({f"val_{k}": v for k, v in metrics.items()})
        row["val_score"] = score
        row["val_images_per_s"] = preds.images_per_s
        row["seconds"] = time.perf_counter() - t0
        scheduler.step(score)
        improved = stopper.step(score)
        state = FitState(epoch, stopper.best, stopper.bad_epochs, state.history + [row])

        payload = checkpoint_payload({k: v for k, v in row.items()})
        payload.update(
            model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(), epoch=epoch, best_score=stopper.best,
            bad_epochs=stopper.bad_epochs, history=state.history, torch_rng=torch.get_rng_state(),
        )
        if improved:
            save_checkpoint(out_dir / "best.pt", payload)
        save_checkpoint(last, payload)
        (out_dir / "history.json").write_text(json.dumps(state.history, indent=1))
        if plot_fn is not None:
            plot_fn(state.history, out_dir / "curves.png")
        log(
            f"epoch {epoch}: train loss {row.get('train_total', float('nan')):.4f} "
            f"val loss {row.get('val_total', float('nan')):.4f} score {score:.4f}"
            f"{' (best)' if improved else ''} " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            + f" [{row['seconds']:.0f}s, {_eta(state.history, epochs)}]"
        )
    if stopper.should_stop:
        log(f"early stopping after epoch {state.epoch}: no improvement for {patience} epochs")
    return state

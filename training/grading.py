"""Grading stage (model v2, experiments/README.md E7): the network's own DR and DME heads learn to grade.

Why a separate stage: on two CPU cores a full forward/backward pass over ~3,600 photos at 512 px costs
about an hour per epoch, and from-scratch heads trained end to end never left chance (E2/E3). The trunk
(encoder, decoder, lesion head) of the lesion-stage network already sees exudates, haemorrhages and the
disc. So the trunk runs **once** per photo (resumable, in chunks) and its output is kept: the pooled
last-stage features and the lesion evidence (:func:`training.model.heads.lesion_evidence`), exactly the
vector :class:`~training.model.heads.EvidenceHead` classifies. The heads are then fitted on those vectors in
seconds per epoch, so sampling across sources, class balance and regularisation can be chosen on
validation by measurement. The result is an ordinary checkpoint whose forward pass computes the same
vector from the image, so the worker needs nothing new.

Steps (``run_grading_stage``):

1. the split of ``[data]`` (``pin_split`` keeps the trunk's own training patients out of val/test);
2. head inputs of every train/val record, cached under ``out_dir/head-inputs``;
3. fit both heads (cross-entropy with inverse-sqrt class weights for DR, the marginal DME loss, each
   source weighted 1/sqrt(its share) so APTOS's 1,600 photos do not drown IDRiD's 290), early stopping on
   the validation score, a small grid of regularisation settings, the best on validation kept;
4. temperature scaling of each head on validation (folded into the last linear layer: the model keeps
   returning logits, now calibrated), then a Platt map of P(referable) itself (``referable_calibration``
   in the checkpoint), the referral threshold on that scale for the target sensitivity on validation;
5. ``out_dir/graded.pt`` with the settings, the grid's results and the calibration in its provenance.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.checkpoint import file_sha256, git_commit, labels_dict, make_version, read_checkpoint, save_checkpoint
from training.common import atomic_write
from training.config import TrainingConfig
from training.data.cache import load_record
from training.data.records import DME_PRESENT, Record
from training.data.split import configured_split
from training.data.transforms import eval_transforms
from training.engine import resolve_device, seed_everything
from training.losses import dme_loss, inverse_frequency_weights
from training.metrics import (
    calibrated_referable,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    fit_referable_calibration,
    referable_labels,
    referable_score,
    validation_numbers,
)
from training.model import ModelConfig, MultiTaskNet, build_model
from training.model.heads import EvidenceHead, lesion_evidence

CHUNK = 128  # records per cached chunk of head inputs: a lost process loses at most this much work


@dataclass(frozen=True)
class GridPoint:
    """One regularisation setting of the heads; the grid is small because each fit takes seconds."""

    dropout: float
    weight_decay: float
    hidden: int = 256

    @property
    def name(self) -> str:
        return f"dropout{self.dropout}-wd{self.weight_decay:g}-h{self.hidden}"


# Chosen by an exploratory fit on an inner patient split of the training set only (experiments/README.md E7).
DEFAULT_GRID: tuple[GridPoint, ...] = (
    GridPoint(0.3, 1e-2), GridPoint(0.5, 1e-2, hidden=128), GridPoint(0.2, 1e-4),
)


# ----------------------------------------------------------------------------------------- head inputs


def trunk_model(cfg: TrainingConfig, init_from: Path, device: torch.device) -> tuple[MultiTaskNet, dict[str, Any]]:
    """A ``features+lesions`` network with the trunk of ``init_from`` (its heads are not reused: new inputs)."""
    ckpt = read_checkpoint(init_from)
    theirs = ModelConfig.from_dict(dict(ckpt["model_config"]))
    mcfg = ModelConfig(**{**theirs.__dict__, "grade_inputs": "features+lesions", "dropout": cfg.model.dropout})
    model = build_model(mcfg)
    trunk = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()
             if not k.startswith(("dr_head.", "dme_head."))}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    missing = [k for k in missing if not k.startswith(("dr_head.", "dme_head."))]
    if missing or unexpected:
        raise ValueError(f"{init_from}: trunk weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), ckpt


def _save_npy(tmp: Path, arr: np.ndarray) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a name
        np.save(fh, arr)


def _chunk_key(records: list[Record], model_sha: str, size: int, flip: bool) -> str:
    h = hashlib.sha256(json.dumps([model_sha, size, flip, [str(r.image) for r in records]]).encode())
    return h.hexdigest()[:16]


@torch.inference_mode()
def head_inputs_of(model: MultiTaskNet, images: list[np.ndarray], device: torch.device, flip: bool = False) -> np.ndarray:
    """The vectors the evidence heads classify, for preprocessed RGB images (same code path as ``forward``)."""
    transform = eval_transforms(model.config.image_size, model.config.contrast)
    x = torch.stack([transform(image=im)["image"] for im in images]).to(device)
    if flip:
        x = torch.flip(x, dims=[3])
    features, seg = model.trunk(x)
    return EvidenceHead.pooled(features, lesion_evidence(seg)).float().cpu().numpy()


def cached_head_inputs(
    model: MultiTaskNet, model_sha: str, records: list[Record], cache_dir: Path, out_dir: Path,
    device: torch.device, batch_size: int = 8, flip: bool = False, log: Callable[[str], None] = print,
) -> np.ndarray:
    """Head inputs of ``records`` (input order), computed once per chunk of :data:`CHUNK` and kept on disk.

    Resumable: an interrupted run recomputes only the chunks it had not finished. Logs progress with an ETA.
    """
    size = model.config.image_size
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[np.ndarray] = []
    started, done_new = time.perf_counter(), 0
    todo = sum(1 for i in range(0, len(records), CHUNK)
               if not (out_dir / f"{_chunk_key(records[i:i + CHUNK], model_sha, size, flip)}.npy").is_file())
    todo_images = min(todo * CHUNK, len(records))
    for i in range(0, len(records), CHUNK):
        chunk = records[i:i + CHUNK]
        path = out_dir / f"{_chunk_key(chunk, model_sha, size, flip)}.npy"
        if path.is_file():
            parts.append(np.load(path))
            continue
        rows = []
        for j in range(0, len(chunk), batch_size):
            images = [load_record(r, size, cache_dir).image for r in chunk[j:j + batch_size]]
            rows.append(head_inputs_of(model, images, device, flip))
        arr = np.concatenate(rows).astype(np.float32)
        atomic_write(path, functools.partial(_save_npy, arr=arr), durable=False)  # a rebuildable cache: no fsync
        parts.append(arr)
        done_new += len(chunk)
        rate = done_new / max(time.perf_counter() - started, 1e-9)
        eta = (todo_images - done_new) / rate if rate > 0 else float("nan")
        log(f"head inputs {i + len(chunk)}/{len(records)} ({rate:.2f} img/s, ETA {eta / 60:.1f} min)")
    stacked: np.ndarray = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return stacked


# ------------------------------------------------------------------------------------------ fitting


def source_weights(sources: list[str], power: float = 0.5) -> np.ndarray:
    """Per-sample weights so that each source counts ~ its share^(1 - power); mean 1."""
    counts = Counter(sources)
    w = np.array([(len(sources) / counts[s]) ** power for s in sources], dtype=np.float64)
    weights: np.ndarray = (w / w.mean()).astype(np.float32)
    return weights


class Heads(nn.Module):
    """The two evidence heads alone, as fitted on cached vectors (their state loads into the full model)."""

    def __init__(self, in_features: int, evidence: int, point: GridPoint) -> None:
        super().__init__()
        channels = (in_features - evidence) // 2
        self.dr_head = EvidenceHead(channels, evidence, 5, point.dropout, point.hidden)
        self.dme_head = EvidenceHead(channels, evidence, 3, point.dropout, point.hidden)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dr_head.classify(v), self.dme_head.classify(v)


def _dme_loss_fast(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sample-weighted :func:`training.losses.dme_loss` (exact grades: CE; code 3: -log P(1 or 2))."""
    exact = (target >= 0) & (target <= 2)
    present = target == DME_PRESENT
    known = exact | present
    if not bool(known.any()):
        return logits.sum() * 0.0
    logp = F.log_softmax(logits, 1)
    per = torch.zeros(len(target), dtype=logits.dtype, device=logits.device)
    per[exact] = -logp[exact].gather(1, target[exact].unsqueeze(1)).squeeze(1)
    per[present] = -torch.logsumexp(logp[present][:, 1:], 1)
    w = weight * known.float()
    return (per * w).sum() / w.sum()


def score_of(dr_probs: np.ndarray, dme_probs: np.ndarray, dr: np.ndarray, dme: np.ndarray) -> dict[str, float]:
    """Validation score: mean of DR quadratic kappa and referable AUC (what model selection maximises)."""
    m = classification_metrics(dr_probs, dme_probs, dr, dme, dme_unknown_as_absent=True)
    kappa = m["dr"].get("quadratic_kappa") or 0.0
    auc = m["referable"].get("auc") or 0.0
    dme_auc = (m.get("dme") or {}).get("present_auc")
    out = {"kappa": float(kappa), "ref_auc": float(auc), "score": float((kappa + auc) / 2)}
    if dme_auc is not None:
        out["dme_auc"] = float(dme_auc)
    return out


def _probs(heads: Heads, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    heads.eval()
    with torch.no_grad():
        dr, dme = heads(v)
    return dr.softmax(1).numpy(), dme.softmax(1).numpy()


def fit_heads(
    train_v: np.ndarray, train_dr: np.ndarray, train_dme: np.ndarray, train_w: np.ndarray,
    val_v: np.ndarray, val_dr: np.ndarray, val_dme: np.ndarray, evidence: int, point: GridPoint,
    epochs: int = 150, patience: int = 20, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
    dme_weight: float = 0.5, log: Callable[[str], None] = print,
) -> tuple[Heads, dict[str, Any]]:
    """Fit both heads on cached vectors; keep the epoch with the best validation score."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tv, tdr, tdme, tw = (torch.from_numpy(np.ascontiguousarray(a)) for a in (train_v, train_dr, train_dme, train_w))
    vv = torch.from_numpy(np.ascontiguousarray(val_v))
    heads = Heads(train_v.shape[1], evidence, point)
    counts = np.bincount(train_dr[train_dr >= 0], minlength=5)
    class_w = inverse_frequency_weights(counts.tolist())
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=point.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best: dict[str, Any] = {"score": -math.inf}
    best_state = None
    bad = 0
    history = []
    for epoch in range(1, epochs + 1):
        heads.train()
        order = torch.randperm(len(tv), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue
            dr_logits, dme_logits = heads(tv[idx])
            y, w = tdr[idx], tw[idx]
            known = y >= 0
            dr_loss = (F.cross_entropy(dr_logits[known], y[known], weight=class_w, reduction="none") * w[known]).sum() \
                / (class_w[y[known]] * w[known]).sum().clamp_min(1e-9) if bool(known.any()) else dr_logits.sum() * 0.0
            loss = (1 - dme_weight) * dr_loss + dme_weight * _dme_loss_fast(dme_logits, tdme[idx], w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        dr_p, dme_p = _probs(heads, vv)
        s = score_of(dr_p, dme_p, val_dr, val_dme)
        history.append({"epoch": epoch, "train_loss": total / len(tv), **s})
        if s["score"] > best["score"] + 1e-4:
            best, bad = {**s, "epoch": epoch}, 0
            best_state = {k: v.clone() for k, v in heads.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    assert best_state is not None
    heads.load_state_dict(best_state)
    log(f"  {point.name}: best epoch {best['epoch']} of {len(history)}: kappa {best['kappa']:.3f} "
        f"referable AUC {best['ref_auc']:.3f} score {best['score']:.3f}")
    return heads.eval(), {"grid_point": point.name, "best": best, "history": history}


# -------------------------------------------------------------------------------------- calibration


def fit_temperature(logits: torch.Tensor, nll: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The temperature T in [0.05, 20] minimising ``nll(logits / T)`` (Guo et al. 2017).

    A bounded one-dimensional search on log T (scipy's Brent method): it cannot diverge the way a gradient
    step can on a flat or tiny validation set; T = 1 (no change) when there is nothing to fit.
    """
    from scipy.optimize import minimize_scalar

    if logits.numel() == 0:
        return 1.0
    logits = logits.detach().double()

    def objective(log_t: float) -> float:
        value = float(nll(logits / math.exp(log_t)))
        return value if math.isfinite(value) else float("inf")

    result = minimize_scalar(objective, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                             options={"xatol": 1e-4})
    if not math.isfinite(result.fun) or objective(0.0) <= result.fun:
        return 1.0
    return float(math.exp(result.x))


def fold_temperature(head: nn.Module, temperature: float) -> None:
    """Divide the head's last linear layer by T: its logits become logits / T (exact, nothing else changes)."""
    last = list(head.get_submodule("mlp").children())[-1]  # both head kinds end in a linear layer
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.div_(temperature)
        last.bias.div_(temperature)


def _nll(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor,
         logits: torch.Tensor) -> torch.Tensor:
    return loss(logits, target)


def temper_network(model: MultiTaskNet, dr_probs: np.ndarray, dme_probs: np.ndarray, dr_y: np.ndarray,
                   dme_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Temperature-scale a whole network's DR and DME heads from their validation probabilities, for a network
    whose heads were trained end to end and never calibrated (E8; this stage's heads are, in :func:`calibrate`).

    The log of a softmax differs from its logits by one constant per photo, which the softmax ignores, so T fitted
    on log-probabilities is the T of the logits. T is folded into the heads (the model keeps returning logits,
    now calibrated); returns the rescaled probabilities and the two temperatures. Grades (the argmax) do not move.
    """
    out: list[np.ndarray] = []
    temps: dict[str, float] = {}
    losses: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (F.cross_entropy, dme_loss)
    for name, probs, y, loss in zip(("dr", "dme"), (dr_probs, dme_probs), (dr_y, dme_y), losses):
        log_p = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).double()
        target = torch.from_numpy(np.asarray(y, np.int64))
        known = target >= 0
        t = fit_temperature(log_p[known], functools.partial(_nll, loss, target[known]))
        fold_temperature(getattr(model, f"{name}_head"), t)
        out.append(torch.softmax(log_p / t, dim=1).float().numpy())
        temps[f"{name}_temperature"] = t
    return out[0], out[1], temps


def calibrate(heads: Heads, val_v: np.ndarray, val_dr: np.ndarray, val_dme: np.ndarray) -> dict[str, Any]:
    """Calibrate on validation: temperature-scale both heads (folded into the weights, so the DR and DME
    probabilities shown are calibrated), then fit P(referable) itself (:func:`fit_referable_calibration`:
    the heads' product is not calibrated by calibrating each head). ECE of P(referable) at each step; the
    values after the Platt map are in-sample (fitted on these eyes), the test split measures it honestly."""
    vv = torch.from_numpy(val_v)
    dr_y, dme_y = torch.from_numpy(val_dr), torch.from_numpy(val_dme)
    y_ref = referable_labels(val_dr, val_dme, dme_unknown_as_absent=True)
    dr_p, dme_p = _probs(heads, vv)
    before = expected_calibration_error(y_ref, referable_score(dr_p, dme_p))
    with torch.no_grad():
        dr_logits, dme_logits = heads(vv)
    known = dr_y >= 0
    t_dr = fit_temperature(dr_logits[known], lambda z: F.cross_entropy(z, dr_y[known]))
    dme_known = dme_y >= 0
    t_dme = fit_temperature(dme_logits[dme_known], lambda z: dme_loss(z, dme_y[dme_known]))
    fold_temperature(heads.dr_head, t_dr)
    fold_temperature(heads.dme_head, t_dme)
    dr_p, dme_p = _probs(heads, vv)
    tempered = expected_calibration_error(y_ref, referable_score(dr_p, dme_p))
    try:
        referable: dict[str, Any] | None = fit_referable_calibration(y_ref, referable_score(dr_p, dme_p))
        skipped = ""
    except ValueError as exc:  # e.g. a validation split with one class: nothing to fit, the score stays as it is
        referable, skipped = None, str(exc)
    after = expected_calibration_error(y_ref, calibrated_referable(dr_p, dme_p, referable))
    return {"dr_temperature": t_dr, "dme_temperature": t_dme, "val_ece_referable_before": before or float("nan"),
            "val_ece_referable_tempered": tempered or float("nan"), "val_ece_referable_after": after or float("nan"),
            "referable": referable, **({"referable_skipped": skipped} if skipped else {})}


# ----------------------------------------------------------------------------------------------- stage


def _labels(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([r.dr_grade for r in records], np.int64), np.array([r.dme_grade for r in records], np.int64))


def run_grading_stage(
    cfg: TrainingConfig, init_from: Path, out_dir: Path, grid: tuple[GridPoint, ...] = DEFAULT_GRID,
    epochs: int = 150, log: Callable[[str], None] = print, command: str | None = None,
) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; returns a summary (also written to ``out_dir/grading.json``)."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = configured_split(cfg.data)
    train = [r for r in splits["train"] if r.has_grade or r.has_dme]
    val = [r for r in splits["val"] if r.has_grade or r.has_dme]
    log(f"grading stage: {len(train)} train / {len(val)} val graded photos; trunk from {init_from}")
    model, init_ckpt = trunk_model(cfg, init_from, device)
    sha = file_sha256(init_from)
    cache = out_dir / "head-inputs"
    train_v = cached_head_inputs(model, sha, train, cfg.data.cache_dir, cache, device, cfg.train.batch_size, log=log)
    val_v = cached_head_inputs(model, sha, val, cfg.data.cache_dir, cache, device, cfg.train.batch_size, log=log)
    evidence = train_v.shape[1] - 2 * model.encoder.out_channels[-1]
    train_dr, train_dme = _labels(train)
    val_dr, val_dme = _labels(val)
    train_w = source_weights([r.source for r in train])
    results, best_heads, best_score = [], None, -math.inf
    for point in grid:
        heads, info = fit_heads(train_v, train_dr, train_dme, train_w, val_v, val_dr, val_dme, evidence, point,
                                epochs=epochs, lr=cfg.train.lr, seed=cfg.train.seed, log=log)
        results.append({k: v for k, v in info.items() if k != "history"})
        (out_dir / f"history-{point.name}.json").write_text(json.dumps(info["history"], indent=1))
        if info["best"]["score"] > best_score:
            best_heads, best_score, best_point = heads, info["best"]["score"], point
    assert best_heads is not None
    calibration = calibrate(best_heads, val_v, val_dr, val_dme)
    ref_cal = calibration["referable"]
    platt = (f"P(referable) Platt slope {ref_cal['slope']:.3f} intercept {ref_cal['intercept']:.3f}" if ref_cal
             else f"P(referable) not mapped ({calibration.get('referable_skipped')})")
    log(f"calibration: T_dr {calibration['dr_temperature']:.3f} T_dme {calibration['dme_temperature']:.3f}; "
        f"{platt}; val ECE(referable) "
        f"{calibration['val_ece_referable_before']:.3f} -> {calibration['val_ece_referable_tempered']:.3f} (temperatures)"
        f" -> {calibration['val_ece_referable_after']:.3f} (Platt, in-sample)")
    dr_p, dme_p = _probs(best_heads, torch.from_numpy(val_v))
    target = cfg.train.target_sensitivity
    threshold = float(choose_threshold(referable_labels(val_dr, val_dme, dme_unknown_as_absent=True),
                                       calibrated_referable(dr_p, dme_p, ref_cal), target))
    val_metrics = classification_metrics(dr_p, dme_p, val_dr, val_dme, threshold, dme_unknown_as_absent=True,
                                         referable_calibration=ref_cal)

    # the full network: trunk of init_from, fitted heads (with the chosen dropout, for the record)
    mcfg = ModelConfig(**{**model.config.__dict__, "dropout": best_point.dropout, "head_hidden": best_point.hidden})
    full = build_model(mcfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("dr_head.", "dme_head."))}
    state.update({k: v for k, v in best_heads.state_dict().items()})
    full.load_state_dict(state)
    started = datetime.now(timezone.utc)
    version = make_version(mcfg, "real", started)
    prov_init = init_ckpt.get("provenance", {})
    validation = {**validation_numbers(val_metrics), "val_ece_referable": calibration["val_ece_referable_after"]}
    payload = {
        "model_version": version, "model_config": mcfg.to_dict(), "labels": labels_dict(),
        "thresholds": {"referable": threshold, "lesion": float(init_ckpt.get("thresholds", {}).get("lesion", 0.5)),
                       "target_sensitivity": target},
        **({"referable_calibration": ref_cal} if ref_cal else {}),
        "provenance": {
            "kind": "real", "stage": "grading heads on the frozen trunk (training/grading.py)",
            "command": command or " ".join(sys.argv), "started": started.isoformat(), "git_commit": git_commit(),
            "data": {name: {"images": len(recs), "by_source": dict(Counter(r.source for r in recs))}
                     for name, recs in (("train", train), ("val", val))},
            "split": {"val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction,
                      "seed": cfg.data.split_seed, "pin_split": str(cfg.data.pin_split or "")},
            "pretrained_weights": prov_init.get("pretrained_weights", "none (random init)"),
            "init_from": {"checkpoint": str(init_from), "sha256": sha, "model_version": init_ckpt.get("model_version")},
            "grid": results, "chosen": best_point.name, "calibration": calibration,
            "train_config": {"lr": cfg.train.lr, "epochs": epochs, "seed": cfg.train.seed, "source_weight_power": 0.5},
        },
        "metrics": {"validation": {k: float(v) for k, v in validation.items() if v is not None}},
        "model_state": full.state_dict(),
    }
    save_checkpoint(out_dir / "graded.pt", payload)
    summary = {"checkpoint": str(out_dir / "graded.pt"), "threshold": threshold, "chosen": best_point.name,
               "grid": results, "calibration": calibration, "validation": validation}
    (out_dir / "grading.json").write_text(json.dumps(summary, indent=1, default=float))
    log(f"wrote {out_dir / 'graded.pt'}: val kappa {validation['val_kappa']:.3f} referable AUC {validation['val_ref_auc']:.3f} "
        f"sens {validation['val_sensitivity']:.3f} spec {validation['val_specificity']:.3f} at {threshold:.3f}")
    return summary

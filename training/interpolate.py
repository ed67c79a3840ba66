"""Weight-space ensembling of a fine-tuned network with the network it was fine-tuned from (WiSE-FT).

Why (experiments/README.md E10): E8 fine-tuned the whole network from model v2's and gained on some cameras
while losing elsewhere (the exudate and haemorrhage maps; per-source AUCs move by several points from one
1,200-photo epoch to the next). Wortsman et al. (2022, "Robust fine-tuning of zero-shot models") found that
the straight line between the start and the fine-tuned weights, ``(1 - a) start + a end``, holds points more
robust to populations neither was tuned on than either end, at no inference cost: it is still one network.
A fine-tuned network stays in its start's basin, which is what makes the average of the two a working network;
so the end must have been fine-tuned *from this very start file* (its ``provenance.init_from.sha256``), and
anything else is refused.

Averaged weights shrink the variance of the activations they produce (Jordan et al. 2023, "REPAIR"), so averaged
batch-norm running statistics no longer fit them: E10 measured the midpoint network at validation AUC 0.817 with
them and 0.846 with statistics measured afresh (:func:`reset_batch_norm`, ``--reset-bn N`` training photos).

Functional core: :func:`interpolate_states`. :func:`interpolate_checkpoints` wraps it: it undoes the
temperature that ``blend-grader`` folded into the end's heads after its training (those heads trained at their
own scale; the start's were already tempered when fine-tuning began from them, so they stay), writes a
network-only checkpoint (no grader, no Platt map: run ``dr-train blend-grader`` on it next, which tempers and
calibrates it afresh) and chooses its referral threshold on the validation split for the target sensitivity,
as a training run does. The test split is not touched.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.checkpoint import (
    CheckpointError,
    file_sha256,
    git_commit,
    make_version,
    read_checkpoint,
    save_checkpoint,
    validate_metadata,
)
from training.config import TrainingConfig
from training.data.records import Record
from training.model import ModelConfig, MultiTaskNet, build_model

TEMPERED_BY = "blend-grader"  # provenance.calibration.fitted_by of heads tempered after their training


def interpolate_states(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end`` for every floating-point tensor, computed in float32 (the inputs may be
    float16 exports) and returned in float32. Integer tensors (batch-norm counters) are taken from ``end``.
    Batch-norm running statistics are averaged like the weights (WiSE-FT's rule); E10 measures the result."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the fine-tuned network's share) must be in [0, 1], got {alpha}")
    if set(start) != set(end):
        only = sorted(set(start) ^ set(end))
        raise CheckpointError(f"the two networks have different layers ({only[:5]}...): interpolate only a network "
                              "with one fine-tuned from it")
    out: dict[str, torch.Tensor] = {}
    for key, b in end.items():
        a = start[key]
        if a.shape != b.shape:
            raise CheckpointError(f"layer {key} has shape {tuple(a.shape)} in the start and {tuple(b.shape)} in the end")
        if b.is_floating_point():
            out[key] = torch.lerp(a.float(), b.float(), alpha)
        else:
            out[key] = b.clone()
    return out


def _tempered_after_training(ckpt: dict[str, Any]) -> bool:
    return str((ckpt["provenance"].get("calibration") or {}).get("fitted_by", "")).startswith(TEMPERED_BY)


def _untempered(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with a temperature folded in by ``blend-grader`` taken out again (exactly:
    the heads' last linear layers are multiplied back by T); other checkpoints' weights as they are."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}
    if not _tempered_after_training(ckpt):
        return state
    calibration = ckpt["provenance"]["calibration"]
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(state)
    from training.grading import fold_temperature  # the one owner of the fold; its inverse is a fold by 1 / T

    for name in ("dr", "dme"):
        fold_temperature(getattr(model, f"{name}_head"), 1.0 / float(calibration[f"{name}_temperature"]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def interpolated_network(start: Path, end: Path, alpha: float) -> tuple[MultiTaskNet, dict[str, Any]]:
    """The network at ``alpha`` on the line from ``start`` to ``end`` (eval mode, CPU) and the checkpoint dict that
    describes it: ``end``'s metadata without its grader, calibration and referral threshold (the threshold is chosen
    for this network by :func:`interpolate_checkpoints`), ``provenance.interpolated`` saying how it was made.
    Refuses a pair where ``end`` was not fine-tuned from ``start``."""
    a, b = read_checkpoint(start), read_checkpoint(end)
    validate_metadata(a, start)
    validate_metadata(b, end)
    init = b["provenance"].get("init_from") or {}
    start_sha = file_sha256(start)
    if init.get("sha256") != start_sha:
        raise CheckpointError(
            f"{end} was not fine-tuned from {start} (its provenance.init_from.sha256 is {init.get('sha256')!r}, the "
            f"file's is {start_sha}); weight averaging needs the exact file the fine-tuning started from "
            "(for model v2.2 that is `git show 0718ff9:models/baseline.pt`)")
    if a["model_config"] != b["model_config"]:
        raise CheckpointError(f"{start} and {end} have different model_config: they are not one architecture")
    state = interpolate_states(_untempered(a), _untempered(b), alpha)
    config = ModelConfig.from_dict(b["model_config"])
    model = build_model(config)
    model.load_state_dict(state)
    model.eval()
    provenance = {k: v for k, v in b["provenance"].items() if k not in ("calibration", "grader")}
    provenance.update(
        stage="interpolate", started=datetime.now(timezone.utc).isoformat(), git_commit=git_commit(),
        interpolated={"alpha": float(alpha), "rule": "(1 - alpha) * start + alpha * end (WiSE-FT)",
                      "start": {"checkpoint": str(start), "sha256": start_sha, "model_version": a["model_version"]},
                      "end": {"checkpoint": str(end), "sha256": file_sha256(end), "model_version": b["model_version"],
                              "untempered": _tempered_after_training(b)}},
    )
    ckpt = {
        "model_version": f"{make_version(config, 'real')}-wise{round(alpha * 100):02d}",
        "model_config": b["model_config"], "labels": b["labels"], "provenance": provenance,
        # the end's referral threshold belongs to the end's scores: chosen again for this network
        "thresholds": {k: v for k, v in b["thresholds"].items() if k not in ("referable", "referable_source")}, "metrics": {},
        "model_state": model.state_dict(),
    }
    return model, ckpt


@torch.no_grad()
def reset_batch_norm(model: MultiTaskNet, records: Sequence[Record], cfg: TrainingConfig, device: torch.device,
                     batch_size: int = 8) -> None:
    """Every batch-norm layer's running statistics measured afresh (a cumulative average, not a moving one) on
    ``records`` as the worker sees them (evaluation transforms); the rest of the network stays in eval mode (no
    dropout), so nothing but the statistics changes. No gradients, no labels."""
    from torch.utils.data import DataLoader

    from training.data.dataset import FundusDataset
    from training.data.transforms import eval_transforms

    if not records:
        raise ValueError("no photos to measure batch-norm statistics on: check [data] sources")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    size = model.config.image_size
    loader = DataLoader(FundusDataset(list(records), size, cfg.data.cache_dir, eval_transforms(size, model.config.contrast)),
                        batch_size=batch_size)
    for batch in loader:
        model(batch["image"].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def interpolate_checkpoints(cfg: TrainingConfig, start: Path, end: Path, alpha: float, output: Path,
                            reset_bn: int = 0, seed: int = 0) -> dict[str, Any]:
    """Write the interpolated network (:func:`interpolated_network`) with its referral threshold and validation
    numbers: one pass over the validation split, as at the end of a training epoch. ``reset_bn``: that many graded
    training photos (drawn with ``seed``) re-measure the batch-norm statistics first (:func:`reset_batch_norm`)."""
    from training.engine import resolve_device
    from training.evaluate import _pass, _split
    from training.metrics import classification_metrics, validation_numbers
    from training.train import referral_threshold

    model, ckpt = interpolated_network(start, end, alpha)
    device = resolve_device(cfg.train.device)
    model.to(device)
    splits = _split(cfg, ckpt)
    if reset_bn:
        train = [r for r in splits["train"] if r.has_grade or r.has_dme]
        reset_batch_norm(model, random.Random(seed).sample(train, min(reset_bn, len(train))), cfg, device)
        ckpt["provenance"]["interpolated"]["batch_norm"] = {
            "rule": "running statistics measured afresh on training photos (evaluation transforms)",
            "photos": min(reset_bn, len(train)), "seed": seed}
    val = [r for r in splits["val"] if r.has_grade or r.has_dme]
    if not val:
        raise ValueError("the validation split has no graded photos: check [data] sources and val_fraction")
    preds = _pass(model, val, cfg, device, progress=False)
    target = float(ckpt["thresholds"].get("target_sensitivity", cfg.train.target_sensitivity))
    threshold = referral_threshold(preds, target)  # as a training run chooses it
    m = classification_metrics(preds.dr_probs, preds.dme_probs, preds.dr_true, preds.dme_true, threshold)
    validation = validation_numbers(m)
    ckpt["thresholds"] = {**ckpt["thresholds"], "referable": threshold}
    ckpt["metrics"] = {"validation": {k: float(v) for k, v in validation.items() if v is not None}}
    ckpt["model_state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint(output, ckpt)
    return {"output": str(output), "model_version": ckpt["model_version"], "alpha": alpha, "threshold": threshold,
            "validation": ckpt["metrics"]["validation"]}

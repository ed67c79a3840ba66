"""Losses: a small functional core and one thin class that combines them.

Every function takes per-sample label availability into account: a sample without lesion masks
contributes no segmentation loss (it must not teach "no lesions"), a sample without a DR grade no
DR loss, and so on. When no sample in a batch has a label, that term is an exact zero that still
keeps the graph connected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from training.data.records import DME_PRESENT

if TYPE_CHECKING:
    from training.model import MultiTaskOutput


def _check(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.sum() * 0.0


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per (sample, channel), averaged. logits/target: (N, C, H, W)."""
    _check("logits", logits, 4)
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match")
    probs = torch.sigmoid(logits)
    dims = (2, 3)
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def masked_bce_dice(
    seg_logits: torch.Tensor, masks: torch.Tensor, has_masks: torch.Tensor, bce_weight: float = 0.5
) -> torch.Tensor:
    """BCE + Dice over the samples whose masks are known. has_masks: (N,) bool."""
    _check("seg_logits", seg_logits, 4)
    if has_masks.shape != (seg_logits.shape[0],):
        raise ValueError(f"has_masks must have shape ({seg_logits.shape[0]},), got {tuple(has_masks.shape)}")
    if not bool(has_masks.any()):
        return _zero(seg_logits)
    logits, target = seg_logits[has_masks], masks[has_masks].to(seg_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce_weight * bce + (1.0 - bce_weight) * soft_dice_loss(logits, target)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over samples with target >= 0 (-1 = unknown)."""
    _check("logits", logits, 2)
    known = target >= 0
    if not bool(known.any()):
        return _zero(logits)
    return F.cross_entropy(logits[known], target[known], weight=weight)


def dme_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DME risk loss. Exact grades 0/1/2 -> cross-entropy; code 3 ("present, grade unknown", e.g. a
    binary maculopathy flag) -> -log P(grade 1 or 2), the marginal likelihood of what is known."""
    _check("dme logits", logits, 2)
    if logits.shape[1] != 3:
        raise ValueError(f"DME logits must have 3 classes, got shape {tuple(logits.shape)}")
    exact = (target >= 0) & (target <= 2)
    present = target == DME_PRESENT
    n = int(exact.sum()) + int(present.sum())
    if n == 0:
        return _zero(logits)
    total = _zero(logits)
    if bool(exact.any()):
        total = total + F.cross_entropy(logits[exact], target[exact], reduction="sum")
    if bool(present.any()):
        lp = logits[present]
        total = total + (torch.logsumexp(lp, 1) - torch.logsumexp(lp[:, 1:], 1)).sum()
    return total / n


LOSS_PARTS: tuple[str, ...] = ("total", "dr", "dme", "seg")
"""The loss terms, in :class:`LossParts` order; the training history names them ``train_<part>`` and ``val_<part>``."""


@dataclass
class LossParts:
    total: torch.Tensor
    dr: torch.Tensor
    dme: torch.Tensor
    seg: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in LOSS_PARTS}


class MultiTaskLoss(nn.Module):
    """total = cls_weight * ((1 - dme_weight) * DR-CE + dme_weight * DME) + seg_weight * (BCE + Dice)."""

    dr_class_weights: torch.Tensor | None  # a buffer: moves with the module, saved with its state

    def __init__(
        self, cls_weight: float = 0.4, seg_weight: float = 0.6, dme_weight: float = 0.5,
        dr_class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cls_weight, self.seg_weight, self.dme_weight = cls_weight, seg_weight, dme_weight
        self.register_buffer("dr_class_weights", dr_class_weights if dr_class_weights is not None else None)

    def forward(self, out: MultiTaskOutput, batch: dict[str, torch.Tensor]) -> LossParts:
        dr = masked_cross_entropy(out.dr_logits, batch["dr"], self.dr_class_weights)
        dme = dme_loss(out.dme_logits, batch["dme"])
        seg = masked_bce_dice(out.seg_logits, batch["masks"], batch["has_masks"])
        cls = (1.0 - self.dme_weight) * dr + self.dme_weight * dme
        return LossParts(self.cls_weight * cls + self.seg_weight * seg, dr, dme, seg)


def inverse_frequency_weights(counts: list[int] | torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """Class weights ~ (1/frequency)^power, normalised to mean 1; unseen classes get the largest weight."""
    c = torch.as_tensor(counts, dtype=torch.float32)
    seen = c > 0
    w = torch.zeros_like(c)
    w[seen] = (c[seen].sum() / c[seen]) ** power
    if bool((~seen).any()):
        w[~seen] = w[seen].max() if bool(seen.any()) else 1.0
    return w / w.mean()

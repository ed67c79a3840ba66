"""A network that reads an eye's *chirality*: which eye a fundus photo shows, whatever way up the camera showed it.

Why: some cameras (EyePACS's, here) rotate whole patients by 180 degrees. A rotation keeps a right eye a right eye;
only a mirror image makes it look like the other eye. So the eye is a chiral property of the picture, and a network
shown every photo both as it is and rotated by 180 degrees (same eye) and mirrored (the other eye) must learn cues
that survive the rotation: the fovea's place below the disc (which :mod:`training.laterality`'s landmarks also
read), the arcades' course, the disc's shape and cup. E12 (experiments/README.md) measured what it adds.

Functional core, as in :mod:`training.losses`: :func:`chirality_input` (the photo as the network sees it),
:func:`view_batch` and :func:`chirality_logit` (four views, the mirrored ones' answers negated, so the answer is
exactly invariant to a rotation by 180 degrees and exactly inverted by a mirror), :func:`augment` (one random
training view and its label), :func:`train_epoch`; :func:`fit_chirality` is the loop, checkpointed every epoch and
resumed exactly (model, optimiser, scheduler and random state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.common import atomic_write
from training.data.transforms import resize_square, subtract_local_mean
from training.model import IMAGENET_MEAN, IMAGENET_STD
from training.model.encoder import ResNetEncoder

STORE = 256  # the photo is kept at this size (square fundus crop, local-mean contrast) ...
CROP = 224  # ... and the network sees this centre (training: a jittered) crop of it
MEAN = np.array(IMAGENET_MEAN, np.float32)  # the grading network's normalisation, whose encoder starts this one
STD = np.array(IMAGENET_STD, np.float32)


class ChiralityNet(nn.Module):
    """ResNet encoder -> global average pool -> one logit, > 0 for a right eye."""

    def __init__(self, backbone: str = "resnet18", dropout: float = 0.3) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = ResNetEncoder(backbone)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_channels[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(F.adaptive_avg_pool2d(self.encoder(x)[-1], 1).flatten(1)).squeeze(1)
        return logits


class ChiralityEnsemble(nn.Module):
    """Several :class:`ChiralityNet` trained alike from different seeds; the logit is their mean (E13: one network's
    errors are partly its own draw). A mean of answers that each ignore a rotation and flip under a mirror does too,
    so the four-view guarantees hold exactly."""

    def __init__(self, members: Sequence[ChiralityNet]) -> None:
        super().__init__()
        if not members or len({m.backbone for m in members}) != 1:
            raise ValueError("an ensemble needs at least one network, all of one backbone")
        self.members = nn.ModuleList(members)
        self.backbone = members[0].backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def chirality_input(square: np.ndarray, store: int = STORE) -> np.ndarray:
    """The square fundus crop (RGB uint8, any size) at ``store`` px with the local-mean contrast the grading
    network also uses (so every camera's colour cast is gone)."""
    if square.ndim != 3 or square.shape[2] != 3 or square.shape[0] != square.shape[1]:
        raise ValueError(f"expected the square fundus crop (S, S, 3), got {square.shape}")
    return subtract_local_mean(resize_square(np.ascontiguousarray(square), store))


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float."""
    x = (batch.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def view_batch(img: np.ndarray, crop: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """The four views of one stored photo (as is, rotated by 180 degrees, mirrored left-right, mirrored top-bottom)
    and the sign to apply to each view's logit (-1: mirrored, so its answer names the other eye)."""
    o = (img.shape[0] - crop) // 2
    c = img[o:o + crop, o:o + crop]
    views = np.stack([c, c[::-1, ::-1], c[:, ::-1], c[::-1, :]])
    return views, np.array([1.0, 1.0, -1.0, -1.0], np.float32)


@torch.no_grad()
def chirality_logits(net: nn.Module, images: np.ndarray, batch: int = 16, crop: int = CROP) -> np.ndarray:
    """The logit (> 0: right eye) of each stored photo (N, S, S, 3), the four views averaged."""
    net.eval()
    out = np.zeros(len(images), np.float64)
    for s in range(0, len(images), batch):
        chunk = [view_batch(np.asarray(im), crop) for im in images[s:s + batch]]
        x = to_tensor(np.concatenate([v for v, _ in chunk]))
        sign = torch.from_numpy(np.concatenate([g for _, g in chunk]))
        logits = (net(x).float() * sign).view(len(chunk), 4).mean(1)
        out[s:s + len(chunk)] = logits.numpy()
    return out


def chirality_logit(net: nn.Module, square: np.ndarray) -> float:
    """The logit (> 0: right eye) of one square fundus crop."""
    return float(chirality_logits(net, chirality_input(square)[None])[0])


def augment(img: np.ndarray, label: float, rng: np.random.Generator, crop: int = CROP) -> tuple[np.ndarray, float]:
    """One random training view of a stored photo: rotated by 180 degrees (same eye) or not, mirrored (the other
    eye: the label flips) or not; then a small rotation (+-20 degrees), scale (+-10 %) and shift, a jittered crop,
    and brightness and contrast (the camera varies)."""
    size = img.shape[0]
    if rng.random() < 0.5:
        img = img[::-1, ::-1]
    if rng.random() < 0.5:
        img = img[:, ::-1]
        label = 1.0 - label
    m = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-20, 20)), float(rng.uniform(0.9, 1.1)))
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * size
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (size, size), borderValue=(0, 0, 0))
    jitter = max(1, (size - crop) // 4)
    o = (size - crop) // 2 + rng.integers(-jitter, jitter + 1, 2)
    o = np.clip(o, 0, size - crop)
    out = img[o[0]:o[0] + crop, o[1]:o[1] + crop].astype(np.float32)
    out = (out - 128.0) * rng.uniform(0.8, 1.2) + 128.0 + rng.uniform(-10, 10)
    return np.clip(out, 0, 255).astype(np.uint8), label


def train_epoch(net: nn.Module, images: np.ndarray, labels: np.ndarray, optimizer: torch.optim.Optimizer,
                scheduler: Any, rng: np.random.Generator, batch: int, crop: int = CROP) -> float:
    """One pass over the photos in a random order, each in one random view; the mean loss."""
    net.train()
    order = rng.permutation(len(images))
    losses = []
    for s in range(0, len(order) - batch + 1, batch):
        xs, ys = zip(*(augment(np.asarray(images[k]), float(labels[k]), rng, crop) for k in order[s:s + batch]))
        loss = F.binary_cross_entropy_with_logits(net(to_tensor(np.stack(xs))), torch.tensor(ys, dtype=torch.float32))
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def fit_chirality(images: np.ndarray, labels: np.ndarray, *, epochs: int, checkpoint: Path,
                  encoder_state: dict[str, torch.Tensor] | None = None, backbone: str = "resnet18",
                  lr: float = 3e-4, batch: int = 32, crop: int = CROP, seed: int = 0,
                  on_epoch: Callable[[int, float, ChiralityNet], None] | None = None) -> ChiralityNet:
    """Train a :class:`ChiralityNet` on stored photos (N, S, S, 3) and 0/1 labels (1 = right eye).

    ``encoder_state``: where to start the encoder (the grading network's, trained on fundus photos; random when
    None). ``checkpoint`` is written after every epoch and, when it exists, resumed from exactly: the same weights
    as an uninterrupted run. ``on_epoch(epoch, loss, net)`` reports progress."""
    if len(images) != len(labels) or len(images) < batch:
        raise ValueError(f"need at least {batch} photos with one label each, got {len(images)} photos, {len(labels)} labels")
    torch.manual_seed(seed)
    net = ChiralityNet(backbone)
    if encoder_state is not None:
        net.encoder.load_state_dict(encoder_state)
    optimizer = torch.optim.AdamW([{"params": net.encoder.parameters(), "lr": lr},
                                   {"params": net.head.parameters(), "lr": lr * 10}], weight_decay=1e-4)
    steps = max(1, epochs * (len(images) // batch))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, lr * 10], total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    start = 0
    if checkpoint.is_file():
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - damaged, cut short, or not this run's file
            raise ValueError(f"{checkpoint}: not a readable chirality run checkpoint ({type(exc).__name__}); delete it "
                             "to start the run again") from None
        if state.get("epochs") != epochs or state.get("photos") != len(images):
            raise ValueError(f"{checkpoint}: a run of {state.get('epochs')} epochs on {state.get('photos')} photos, not "
                             f"{epochs} on {len(images)}; delete it to start again")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = int(state["epoch"])
    for epoch in range(start, epochs):
        t0 = time.monotonic()
        loss = train_epoch(net, images, labels, optimizer, scheduler, rng, batch, crop)
        state = {"epoch": epoch + 1, "epochs": epochs, "photos": len(images), "model": net.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "seconds": time.monotonic() - t0}
        checkpoint.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path, state: dict[str, Any] = state) -> None:
            torch.save(state, tmp)

        atomic_write(checkpoint, write)
        if on_epoch is not None:
            on_epoch(epoch + 1, loss, net)
    net.eval()
    return net


def _half(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v).clone() for k, v in net.state_dict().items()}


def _single(backbone: str, state: dict[str, torch.Tensor]) -> ChiralityNet:
    net = ChiralityNet(backbone)
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    return net


def pack_net(net: ChiralityNet | ChiralityEnsemble) -> dict[str, Any]:
    """The network as plain tensors (half precision: the logit moves by < 1e-2) for the laterality model file: one
    ``state``, or an ensemble's ``members`` (one state each)."""
    if isinstance(net, ChiralityEnsemble):
        return {"backbone": net.backbone, "members": [_half(m) for m in net.members]}
    return {"backbone": net.backbone, "state": _half(net)}


def unpack_net(packed: dict[str, Any]) -> ChiralityNet | ChiralityEnsemble:
    """The network (or ensemble) :func:`pack_net` stored, in float32, ready to evaluate."""
    backbone = str(packed["backbone"])
    net: ChiralityNet | ChiralityEnsemble
    if "members" in packed:
        if not isinstance(packed["members"], list) or not packed["members"]:
            raise ValueError("'members' must be a non-empty list of network states")
        net = ChiralityEnsemble([_single(backbone, state) for state in packed["members"]])
    else:
        net = _single(backbone, packed["state"])
    net.eval()
    return net


__all__ = ["CROP", "STORE", "ChiralityEnsemble", "ChiralityNet", "augment", "chirality_input", "chirality_logit", "chirality_logits",
           "fit_chirality", "pack_net", "to_tensor", "train_epoch", "unpack_net", "view_batch"]

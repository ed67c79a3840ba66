"""Gradability: is a photo good enough to grade, and if not, why. Measurements of the photo and the learned verdict.

Why measurements and a small learned model: a grader calls a photo ungradable when it is too dark or washed out,
out of focus, veiled by a media opacity, cut off or obscured, or not a fundus photo at all. Each of those shows in a
few image-quality measurements (:func:`measure`): the illuminated field's size, shape and position in the frame;
the exposure histogram inside it; the energy in fine, middle and coarse detail bands (defocus and motion blur take
the fine bands away first); local contrast and the dark-channel level (a haze lifts the darkest pixels and flattens
contrast); the evenness of the illumination (eyelash and pupil-edge shadows); the vessel network (dark thin lines)
and a bright disc; the colour of the field. Hand-set thresholds on such numbers rejected dark but perfectly
gradable EyePACS photos (issue 13), so the decision is *learned* (``dr-train fit-quality``,
:mod:`training.fit_quality`): a small multi-label network (one hidden layer) on the standardised measurements,
trained on real gradable photos, realistic degradations of them (:mod:`training.degrade`) and pictures that are not
fundus photos, with one probability per reason and per-reason thresholds chosen on a patient-level validation split.

Beside the network, one physiological rule refuses pictures whose colours no fundus has (:func:`blue_over_red`):
the retina and choroid return red light most and blue least (blue is absorbed by the lens and the macular pigment),
so in a colour fundus photo blue seldom exceeds red, even in photos with a strong green or bluish cast (the most in
any real training or validation photo here: 54 % of the field); a picture where it does over more of the field
than that (``colour_rule.blue_over_red_max``, chosen by ``dr-train fit-quality`` with a margin above every real
training and validation photo) is refused as ``not_fundus`` whatever the network says. The network alone graded a
purple-blue recolouring of a fundus photo (issue 13): a learned boundary has no such guarantee outside its samples.

The fitted model is a dict of plain tensors and lists (``torch.load(weights_only=True)`` reads it) and is applied
here with numpy (:func:`assess`): no pickled scikit-learn object ever reaches the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from training.checkpoint import CheckpointError, load_fitted
from training.common import FUNDUS_THRESHOLD
from training.labels import REASON_TEXT, REASONS

QUALITY_FORMAT = "dr-quality-1"

MEASURE_SIDE = 256  # texture is measured on the field cropped square at this size; geometry on the frame at this long side
_BANDS = (0.7, 1.4, 2.8, 5.6, 11.2)

FEATURE_NAMES: tuple[str, ...] = (
    # geometry of the illuminated field in the frame
    "lit_frac", "field_frac", "components", "solidity", "bbox_fill", "circle_fill", "aspect", "offset_x", "offset_y",
    "border_lit", "corner_lit", "field_diameter",
    # exposure
    "lum_p5", "lum_p50", "lum_p95", "vmax_p99", "dark_frac", "saturated_frac", "red_saturated_frac",
    # colour
    "chroma_r", "chroma_g", "chroma_b", "log_r_over_b", "log_r_over_g", "saturation", "saturation_std",
    # contrast and haze
    "green_cv", "local_contrast", "lum_range", "dark_channel", "min_over_max",
    # detail bands (green, normalised by its mean): log energy per band and ratios of fine to coarse
    *(f"band{k}" for k in range(1, 5)), "fine_over_mid", "fine_over_coarse", "mid_over_coarse", "laplacian",
    # illumination evenness
    "illum_cv", "shadow_frac", "glare_frac", "quadrant_ratio",
    # anatomy: vessels (dark thin lines) and a bright disc
    "vessel_frac", "vessel_strong_frac", "vessel_mean", "disc_peak",
)


def _resize_long(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _channel_max(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]))


def _lit_threshold(cmax: np.ndarray) -> float:
    """The fundus threshold, lowered for a dark photo so that its (dim) field is still found: a quarter of the
    frame's bright level, never above :data:`FUNDUS_THRESHOLD` nor below 3."""
    return float(min(FUNDUS_THRESHOLD, max(3.0, 0.2 * float(np.percentile(cmax, 99)))))


def _smooth(img: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian of ``img`` inside ``mask`` only (normalised convolution: the black surround does not bleed in)."""
    m = mask.astype(np.float32)
    num = cv2.GaussianBlur(img * m, (0, 0), sigma)
    den = cv2.GaussianBlur(m, (0, 0), sigma)
    return num / np.maximum(den, 1e-3)


@dataclass(frozen=True)
class _Field:
    lit: np.ndarray  # (h, w) bool, the frame at <= MEASURE_SIDE long side
    component: np.ndarray  # the largest lit component
    bbox: tuple[int, int, int, int]  # x, y, w, h of the component in that frame
    scale: float  # original pixels per small-frame pixel


def _field(rgb: np.ndarray) -> _Field:
    small = _resize_long(rgb, MEASURE_SIDE)
    cmax = _channel_max(small)
    lit = cmax > _lit_threshold(cmax)
    lit = cv2.morphologyEx(lit.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(lit.astype(np.uint8), connectivity=8)
    if n <= 1:
        comp = np.zeros_like(lit)
        bbox = (0, 0, small.shape[1], small.shape[0])
    else:
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        comp = labels == k
        x, y, w, h = (int(v) for v in stats[k, :4])
        bbox = (x, y, w, h)
    return _Field(lit, comp, bbox, rgb.shape[1] / small.shape[1])


def _square_crop(rgb: np.ndarray, f: _Field) -> np.ndarray:
    """The field's bounding box out of the full-resolution frame, padded black to a square, at MEASURE_SIDE."""
    x, y, w, h = f.bbox
    s = f.scale
    x0, y0 = int(x * s), int(y * s)
    x1, y1 = min(rgb.shape[1], int(np.ceil((x + w) * s))), min(rgb.shape[0], int(np.ceil((y + h) * s)))
    crop = rgb[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    side = max(crop.shape[:2])
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square = np.zeros((side, side, 3), np.uint8)
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    interp = cv2.INTER_AREA if side >= MEASURE_SIDE else cv2.INTER_LINEAR
    return cv2.resize(square, (MEASURE_SIDE, MEASURE_SIDE), interpolation=interp)


def _geometry(f: _Field) -> list[float]:
    h, w = f.lit.shape
    area = float(f.component.sum())
    frame = float(h * w)
    n, _, stats, _ = cv2.connectedComponentsWithStats(f.lit.astype(np.uint8), connectivity=8)
    big = int((stats[1:, cv2.CC_STAT_AREA] > 0.005 * frame).sum()) if n > 1 else 0
    if area > 0:
        contours, _ = cv2.findContours(f.component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = cv2.convexHull(np.concatenate(contours))
        solidity = area / max(float(cv2.contourArea(hull)), 1.0)
        ys, xs = np.nonzero(f.component)
        off_x = abs(float(xs.mean()) - (w - 1) / 2) / w
        off_y = abs(float(ys.mean()) - (h - 1) / 2) / h
    else:
        solidity, off_x, off_y = 0.0, 0.5, 0.5
    _, _, bw, bh = f.bbox
    side = max(bw, bh, 1)
    border = np.concatenate([f.lit[0], f.lit[-1], f.lit[:, 0], f.lit[:, -1]])
    c = max(2, int(0.1 * min(h, w)))
    corners = np.concatenate([f.lit[:c, :c].ravel(), f.lit[:c, -c:].ravel(), f.lit[-c:, :c].ravel(), f.lit[-c:, -c:].ravel()])
    return [
        float(f.lit.mean()), area / frame, float(np.log1p(big)), solidity, area / max(bw * bh, 1),
        area / (np.pi * (side / 2) ** 2), bw / max(bh, 1), off_x, off_y, float(border.mean()), float(corners.mean()),
        float(np.sqrt(4 * area / np.pi)) / min(h, w),
    ]


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")


def _lit_square(rgb: np.ndarray) -> tuple[_Field, np.ndarray, np.ndarray]:
    """The field in the frame, the field cropped square at :data:`MEASURE_SIDE` and its lit pixels (all of them
    when almost nothing is lit)."""
    f = _field(rgb)
    sq = _square_crop(rgb, f)
    cmax = _channel_max(sq)
    field = cmax > _lit_threshold(cmax)
    if field.sum() < 50:  # nothing lit: measure the whole square
        field = np.ones(field.shape, bool)
    return f, sq, field


def _blue_over_red(sq: np.ndarray, field: np.ndarray) -> float:
    return float((sq[..., 2][field].astype(np.int16) > sq[..., 0][field].astype(np.int16)).mean())


def measure(rgb: np.ndarray) -> np.ndarray:
    """The measurements (:data:`FEATURE_NAMES`) of one photo: ``rgb`` is the whole frame as decoded (H, W, 3) uint8
    RGB, any size (the worker passes the file decoded at reduced size; training the same)."""
    return measure_all(rgb)[0]


def measure_all(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`measure` and :func:`blue_over_red` of one photo, finding its field once (what :func:`assess` needs)."""
    _check_rgb(rgb)
    f, sq, field = _lit_square(rgb)
    out = _geometry(f)
    inner = cv2.erode(field.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))).astype(bool)
    if inner.sum() < 50:
        inner = field
    x = sq.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    lum = (r + g + b) / 3
    vmax = _channel_max(sq)[field].astype(np.float32) / 255.0
    lp5, lp50, lp95 = (float(v) for v in np.percentile(lum[field], [5, 50, 95]))
    out += [lp5, lp50, lp95, float(np.percentile(vmax, 99)), float((lum[field] < 0.08).mean()),
            float((vmax >= 250 / 255).mean()), float((r[field] >= 250 / 255).mean())]

    mr, mg, mb = (float(c[field].mean()) for c in (r, g, b))
    total = max(mr + mg + mb, 1e-6)
    hsv = cv2.cvtColor(sq, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1][field].astype(np.float32) / 255.0
    out += [mr / total, mg / total, mb / total, float(np.log((mr + 0.01) / (mb + 0.01))),
            float(np.log((mr + 0.01) / (mg + 0.01))), float(sat.mean()), float(sat.std())]

    gmean = max(float(g[inner].mean()), 1e-3)
    gn = g / gmean
    local = gn - _smooth(gn, field, 8)
    dark = cv2.erode(np.minimum(np.minimum(r, g), b), np.ones((7, 7), np.uint8))
    out += [float(g[inner].std()) / gmean, float(local[inner].std()), (lp95 - lp5) / max(lp50, 1e-3),
            float(dark[inner].mean()) / max(float(lum[inner].mean()), 1e-3),
            float(np.median(np.minimum(np.minimum(r, g), b)[field])) / max(float(np.median(_channel_max(x)[field])), 1e-3)]

    levels = [gn] + [_smooth(gn, field, s) for s in _BANDS]
    energy = [float(((levels[k] - levels[k + 1])[inner] ** 2).mean()) + 1e-9 for k in range(len(_BANDS))]
    lap = cv2.Laplacian(gn, cv2.CV_32F, ksize=3)
    out += [float(np.log(e)) for e in energy[:4]]
    out += [float(np.log(energy[0] / energy[2])), float(np.log(energy[0] / energy[4])), float(np.log(energy[2] / energy[4])),
            float(np.log(float(lap[inner].var()) + 1e-9))]

    ill = _smooth(lum, field, 20)
    med = max(float(np.median(ill[inner])), 1e-3)
    hh = MEASURE_SIDE // 2
    quads = [float(ill[sl][inner[sl]].mean()) if inner[sl].any() else med
             for sl in ((slice(0, hh), slice(0, hh)), (slice(0, hh), slice(hh, None)),
                        (slice(hh, None), slice(0, hh)), (slice(hh, None), slice(hh, None)))]
    out += [float(ill[inner].std()) / med, float((ill[inner] < 0.5 * med).mean()), float((ill[inner] > 1.6 * med).mean()),
            min(quads) / max(max(quads), 1e-3)]

    g8 = (np.clip(gn * 128, 0, 255)).astype(np.uint8)
    bh = cv2.morphologyEx(g8, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))).astype(np.float32) / 128
    rel = lum / np.maximum(_smooth(lum, field, 25), 1e-3)
    disc = cv2.GaussianBlur(rel, (0, 0), 6)
    out += [float((bh[inner] > 0.06).mean()), float((bh[inner] > 0.12).mean()), float(bh[inner].mean()),
            float(disc[inner].max() - np.median(disc[inner]))]
    values = np.asarray(out, dtype=np.float64)
    if values.shape != (len(FEATURE_NAMES),):  # a programming error, not a data one
        raise AssertionError(f"measure() produced {values.shape[0]} values for {len(FEATURE_NAMES)} names")
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), _blue_over_red(sq, field)


# --------------------------------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class QualityVerdict:
    """The gradability of one photo: ``reasons`` (codes of :data:`REASONS`, most likely first) is empty for a
    gradable photo; ``scores`` holds every reason's probability, for the record."""

    reasons: tuple[str, ...]
    scores: dict[str, float]

    @property
    def gradable(self) -> bool:
        return not self.reasons

    @property
    def not_fundus(self) -> bool:
        return "not_fundus" in self.reasons

    def describe(self) -> str:
        """The reasons in words, for the report and the rejection note."""
        return "; ".join(REASON_TEXT[r] for r in self.reasons) if self.reasons else "gradable"


def _tensor(values: Any) -> torch.Tensor:
    return torch.tensor(np.asarray(values), dtype=torch.float64)


def pack_model(mean: np.ndarray, scale: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray],
               thresholds: dict[str, float], metrics: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The quality model as stored: plain tensors, lists and numbers (weights_only-safe)."""
    return {
        "format": QUALITY_FORMAT, "features": list(FEATURE_NAMES), "reasons": list(REASONS),
        "mean": _tensor(mean), "scale": _tensor(scale),
        "weights": [_tensor(w) for w in weights], "biases": [_tensor(b) for b in biases],
        "thresholds": {k: float(v) for k, v in thresholds.items()}, "metrics": metrics, "provenance": provenance,
    }


def scores(model: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """(N, len(REASONS)) probabilities of the stored network for (N, F) measurements: ReLU hidden layers, logistic
    outputs (exactly scikit-learn's MLPClassifier forward pass, in numpy)."""
    if features.ndim != 2 or features.shape[1] != len(model["features"]):
        raise ValueError(f"the quality model needs (N, {len(model['features'])}) measurements, got {features.shape}")
    h = (features - model["mean"].numpy()) / model["scale"].numpy()
    layers = list(zip(model["weights"], model["biases"]))
    for k, (w, b) in enumerate(layers):
        h = h @ w.numpy() + b.numpy()
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(h, -50, 50))), np.float64)


def blue_over_red(rgb: np.ndarray) -> float:
    """The share of the illuminated field (found as :func:`measure` finds it) where blue exceeds red: the colour
    rule's measurement (module docstring)."""
    _check_rgb(rgb)
    _, sq, field = _lit_square(rgb)
    return _blue_over_red(sq, field)


def colour_implausible(model: dict[str, Any], share: float | None) -> bool:
    """Whether the colour rule refuses a picture whose :func:`blue_over_red` share is ``share`` (never without a
    rule in the model, or without a share)."""
    rule = model.get("colour_rule")
    if not rule or share is None:
        return False
    return share > float(rule["blue_over_red_max"])


def verdicts(model: dict[str, Any], features: np.ndarray, blue_shares: np.ndarray | None = None) -> list[QualityVerdict]:
    """The verdict of each row of ``features``: every reason whose probability reaches its threshold, most likely
    first (relative to the threshold); ``not_fundus`` first whatever the network says when the colour rule refuses
    the row's ``blue_shares`` value (:func:`blue_over_red`)."""
    probs = scores(model, features)
    thresholds = np.array([model["thresholds"][r] for r in model["reasons"]])
    out = []
    for i, row in enumerate(probs):
        over = [(row[k] / thresholds[k], r) for k, r in enumerate(model["reasons"]) if row[k] >= thresholds[k]]
        reasons = [r for _, r in sorted(over, reverse=True)]
        if colour_implausible(model, None if blue_shares is None else float(blue_shares[i])) and "not_fundus" not in reasons:
            reasons.insert(0, "not_fundus")
        out.append(QualityVerdict(tuple(reasons), {r: round(float(row[k]), 4) for k, r in enumerate(model["reasons"])}))
    return out


def assess(model: dict[str, Any], rgb: np.ndarray) -> QualityVerdict:
    """The verdict for one photo (the whole decoded frame)."""
    features, share = measure_all(rgb)
    return verdicts(model, features[None], np.array([share]))[0]


class QualityModelError(CheckpointError):
    """The quality model file is missing, unreadable or not one this code can apply."""


def load_quality_model(path: str | Path) -> dict[str, Any]:
    """Read and check a file written by ``dr-train fit-quality``."""
    path = Path(path)
    model = load_fitted(path, what="gradability", command="fit-quality", setting="quality_model", error=QualityModelError)
    if not isinstance(model, dict) or model.get("format") != QUALITY_FORMAT:
        raise QualityModelError(f"{path}: not a gradability model of format {QUALITY_FORMAT!r}; refit it with `dr-train fit-quality`")
    if tuple(model["features"]) != FEATURE_NAMES or tuple(model["reasons"]) != REASONS:
        raise QualityModelError(f"{path}: fitted on other measurements or reasons than this code takes; refit it with "
                                "`dr-train fit-quality`")
    missing = [r for r in REASONS if r not in model["thresholds"]]
    if missing:
        raise QualityModelError(f"{path}: no threshold for {missing}; refit it with `dr-train fit-quality`")
    rule = model.get("colour_rule")
    if rule is not None and not (isinstance(rule, dict) and isinstance(rule.get("blue_over_red_max"), (int, float))
                                 and 0 < float(rule["blue_over_red_max"]) <= 1):
        raise QualityModelError(f"{path}: 'colour_rule' must hold 'blue_over_red_max', a share in (0, 1]; refit it with "
                                "`dr-train fit-quality`")
    return dict(model)


__all__ = [
    "FEATURE_NAMES", "MEASURE_SIDE", "QUALITY_FORMAT", "REASONS", "REASON_TEXT", "QualityModelError", "QualityVerdict",
    "assess", "blue_over_red", "colour_implausible", "load_quality_model", "measure", "measure_all", "pack_model", "scores",
    "verdicts",
]

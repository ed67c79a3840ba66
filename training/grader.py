"""Lesion-evidence grader: DR grade and DME presence from measured lesion evidence, by logistic regression.

Why: trained from scratch on ~340 graded photos with two CPU cores, the network's DR head stayed at
chance (training loss = ln 5, see experiments/README.md E2/E3), while simple measurements of lesion
evidence on the contrast-normalised image already separate referable from non-referable eyes on
the validation split. ICDR grades are defined by lesions, so the product grades from that evidence:

* ``lesion_features``: on the local-mean-contrast image, the share of the fundus covered by bright
  and yellow-bright pixels (exudate / cotton-wool candidates) and dark pixels (haemorrhage, vessel)
  at several thresholds, small dark and bright blobs (morphological black/white top-hat, the
  microaneurysm / exudate scale), brightness percentiles and colour spread.
* two logistic regressions on standardised features (scikit-learn, class-balanced): DR grade 0-4
  (multinomial) and DME risk present (binary; a binary "maculopathy" flag counts as present).
* DME grade 1 vs 2 is split by the network's DME head (its relative P(1) : P(2)).
* optionally (``dr-train fit-grader --with-segmentation``, experiments E6) the network's own lesion maps
  join the evidence: per lesion (MA, HE, EX, SE) the share of the fundus above 0.5, the mean probability,
  the number of separate spots and the 99.9th percentile (:data:`SEG_FEATURE_NAMES`).

The fitted parameters are stored in the checkpoint (``grader``: plain tensors, weights_only-safe);
the worker and the evaluation apply exactly :func:`apply_grader`.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from training.common import PATHOLOGY_CODES
from training.data.transforms import fundus_mask, subtract_local_mean
from training.metrics import referable_score

FEATURE_NAMES: tuple[str, ...] = (
    *(f"bright>{t}" for t in (150, 170, 190, 210)),
    *(f"yellow>{t}" for t in (150, 170, 190, 210)),
    *(f"dark<{t}" for t in (100, 80, 60)),
    *(f"{kind}{k}>{t}" for k in (5, 9) for kind in ("blackhat", "tophat") for t in (12, 20)),
    *(f"lum_p{p}" for p in (1, 5, 50, 95, 99)),
    "std_r", "std_g", "std_b",
)


SEG_LESIONS: tuple[str, ...] = PATHOLOGY_CODES  # channels 0..3 of the lesion head; OD is anatomy
SEG_FEATURE_NAMES: tuple[str, ...] = tuple(
    f"seg_{c}_{k}" for c in SEG_LESIONS for k in ("area50", "mean", "spots", "p999"))
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "image": FEATURE_NAMES,
    "image+segmentation": FEATURE_NAMES + SEG_FEATURE_NAMES,
}


def _field(image: np.ndarray) -> np.ndarray:
    """The illuminated fundus, eroded by a rim (kernel scales with the image side / 256)."""
    scale = image.shape[0] / 256
    field = fundus_mask(image).astype(np.uint8)
    field = cv2.erode(field, np.ones((max(3, int(15 * scale)),) * 2, np.uint8)).astype(bool)
    return field if field.any() else np.ones(image.shape[:2], bool)


def segmentation_features(image: np.ndarray, seg_probs: np.ndarray) -> np.ndarray:
    """Lesion-map evidence of one image: ``seg_probs`` (5, S, S) sigmoid outputs for the (S, S, 3) ``image``."""
    if seg_probs.ndim != 3 or seg_probs.shape[0] < len(SEG_LESIONS) or seg_probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"seg_probs must have shape (5, {image.shape[0]}, {image.shape[1]}), got {seg_probs.shape}")
    field = _field(image)
    out: list[float] = []
    for k in range(len(SEG_LESIONS)):
        p = seg_probs[k].astype(np.float32)
        inside = p[field]
        hot = ((p > 0.5) & field).astype(np.uint8)
        spots = cv2.connectedComponents(hot, connectivity=8)[0] - 1
        out += [float((inside > 0.5).mean()), float(inside.mean()), float(np.log1p(spots)),
                float(np.percentile(inside, 99.9))]
    return np.asarray(out, dtype=np.float64)


FEATURE_SIDE = 256  # image measurements are taken at most at this size (same evidence, 4x cheaper at 512 px)


def lesion_features(image: np.ndarray) -> np.ndarray:
    """Features of one preprocessed fundus image (S, S, 3) uint8 RGB, measured on it shrunk to at most
    :data:`FEATURE_SIDE` px (validation: the same AUC at 256 and 512 px once lesion maps join, E6); kernel
    sizes scale with S/256 for smaller images."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (S, S, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if image.shape[0] > FEATURE_SIDE:
        image = cv2.resize(image, (FEATURE_SIDE, FEATURE_SIDE), interpolation=cv2.INTER_AREA)
    scale = image.shape[0] / 256
    e = subtract_local_mean(image).astype(np.float32)
    field = _field(image)
    g, b = e[..., 1], e[..., 2]
    lum = (e[..., 0] + e[..., 1] + e[..., 2]) / 3  # = e.mean(axis=2) exactly (whole numbers), 12x faster
    f: list[float] = [((lum > t) & field).mean() for t in (150, 170, 190, 210)]
    f += [((g > t) & (b < t - 30) & field).mean() for t in (150, 170, 190, 210)]
    f += [((lum < t) & field).mean() for t in (100, 80, 60)]
    green = image[..., 1]
    for k in (5, 9):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(3, int(k * scale)) | 1,) * 2)
        for op in (cv2.MORPH_BLACKHAT, cv2.MORPH_TOPHAT):
            th = cv2.morphologyEx(green, op, kernel)
            f += [((th > t) & field).mean() for t in (12, 20)]
    f += list(np.percentile(lum[field], [1, 5, 50, 95, 99]))
    f += list(np.std(e[field], axis=0))
    return np.asarray(f, dtype=np.float64)


def features_of(
    images: list[np.ndarray],
    seg_probs: np.ndarray | list[np.ndarray] | None = None,
    image_features: np.ndarray | None = None,
) -> np.ndarray:
    """(N, F) features: the image measurements, followed by the lesion-map ones when ``seg_probs`` is given.

    ``image_features``: the (N, len(FEATURE_NAMES)) image measurements of ``images`` if already taken (the
    worker measures the next image while the current one finishes); they depend on the image alone.
    """
    names = FEATURE_SETS["image" if seg_probs is None else "image+segmentation"]
    if not images:
        return np.zeros((0, len(names)))
    if seg_probs is not None and len(seg_probs) != len(images):
        raise ValueError(f"{len(images)} images but {len(seg_probs)} lesion maps")
    if image_features is None:
        image_features = np.stack([lesion_features(im) for im in images])
    elif image_features.shape != (len(images), len(FEATURE_NAMES)):
        raise ValueError(f"image_features must have shape ({len(images)}, {len(FEATURE_NAMES)}), got {image_features.shape}")
    if seg_probs is None:
        return image_features
    return np.stack([np.r_[image_features[i], segmentation_features(im, seg_probs[i])] for i, im in enumerate(images)])


def uses_segmentation(grader: dict[str, Any]) -> bool:
    """Whether the grader needs the network's lesion maps (:func:`features_of` with ``seg_probs``)."""
    return tuple(grader["features"]) == FEATURE_SETS["image+segmentation"]


def fit_grader(features: np.ndarray, dr: np.ndarray, dme: np.ndarray, c: float = 1.0) -> dict[str, Any]:
    """Fit on training-split features; ``dr`` -1 = unknown, ``dme`` -1 unknown, 0, 1/2/3 present."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    names = next((n for n in FEATURE_SETS.values() if features.ndim == 2 and features.shape[1] == len(n)), None)
    if names is None:
        raise ValueError(f"features must have shape (N, {len(FEATURE_NAMES)}) or (N, {len(FEATURE_SETS['image+segmentation'])}) "
                         f"(see training/grader.py FEATURE_SETS), got {features.shape}")
    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    kd, km = dr >= 0, dme >= 0
    if len(set(dr[kd].tolist())) != 5:
        raise ValueError(f"the DR grader needs all five grades in the training split, got {sorted(set(dr[kd].tolist()))}")
    m_dr = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x[kd], dr[kd])
    m_dme = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x[km], (dme[km] >= 1).astype(int))

    def t(values: Any) -> torch.Tensor:
        return torch.tensor(np.asarray(values), dtype=torch.float64)

    return {
        "kind": "lesion-evidence logistic regression", "features": list(names), "C": float(c),
        "mean": t(scaler.mean_), "scale": t(scaler.scale_),
        "dr_coef": t(m_dr.coef_), "dr_intercept": t(m_dr.intercept_),
        "dme_coef": t(m_dme.coef_), "dme_intercept": t(m_dme.intercept_),
        "n_train": int(kd.sum()),
    }


def grades_with_grader(grader: dict[str, Any], features: np.ndarray, heads_dr: np.ndarray,
                       heads_dme: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The DR and DME probabilities of a checkpoint that carries a grader: the regression's alone, or, with
    ``grader["heads_weight"]`` = w > 0, the blend w x the network's heads + (1 - w) x the regression (an ensemble,
    ``dr-train blend-grader``). The two err on different photos: the heads transfer worse to cameras the lesion
    stage never saw (EyePACS, Messidor-2), the regression worse to IDRiD and APTOS (experiments/README.md, E9)."""
    dr, dme = apply_grader(grader, features, heads_dme)
    w = float(grader.get("heads_weight", 0.0))
    if not 0.0 <= w < 1.0:
        raise ValueError(f"the grader's heads_weight must be in [0, 1), got {w}; refit it with `dr-train blend-grader`")
    return blend((heads_dr, heads_dme), (dr, dme), w) if w else (dr, dme)


def blend(heads: tuple[np.ndarray, np.ndarray], regression: tuple[np.ndarray, np.ndarray],
          w: float) -> tuple[np.ndarray, np.ndarray]:
    """(DR, DME) probabilities w x heads + (1 - w) x regression: still probabilities (each row sums to 1)."""
    return w * heads[0] + (1.0 - w) * regression[0], w * heads[1] + (1.0 - w) * regression[1]


def apply_grader(grader: dict[str, Any], features: np.ndarray, cnn_dme_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(DR probabilities (N, 5), DME probabilities (N, 3)) from features and the network's DME head."""
    if tuple(grader["features"]) not in FEATURE_SETS.values():
        raise ValueError("the checkpoint's grader was fitted on other features; refit it with `dr-train fit-grader`")
    if features.ndim != 2 or features.shape[1] != len(grader["features"]):
        raise ValueError(f"the grader needs (N, {len(grader['features'])}) features "
                         f"({'with' if uses_segmentation(grader) else 'without'} lesion maps), got {features.shape}")
    x = (features - grader["mean"].numpy()) / grader["scale"].numpy()
    logits = x @ grader["dr_coef"].numpy().T + grader["dr_intercept"].numpy()
    logits -= logits.max(axis=1, keepdims=True)
    dr = np.exp(logits)
    dr /= dr.sum(axis=1, keepdims=True)
    z = x @ grader["dme_coef"].numpy().T[:, 0] + grader["dme_intercept"].numpy()[0]
    present = 1.0 / (1.0 + np.exp(-z))
    split = cnn_dme_probs[:, 1:3] / np.clip(cnn_dme_probs[:, 1:3].sum(axis=1, keepdims=True), 1e-8, None)
    dme = np.c_[1.0 - present, present[:, None] * split]
    return dr, dme


HEADS_WEIGHT_GRID = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 .. 0.9: 1.0 would be the heads alone


def choose_heads_weight(
    heads: tuple[np.ndarray, np.ndarray], regression: tuple[np.ndarray, np.ndarray], referable: np.ndarray,
    sources: np.ndarray, patients: np.ndarray, folds: int = 5, seed: int = 0,
) -> tuple[float, list[float]]:
    """The blend weight of the heads for :func:`grades_with_grader`, chosen on validation photos as E9 did:
    in each of ``folds`` patient-grouped folds, the weight of :data:`HEADS_WEIGHT_GRID` with the best mean
    per-source referable AUC on the other folds; the median of those choices (and the choices, for the record).
    The mean over sources, not the pooled AUC, so that the largest set does not choose for the cameras it lacks."""
    from sklearn.metrics import roc_auc_score

    def mean_source_auc(w: float, idx: np.ndarray) -> float:
        dr, dme = blend((heads[0][idx], heads[1][idx]), (regression[0][idx], regression[1][idx]), w)
        score, y, src = referable_score(dr, dme), referable[idx], sources[idx]
        aucs = [roc_auc_score(y[src == s], score[src == s]) for s in np.unique(src) if len(np.unique(y[src == s])) == 2]
        if not aucs:
            raise ValueError("no source has both referable and non-referable validation photos: cannot choose a blend")
        return float(np.mean(aucs))

    unique = np.unique(patients)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = dict(zip(unique[order], np.arange(len(unique)) % folds, strict=True))
    fold = np.array([fold_of[p] for p in patients])
    chosen = []
    for k in range(folds):
        train = np.where(fold != k)[0]
        chosen.append(max(HEADS_WEIGHT_GRID, key=lambda w: mean_source_auc(w, train)))
    return float(np.median(chosen)), chosen

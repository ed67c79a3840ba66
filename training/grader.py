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

The fitted parameters are stored in the checkpoint (``grader``: plain tensors, weights_only-safe);
the worker and the evaluation apply exactly :func:`apply_grader`.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from training.data.transforms import subtract_local_mean

FEATURE_NAMES: tuple[str, ...] = (
    *(f"bright>{t}" for t in (150, 170, 190, 210)),
    *(f"yellow>{t}" for t in (150, 170, 190, 210)),
    *(f"dark<{t}" for t in (100, 80, 60)),
    *(f"{kind}{k}>{t}" for k in (5, 9) for kind in ("blackhat", "tophat") for t in (12, 20)),
    *(f"lum_p{p}" for p in (1, 5, 50, 95, 99)),
    "std_r", "std_g", "std_b",
)


def lesion_features(image: np.ndarray) -> np.ndarray:
    """Features of one preprocessed fundus image (S, S, 3) uint8 RGB; kernel sizes scale with S/256."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (S, S, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    scale = image.shape[0] / 256
    e = subtract_local_mean(image).astype(np.float32)
    field = (image.max(axis=2) > 12).astype(np.uint8)
    field = cv2.erode(field, np.ones((max(3, int(15 * scale)),) * 2, np.uint8)).astype(bool)
    if not field.any():
        field = np.ones(image.shape[:2], bool)
    g, b = e[..., 1], e[..., 2]
    lum = e.mean(axis=2)
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


def features_of(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([lesion_features(im) for im in images]) if images else np.zeros((0, len(FEATURE_NAMES)))


def fit_grader(features: np.ndarray, dr: np.ndarray, dme: np.ndarray, c: float = 1.0) -> dict[str, Any]:
    """Fit on training-split features; ``dr`` -1 = unknown, ``dme`` -1 unknown, 0, 1/2/3 present."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if features.ndim != 2 or features.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"features must have shape (N, {len(FEATURE_NAMES)}), got {features.shape}")
    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    kd, km = dr >= 0, dme >= 0
    if len(set(dr[kd].tolist())) != 5:
        raise ValueError(f"the DR grader needs all five grades in the training split, got {sorted(set(dr[kd].tolist()))}")
    m_dr = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x[kd], dr[kd])
    m_dme = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x[km], (dme[km] >= 1).astype(int))
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    return {
        "kind": "lesion-evidence logistic regression", "features": list(FEATURE_NAMES), "C": float(c),
        "mean": t(scaler.mean_), "scale": t(scaler.scale_),
        "dr_coef": t(m_dr.coef_), "dr_intercept": t(m_dr.intercept_),
        "dme_coef": t(m_dme.coef_), "dme_intercept": t(m_dme.intercept_),
        "n_train": int(kd.sum()),
    }


def apply_grader(grader: dict[str, Any], features: np.ndarray, cnn_dme_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(DR probabilities (N, 5), DME probabilities (N, 3)) from features and the network's DME head."""
    if list(grader["features"]) != list(FEATURE_NAMES):
        raise ValueError("the checkpoint's grader was fitted on other features; refit it with `dr-train fit-grader`")
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

"""Evaluation metrics for the DR multi-task network: pure functions on numpy arrays.

No torch here: callers pass softmax probabilities / sigmoid maps already moved to numpy.

Label conventions (see ``training.data.records``):

* DR grade: 0..4, ``-1`` unknown.
* DME grade: 0/1/2 exact, ``3`` = "DME risk present, grade unknown" (binary maculopathy flag), ``-1`` unknown.

Every metric is computed only on the samples whose labels it needs, and reports that ``n``.
An undefined metric (no samples, a single class, ...) is ``None`` with a ``*_reason`` string beside it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from training.data.records import DME_PRESENT, DME_UNKNOWN, DR_UNKNOWN
from training.labels import DME_GRADES, DR_GRADES, LESION_CODES

# training.labels, not training.model: importing metrics must not import torch
NUM_DR_GRADES = len(DR_GRADES)
NUM_DME_GRADES = len(DME_GRADES)
REFERABLE_UNKNOWN = -1

__all__ = [
    "LESION_CODES", "bootstrap_ci", "choose_threshold", "classification_metrics", "expected_calibration_error",
    "grouped_bootstrap_ci", "lesion_pr_curves", "per_patient", "referable_labels", "referable_score",
    "calibrated_referable", "fit_referable_calibration",
    "reliability_curve", "segmentation_metrics", "sensitivity_specificity", "validation_numbers",
]


# --------------------------------------------------------------------------------------------- validation
def _labels(name: str, x: Any, allowed: Sequence[int]) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer labels, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype} with non-integer values")
    a = a.astype(np.int64)
    bad = ~np.isin(a, np.asarray(allowed))
    if bad.any():
        raise ValueError(f"{name} (shape {a.shape}) holds values {sorted(set(a[bad].tolist()))[:10]} "
                         f"outside the allowed codes {list(allowed)}")
    return a


def _probs(name: str, x: Any, n_classes: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != n_classes:
        raise ValueError(f"{name} must have shape (N, {n_classes}), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} (shape {a.shape}) contains NaN or inf")
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6 or not np.allclose(a.sum(axis=1), 1.0, atol=1e-2)):
        raise ValueError(f"{name} (shape {a.shape}) must hold probabilities whose rows sum to 1 "
                         "(did you pass logits? apply softmax first)")
    return np.clip(a, 0.0, 1.0)


def _scores(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} (shape {a.shape}) contains NaN or inf")
    return a


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
        raise ValueError(f"arrays must have the same number of samples (rows): {shapes}")


def _f(x: Any) -> float | None:
    """A python float, or None for NaN / None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


# ------------------------------------------------------------------------------------- referable DR
def referable_labels(dr_true: Any, dme_true: Any, dme_unknown_as_absent: bool = False) -> np.ndarray:
    """Referable diabetic retinopathy from the grade labels: 1 referable, 0 not, -1 unknown.

    * 1 when DR grade >= 2 (moderate NPDR or worse) **or** any DME risk (codes 1, 2, or 3 = present,
      grade unknown) -- either one alone is enough, so the other label may be unknown.
    * 0 only when both are known and benign: DR grade in {0, 1} **and** DME grade 0.
    * -1 otherwise, e.g. DR 0/1 with DME unknown (the DME could make it referable), or DR unknown
      with DME 0.

    ``dme_unknown_as_absent``: for sets graded for DR only (APTOS, EyePACS), DR 0/1 counts as not
    referable, the usual "referable = DR >= 2" reading of those sets (an eye with DME but DR 0/1 is then
    mislabelled; such eyes are rare, and the model card says so).
    """
    dr = _labels("dr_true", dr_true, (DR_UNKNOWN, *range(NUM_DR_GRADES)))
    dme = _labels("dme_true", dme_true, (DME_UNKNOWN, *range(NUM_DME_GRADES), DME_PRESENT))
    _same_length(dr_true=dr, dme_true=dme)
    out = np.full(dr.shape, REFERABLE_UNKNOWN, dtype=np.int64)
    out[(dr >= 2) | np.isin(dme, (1, 2, DME_PRESENT))] = 1
    benign_dme = (dme == 0) | (dme == DME_UNKNOWN) if dme_unknown_as_absent else dme == 0
    out[np.isin(dr, (0, 1)) & benign_dme] = 0
    return out


def referable_score(dr_probs: Any, dme_probs: Any) -> np.ndarray:
    """Probability of referable DR: ``1 - P(DR in {0, 1}) * P(DME == 0)``.

    This treats the DR and DME heads as independent given the image (they are separate softmax
    heads, so there is no joint distribution); the two are positively correlated in reality, so the
    score is a monotone ranking score, not a calibrated probability.  Thresholds must be chosen on
    validation data with :func:`choose_threshold`.
    """
    dr = _probs("dr_probs", dr_probs, NUM_DR_GRADES)
    dme = _probs("dme_probs", dme_probs, NUM_DME_GRADES)
    _same_length(dr_probs=dr, dme_probs=dme)
    score: np.ndarray = np.clip(1.0 - (dr[:, 0] + dr[:, 1]) * dme[:, 0], 0.0, 1.0)
    return score


def fit_referable_calibration(y_true: Any, score: Any) -> dict[str, Any]:
    """Platt scaling of P(referable) on the logit of :func:`referable_score`: one slope, one intercept.

    Why the score itself and not only each head: ``1 - P(DR <= 1) * P(no DME)`` multiplies two heads as if
    they were independent, so temperature-scaling each head can still leave P(referable) over- or
    under-confident (experiments/README.md E7: its ECE rose from 0.111 to 0.132). Two parameters fitted on
    validation by maximum likelihood (scikit-learn's logistic regression, practically unregularised) cannot
    overfit hundreds of eyes, and a positive slope keeps the ranking, so AUC is unchanged. Unknown labels
    are left out.
    """
    from sklearn.linear_model import LogisticRegression

    y, s = _known_binary(y_true, score)
    if len(set(y.tolist())) < 2:
        raise ValueError("referable calibration needs referable and non-referable eyes with known labels; "
                         f"got {len(y)} known eyes of one class")
    z = _logit(s)[:, None]
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if not slope > 0:
        raise ValueError(f"referable calibration: fitted slope {slope:.3g} is not positive (the score does not rank "
                         "referable eyes above the others on this data); keep the uncalibrated score")
    return {"method": "platt", "slope": slope, "intercept": intercept, "n": int(len(y))}


def _logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), eps, 1.0 - eps)
    out: np.ndarray = np.log(q) - np.log1p(-q)
    return out


def calibrated_referable(dr_probs: Any, dme_probs: Any, calibration: Mapping[str, Any] | None = None) -> np.ndarray:
    """P(referable): :func:`referable_score`, mapped through the checkpoint's ``referable_calibration``
    (:func:`fit_referable_calibration`) when it has one. The referral threshold is chosen on this value."""
    s = referable_score(dr_probs, dme_probs)
    if not calibration:
        return s
    if calibration.get("method") != "platt":
        raise ValueError(f"referable_calibration: unknown method {calibration.get('method')!r} (expected 'platt'); "
                         "the checkpoint was written by a newer version: update the code")
    z = float(calibration["slope"]) * _logit(s) + float(calibration["intercept"])
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def _known_binary(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _labels("y_true", y_true, (REFERABLE_UNKNOWN, 0, 1))
    s = _scores("score", score)
    _same_length(y_true=y, score=s)
    keep = y != REFERABLE_UNKNOWN
    return y[keep], s[keep]


def choose_threshold(y_true: Any, score: Any, target_sensitivity: float = 0.90) -> float:
    """The highest threshold whose sensitivity on these data is >= ``target_sensitivity``.

    A sample is called positive when ``score >= threshold`` (sklearn's ``roc_curve`` convention).
    Labels -1 (unknown) are ignored.  Use validation data, never the test set.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    y, s = _known_binary(y_true, score)
    if y.size == 0 or y.min() == y.max():
        raise ValueError(f"choose_threshold needs both classes among the known labels; got "
                         f"{int((y == 1).sum())} positive and {int((y == 0).sum())} negative")
    _, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    # thresholds decrease, tpr increases: the first index reaching the target is the highest threshold.
    idx = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(thr[idx])  # idx >= 1 since tpr[0] == 0 < target, so this is a real score value


def sensitivity_specificity(y_true: Any, score: Any, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity of ``score >= threshold``; unknown (-1) labels are ignored."""
    y, s = _known_binary(y_true, score)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def _binary_auc(y: np.ndarray, s: np.ndarray) -> tuple[float | None, str | None]:
    if y.size == 0:
        return None, "no samples with a known label"
    if y.min() == y.max():
        return None, f"only one class present (all {int(y[0])}) among {y.size} samples"
    return float(roc_auc_score(y, s)), None


# ---------------------------------------------------------------------------------- classification
def classification_metrics(
    dr_probs: Any, dme_probs: Any, dr_true: Any, dme_true: Any, threshold: float | None = None,
    dme_unknown_as_absent: bool = False, referable_calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """DR grading, DME and referable-DR metrics; json-serialisable (python types only).

    * ``dr``: accuracy, quadratic-weighted kappa, per-class precision/recall/F1/support and the 5x5
      confusion matrix (rows = true grade, columns = predicted), over samples with a DR label.
    * ``dme``: exact-grade accuracy and 3x3 confusion matrix over labels 0/1/2; "DME present"
      accuracy and AUC over all known labels (0 vs 1/2/3 -- code 3 counts as present), predicted
      present = argmax in {1, 2}, score = P(1) + P(2).
    * ``referable``: AUC of :func:`calibrated_referable` (``referable_calibration`` applied when given), and
      sensitivity/specificity at ``threshold`` (None when no threshold is given).
    """
    dr_p = _probs("dr_probs", dr_probs, NUM_DR_GRADES)
    dme_p = _probs("dme_probs", dme_probs, NUM_DME_GRADES)
    dr_y = _labels("dr_true", dr_true, (DR_UNKNOWN, *range(NUM_DR_GRADES)))
    dme_y = _labels("dme_true", dme_true, (DME_UNKNOWN, *range(NUM_DME_GRADES), DME_PRESENT))
    _same_length(dr_probs=dr_p, dme_probs=dme_p, dr_true=dr_y, dme_true=dme_y)
    return {
        "n_samples": int(dr_y.shape[0]),
        "dr": _dr_metrics(dr_p, dr_y),
        "dme": _dme_metrics(dme_p, dme_y),
        "referable": _referable_metrics(dr_p, dme_p, dr_y, dme_y, threshold, dme_unknown_as_absent, referable_calibration),
    }


def validation_numbers(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The validation numbers a checkpoint records (``metrics.validation``) from :func:`classification_metrics`:
    kappa, referable AUC and DR accuracy (0.0 when undefined), sensitivity and specificity at its threshold."""
    dr, ref = metrics["dr"], metrics["referable"]
    return {"val_kappa": dr.get("quadratic_kappa") or 0.0, "val_ref_auc": ref.get("auc") or 0.0,
            "val_dr_acc": dr.get("accuracy") or 0.0,
            "val_sensitivity": ref.get("sensitivity"), "val_specificity": ref.get("specificity")}


def quadratic_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Quadratic-weighted Cohen kappa over the 5 DR grades; None when undefined (e.g. one grade only)."""
    if len(y_true) == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        k = cohen_kappa_score(y_true, y_pred, labels=list(range(NUM_DR_GRADES)), weights="quadratic")
    return _f(k)


def _dr_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    known = y != DR_UNKNOWN
    y, pred = y[known], p[known].argmax(axis=1)
    labels = list(range(NUM_DR_GRADES))
    out: dict[str, Any] = {"n": int(y.size)}
    if y.size == 0:
        out.update(accuracy=None, quadratic_kappa=None, per_class=None, confusion_matrix=None,
                   reason="no samples with a DR grade")
        return out
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    kappa = quadratic_kappa(y, pred)
    out.update(
        accuracy=float(np.mean(pred == y)),
        quadratic_kappa=kappa,
        per_class={"grade": labels, "precision": [float(v) for v in prec], "recall": [float(v) for v in rec],
                   "f1": [float(v) for v in f1], "support": [int(v) for v in sup]},
        confusion_matrix=confusion_matrix(y, pred, labels=labels).tolist(),
    )
    if kappa is None:
        out["quadratic_kappa_reason"] = "kappa undefined (agreement expected by chance is total, e.g. one grade only)"
    return out


def _dme_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    pred = p.argmax(axis=1)
    exact = np.isin(y, (0, 1, 2))
    out: dict[str, Any] = {
        "n_exact": int(exact.sum()),
        "accuracy": float(np.mean(pred[exact] == y[exact])) if exact.any() else None,
        "confusion_matrix": (confusion_matrix(y[exact], pred[exact], labels=[0, 1, 2]).tolist()
                             if exact.any() else None),
    }
    known = y != DME_UNKNOWN
    present_true = (y[known] >= 1).astype(np.int64)
    present_pred = np.isin(pred[known], (1, 2))
    auc, reason = _binary_auc(present_true, p[known, 1] + p[known, 2])
    out.update(
        n_present=int(known.sum()),
        n_present_positive=int(present_true.sum()),
        present_accuracy=float(np.mean(present_pred == present_true)) if known.any() else None,
        present_auc=auc,
    )
    if reason:
        out["present_auc_reason"] = reason
    return out


def _referable_metrics(dr_p: np.ndarray, dme_p: np.ndarray, dr_y: np.ndarray, dme_y: np.ndarray,
                       threshold: float | None, dme_unknown_as_absent: bool = False,
                       calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    y = referable_labels(dr_y, dme_y, dme_unknown_as_absent)
    s = calibrated_referable(dr_p, dme_p, calibration)
    known = y != REFERABLE_UNKNOWN
    auc, reason = _binary_auc(y[known], s[known])
    out: dict[str, Any] = {
        "n": int(known.sum()),
        "n_positive": int((y == 1).sum()),
        "n_negative": int((y == 0).sum()),
        "auc": auc,
    }
    if reason:
        out["auc_reason"] = reason
    if threshold is None:
        out.update(threshold=None, sensitivity=None, specificity=None)
    else:
        out.update(sensitivity_specificity(y, s, threshold))
    return out


# ---------------------------------------------------------------------------------- segmentation
def _seg_inputs(probs: Any, masks: Any, valid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(probs)
    if p.ndim != 4:
        raise ValueError(f"probs must have shape (N, L, H, W), got shape {p.shape}")
    m = np.asarray(masks)
    if m.shape != p.shape:
        raise ValueError(f"masks must have the same shape as probs {p.shape}, got shape {m.shape}")
    if valid is None:
        v = np.ones(p.shape[:2], dtype=bool)
    else:
        v = np.asarray(valid).astype(bool)
        if v.shape == p.shape[:1]:
            v = np.repeat(v[:, None], p.shape[1], axis=1)
        elif v.shape != p.shape[:2]:
            raise ValueError(f"valid must have shape (N,) = {p.shape[:1]} or (N, L) = {p.shape[:2]}, "
                             f"got shape {v.shape}")
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
        raise ValueError(f"probs (shape {p.shape}) must hold probabilities in [0, 1] (apply sigmoid first)")
    return p, m, v


def _pixel_sample(p: np.ndarray, m: np.ndarray, max_pixels: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pooled (labels, scores, weights) for one lesion; subsampled with weights when huge.

    All positive pixels are kept; negatives are drawn uniformly (seeded) and each weighted by
    n_negative / n_drawn, so weighted precision/recall estimate the full-population values.
    """
    y = np.asarray(m).reshape(-1) > 0.5
    s = np.asarray(p, dtype=np.float32).reshape(-1)
    if y.size <= max_pixels:
        return y, s, None
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y)
    neg_count = y.size - pos.size
    w_pos = 1.0
    if pos.size > max_pixels // 2:  # extreme case: also subsample positives
        n_pos = max_pixels // 2
        w_pos = pos.size / n_pos
        pos = np.sort(rng.choice(pos, n_pos, replace=False))
    n_neg = min(neg_count, max_pixels - pos.size)
    neg_idx = np.flatnonzero(~y)
    neg = np.sort(rng.choice(neg_idx, n_neg, replace=False)) if n_neg < neg_count else neg_idx
    idx = np.concatenate([pos, neg])
    w = np.concatenate([np.full(pos.size, w_pos), np.full(neg.size, neg_count / max(neg.size, 1))])
    return y[idx], s[idx], w


def segmentation_metrics(
    probs: Any, masks: Any, valid: Any = None, lesions: Sequence[str] = LESION_CODES,
    threshold: float = 0.5, max_pixels: int = 2_000_000, seed: int = 0,
) -> dict[str, dict[str, Any] | None]:
    """Pixel-level lesion metrics, keyed by lesion code.

    ``probs`` (N, L, H, W) sigmoid maps, ``masks`` same shape (0/1), ``valid`` (N,) or (N, L): which
    images have a lesion annotation (a missing annotation is not "absent"); None = all.

    Per lesion, over the pooled pixels of the valid images:
      * ``aupr``: sklearn ``average_precision_score`` (the IDRiD challenge metric); when there are more
        than ``max_pixels`` pixels, all positives and a seeded random subset of negatives are used with
        ``sample_weight`` restoring the true class balance.
      * ``dice`` / ``iou``: at ``probs >= threshold`` over the pooled pixels (exact, no subsampling).
      * ``mean_dice`` / ``mean_iou``: the per-image mean over images that contain the lesion.
    A lesion with no valid image, or absent from all of them, maps to None.
    """
    p, m, v = _seg_inputs(probs, masks, valid)
    if len(lesions) != p.shape[1]:
        raise ValueError(f"lesions has {len(lesions)} names but probs has {p.shape[1]} channels (shape {p.shape})")
    out: dict[str, dict[str, Any] | None] = {}
    for li, code in enumerate(lesions):
        sel = np.flatnonzero(v[:, li])
        if sel.size == 0:
            out[code] = None
            continue
        gt = m[sel, li] > 0.5
        if not gt.any():
            out[code] = None
            continue
        pr = p[sel, li] >= threshold
        axes = (1, 2)
        inter = np.asarray(np.sum(gt & pr, axis=axes, dtype=np.int64))
        g = np.asarray(np.sum(gt, axis=axes, dtype=np.int64))
        q = np.asarray(np.sum(pr, axis=axes, dtype=np.int64))
        union = g + q - inter
        y, s, w = _pixel_sample(p[sel, li], gt, max_pixels, seed + li)
        present = g > 0
        out[code] = {
            "n_images": int(sel.size),
            "n_images_with_lesion": int(present.sum()),
            "n_pixels": int(gt.size),
            "positive_fraction": float(g.sum() / gt.size),
            "aupr": float(average_precision_score(y, s, sample_weight=w)),
            "dice": float(2 * inter.sum() / (g.sum() + q.sum())),
            "iou": float(inter.sum() / union.sum()),
            "mean_dice": float(np.mean(2 * inter[present] / (g[present] + q[present]))),
            "mean_iou": float(np.mean(inter[present] / union[present])),
            "pixels_subsampled": w is not None,
        }
    return out


def lesion_pr_curves(
    probs: Any, masks: Any, valid: Any = None, lesions: Sequence[str] = LESION_CODES,
    max_pixels: int = 2_000_000, seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per-lesion pooled-pixel (precision, recall, aupr); lesions absent everywhere are left out.

    Uses the same pixels (and subsampling) as :func:`segmentation_metrics`.
    """
    p, m, v = _seg_inputs(probs, masks, valid)
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for li, code in enumerate(lesions):
        sel = np.flatnonzero(v[:, li])
        if sel.size == 0:
            continue
        gt = m[sel, li] > 0.5
        if not gt.any():
            continue
        y, s, w = _pixel_sample(p[sel, li], gt, max_pixels, seed + li)
        prec, rec, _ = precision_recall_curve(y, s, sample_weight=w)
        curves[code] = (prec, rec, float(average_precision_score(y, s, sample_weight=w)))
    return curves


# ---------------------------------------------------------------------------------- calibration
def expected_calibration_error(y_true: Any, prob: Any, bins: int = 10) -> float | None:
    """ECE of binary probabilities: sum over equal-width bins of (share of samples) x |mean prob - positive rate|.

    Unknown labels (-1) are ignored; None when no label is known.
    """
    y, p = _known_binary(y_true, prob)
    if y.size == 0:
        return None
    frac, conf, count = reliability_curve(y, p, bins)
    keep = count > 0
    return float(np.sum(count[keep] / y.size * np.abs(conf[keep] - frac[keep])))


def reliability_curve(y_true: Any, prob: Any, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: observed positive rate, mean predicted probability, count (NaN where empty)."""
    y, p = _known_binary(y_true, prob)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.bincount(idx, weights=y.astype(np.float64), minlength=bins) / count
        conf = np.bincount(idx, weights=p, minlength=bins) / count
    return frac, conf, count


# ---------------------------------------------------------------------------------- per patient
def per_patient(patients: Sequence[str], y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patient-level referable labels and scores from eye-level ones: a patient is referred when any eye is.

    Label 1 when any eye is referable, 0 when every eye is known non-referable, -1 otherwise; score = the
    highest eye score (the patient is referred when any eye's score passes the threshold).
    """
    y = _labels("y_true", y_true, (REFERABLE_UNKNOWN, 0, 1))
    s = _scores("score", score)
    order: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        order.setdefault(str(p), []).append(i)
    ys, ss = [], []
    for idx in order.values():
        yy = y[idx]
        ys.append(1 if (yy == 1).any() else (0 if (yy == 0).all() else REFERABLE_UNKNOWN))
        ss.append(float(s[idx].max()))
    return np.array(ys, np.int64), np.array(ss, np.float64), list(order)


# ---------------------------------------------------------------------------------- bootstrap
def grouped_bootstrap_ci(
    metric_fn: Callable[..., Any], groups: Sequence[str] | np.ndarray, *arrays: Any, n_boot: int = 1000, seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float | None, float | None]:
    """Like :func:`bootstrap_ci`, but resampling whole groups (patients): both eyes of a resampled patient
    come along together, so the interval reflects that two eyes of one person are not independent."""
    arrs = [np.asarray(a) for a in arrays]
    _same_length(groups=np.asarray(groups), **{f"arrays[{i}]": a for i, a in enumerate(arrs)})
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    rows = list(members.values())
    if not rows:
        return None, None
    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        pick = rng.integers(0, len(rows), len(rows))
        return np.fromiter((i for k in pick for i in rows[k]), dtype=np.int64)

    return _percentile_interval(metric_fn, arrs, draw, n_boot, alpha)


def _percentile_interval(
    metric_fn: Callable[..., Any], arrs: list[np.ndarray], draw: Callable[[], np.ndarray], n_boot: int, alpha: float,
) -> tuple[float | None, float | None]:
    """The bootstrap loop both intervals share: ``draw()`` gives one resample's row indices; resamples where the
    metric is undefined (None, NaN, or sklearn's ValueError for a single class) are skipped."""
    values = []
    for _ in range(n_boot):
        idx = draw()
        try:
            with warnings.catch_warnings():  # undefined resamples are expected and skipped
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                v = metric_fn(*(a[idx] for a in arrs))
        except ValueError:
            continue
        v = _f(v)
        if v is not None:
            values.append(v)
    if not values:
        return None, None
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# ---------------------------------------------------------------------------------- bootstrap (rows)
def bootstrap_ci(
    metric_fn: Callable[..., Any], *arrays: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
) -> tuple[float | None, float | None]:
    """Percentile bootstrap ``(low, high)`` interval of ``metric_fn(*arrays)``, resampling rows.

    Every array is resampled with the same row indices.  Resamples where the metric is undefined
    (returns None or NaN, or raises ValueError as sklearn does for a single class) are skipped;
    ``(None, None)`` when none is defined.  Rows are treated as independent: samples of the same
    patient (two eyes) make the interval too narrow.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise ValueError(f"arrays[{i}] must have at least one dimension, got shape {a.shape}")
    _same_length(**{f"arrays[{i}]": a for i, a in enumerate(arrs)})
    n = arrs[0].shape[0]
    if n == 0:
        return None, None
    rng = np.random.default_rng(seed)

    def draw() -> np.ndarray:
        return np.asarray(rng.integers(0, n, n))

    return _percentile_interval(metric_fn, arrs, draw, n_boot, alpha)

"""Evaluation reports: ``metrics.json`` plus PNG plots, and the training-curve plot.

Plots are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly, never through
pyplot, so nothing touches the global backend or needs a display (safe in worker threads).
Files are written to a temporary name and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_auc_score, roc_curve

from training.common import atomic_write, atomic_write_text
from training.losses import LOSS_PARTS
from training.metrics import (
    LESION_CODES,
    NUM_DR_GRADES,
    REFERABLE_UNKNOWN,
    bootstrap_ci,
    calibrated_referable,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    grouped_bootstrap_ci,
    lesion_pr_curves,
    per_patient,
    quadratic_kappa,
    referable_labels,
    reliability_curve,
    segmentation_metrics,
    sensitivity_specificity,
)

METRICS_FILE = "metrics.json"
DR_CONFUSION_PNG = "dr_confusion_matrix.png"
REFERABLE_ROC_PNG = "referable_roc.png"
LESION_PR_PNG = "lesion_pr_curves.png"
RELIABILITY_PNG = "referable_reliability.png"

__all__ = ["clinical_evaluation", "history_panels", "plot_history", "plot_reliability", "to_jsonable", "write_evaluation"]


# ---------------------------------------------------------------------------------- helpers
def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy types / tuples / paths to plain json types; NaN and inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _ci(fn: Callable[..., float | None], *arrays: np.ndarray, n_boot: int, seed: int) -> list[float | None] | None:
    if n_boot <= 0:
        return None
    low, high = bootstrap_ci(fn, *arrays, n_boot=n_boot, seed=seed)
    return [low, high]


# ---------------------------------------------------------------------------------- per source, per patient
def _auc_or_none(y: np.ndarray, s: np.ndarray) -> float | None:
    return float(roc_auc_score(y, s)) if y.size and y.min() != y.max() else None


def _rate(y: np.ndarray, s: np.ndarray, positive: int, t: float) -> float | None:
    sel = y == positive
    if not sel.any():
        return None
    return float(np.mean(s[sel] >= t)) if positive == 1 else float(np.mean(s[sel] < t))


def _with_ci(value: float | None, fn: Any, groups: Sequence[str] | np.ndarray, *arrays: np.ndarray, n_boot: int, seed: int
             ) -> dict[str, Any]:
    ci = grouped_bootstrap_ci(fn, groups, *arrays, n_boot=n_boot, seed=seed) if value is not None and n_boot > 0 else None
    return {"value": value, "ci95": list(ci) if ci is not None else None}


def _clinical_block(dr_p: np.ndarray, dme_p: np.ndarray, dr_y: np.ndarray, dme_y: np.ndarray, patients: np.ndarray,
                    threshold: float, n_boot: int, seed: int, dme_unknown_as_absent: bool,
                    calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Eye- and patient-level metrics of one group of images, each with a patient-bootstrap 95% interval."""
    y = referable_labels(dr_y, dme_y, dme_unknown_as_absent)
    s = calibrated_referable(dr_p, dme_p, calibration)
    known = y != REFERABLE_UNKNOWN
    ky, ks, kp = y[known], s[known], patients[known]
    t = float(threshold)
    out: dict[str, Any] = {"images": int(len(dr_y)), "patients": int(len(set(patients.tolist())))}
    out["eye"] = {
        "n": int(known.sum()), "n_referable": int((ky == 1).sum()),
        "auc": _with_ci(_auc_or_none(ky, ks), _auc_or_none, kp, ky, ks, n_boot=n_boot, seed=seed),
        "sensitivity": _with_ci(_rate(ky, ks, 1, t), lambda a, b: _rate(a, b, 1, t), kp, ky, ks, n_boot=n_boot, seed=seed + 1),
        "specificity": _with_ci(_rate(ky, ks, 0, t), lambda a, b: _rate(a, b, 0, t), kp, ky, ks, n_boot=n_boot, seed=seed + 2),
        "ece": _with_ci(expected_calibration_error(ky, ks), expected_calibration_error, kp, ky, ks, n_boot=n_boot, seed=seed + 3),
    }
    py, ps, pid = per_patient(patients.tolist(), y, s)
    pk = py != REFERABLE_UNKNOWN
    py, ps, pid = py[pk], ps[pk], np.asarray(pid)[pk]
    out["patient"] = {
        "n": int(pk.sum()), "n_referable": int((py == 1).sum()),
        "auc": _with_ci(_auc_or_none(py, ps), _auc_or_none, pid, py, ps, n_boot=n_boot, seed=seed + 4),
        "sensitivity": _with_ci(_rate(py, ps, 1, t), lambda a, b: _rate(a, b, 1, t), pid, py, ps, n_boot=n_boot, seed=seed + 5),
        "specificity": _with_ci(_rate(py, ps, 0, t), lambda a, b: _rate(a, b, 0, t), pid, py, ps, n_boot=n_boot, seed=seed + 6),
    }
    dk = dr_y != -1
    pred = dr_p.argmax(1)

    def acc(a: np.ndarray, b: np.ndarray) -> float | None:
        return float(np.mean(a == b)) if a.size else None

    out["dr"] = {
        "n": int(dk.sum()),
        "kappa": _with_ci(quadratic_kappa(dr_y[dk], pred[dk]), quadratic_kappa, patients[dk], dr_y[dk], pred[dk],
                          n_boot=n_boot, seed=seed + 7),
        "accuracy": _with_ci(acc(dr_y[dk], pred[dk]), acc, patients[dk], dr_y[dk], pred[dk], n_boot=n_boot, seed=seed + 8),
    }
    present_known = dme_y != -1
    pres_y = (dme_y[present_known] >= 1).astype(np.int64)
    pres_s = dme_p[present_known, 1] + dme_p[present_known, 2]
    exact = np.isin(dme_y, (0, 1, 2))
    dme_pred = dme_p.argmax(1)
    out["dme"] = {
        "n_present_known": int(present_known.sum()), "n_exact": int(exact.sum()),
        "present_auc": _with_ci(_auc_or_none(pres_y, pres_s), _auc_or_none, patients[present_known], pres_y, pres_s,
                                n_boot=n_boot, seed=seed + 9),
        "present_accuracy": _with_ci(acc(pres_y, (np.isin(dme_pred[present_known], (1, 2))).astype(np.int64)), acc,
                                     patients[present_known], pres_y,
                                     np.isin(dme_pred[present_known], (1, 2)).astype(np.int64), n_boot=n_boot, seed=seed + 10),
        "exact_accuracy": _with_ci(acc(dme_y[exact], dme_pred[exact]), acc, patients[exact], dme_y[exact], dme_pred[exact],
                                   n_boot=n_boot, seed=seed + 11),
    }
    return out


def clinical_evaluation(
    dr_probs: Any, dme_probs: Any, dr_true: Any, dme_true: Any, patients: Sequence[str], sources: Sequence[str],
    threshold: float, bootstrap: int = 1000, seed: int = 0, dme_unknown_as_absent: bool = True,
    referable_calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Overall and per-source metrics with **patient-level** bootstrap intervals (both eyes resampled together).

    Eye level: referable AUC, sensitivity/specificity at the stored ``threshold``, ECE of P(referable).
    Patient level: referred when any eye is (score = the highest eye score). DR kappa and accuracy; DME present
    AUC and accuracy; DME 0/1/2 accuracy where exact grades exist (IDRiD). Patient ids are prefixed by the source
    so two sets' numbering never merges patients. ``dme_unknown_as_absent``: see :func:`referable_labels`.
    ``referable_calibration``: the checkpoint's map of P(referable) (:func:`calibrated_referable`); the threshold
    is on that scale.
    """
    dr_p, dme_p = np.asarray(dr_probs, np.float64), np.asarray(dme_probs, np.float64)
    dr_y, dme_y = np.asarray(dr_true).astype(np.int64), np.asarray(dme_true).astype(np.int64)
    src = np.asarray([str(s) for s in sources])
    pat = np.asarray([f"{s}/{p}" for s, p in zip(sources, patients)])
    out: dict[str, Any] = {
        "threshold": float(threshold), "bootstrap": {"n_boot": int(bootstrap), "unit": "patient", "seed": int(seed)},
        "referable_definition": ("DR >= 2 or any DME risk; " + ("DR 0-1 with DME not graded counts as not referable"
                                 if dme_unknown_as_absent else "DR 0-1 with DME not graded is left out")),
        "referable_calibration": dict(referable_calibration) if referable_calibration else None,
        "overall": _clinical_block(dr_p, dme_p, dr_y, dme_y, pat, threshold, bootstrap, seed, dme_unknown_as_absent,
                                   referable_calibration),
        "by_source": {},
    }
    for name in sorted(set(src.tolist())):
        sel = src == name
        out["by_source"][name] = _clinical_block(dr_p[sel], dme_p[sel], dr_y[sel], dme_y[sel], pat[sel], threshold,
                                                 bootstrap, seed, dme_unknown_as_absent, referable_calibration)
    result: dict[str, Any] = to_jsonable(out)
    return result


def plot_reliability(y_true: Any, prob: Any, path: str | Path, title: str = "P(referable) reliability") -> None:
    """Reliability diagram: observed referable rate against mean predicted probability per bin."""
    frac, conf, count = reliability_curve(y_true, prob)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    keep = count > 0
    ax.plot(conf[keep], frac[keep], marker="o", label="model")
    ece = expected_calibration_error(y_true, prob)
    ax.set(xlabel="mean predicted P(referable)", ylabel="observed referable share", xlim=(0, 1), ylim=(0, 1),
           title=f"{title}\nECE {ece:.3f}" if ece is not None else title)
    ax.legend(loc="upper left")
    _save(fig, Path(path))


# ---------------------------------------------------------------------------------- report
def write_evaluation(
    out_dir: str | Path,
    dr_probs: Any,
    dme_probs: Any,
    dr_true: Any,
    dme_true: Any,
    seg_probs: Any = None,
    seg_masks: Any = None,
    seg_valid: Any = None,
    threshold: float | None = None,
    target_sensitivity: float = 0.9,
    bootstrap: int = 1000,
    seed: int = 0,
    lesions: Sequence[str] = LESION_CODES,
    referable_calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute every metric, write ``metrics.json`` and the PNG plots into ``out_dir``; return the dict.

    ``referable_calibration``: the checkpoint's map of P(referable) (:func:`calibrated_referable`); the
    ``threshold`` is on that scale.

    When ``threshold`` is None the referable threshold is chosen on these same data for
    ``target_sensitivity`` and recorded as ``threshold_source == "chosen_on_these_data"`` -- the
    resulting sensitivity/specificity are then optimistic; pass the validation-chosen threshold
    when evaluating a test set.  ``bootstrap`` resamples give 95% percentile CIs (0 disables them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dr_p = np.asarray(dr_probs, dtype=np.float64)
    dme_p = np.asarray(dme_probs, dtype=np.float64)

    # validates all shapes and label codes up front
    base = classification_metrics(dr_p, dme_p, dr_true, dme_true, threshold=None,
                                  referable_calibration=referable_calibration)
    dr_y = np.asarray(dr_true).astype(np.int64)
    ref_y = referable_labels(dr_true, dme_true)
    ref_s = calibrated_referable(dr_p, dme_p, referable_calibration)
    known = ref_y != REFERABLE_UNKNOWN
    ky, ks = ref_y[known], ref_s[known]

    ref = base["referable"]
    ref["target_sensitivity"] = float(target_sensitivity)
    if threshold is not None:
        ref["threshold_source"] = "given"
    else:
        try:
            threshold = choose_threshold(ky, ks, target_sensitivity)
            ref["threshold_source"] = "chosen_on_these_data"
        except ValueError as e:
            ref["threshold_source"] = None
            ref["threshold_reason"] = str(e)
    if threshold is not None:
        ref.update(sensitivity_specificity(ky, ks, threshold))
    else:
        ref.update(threshold=None, sensitivity=None, specificity=None)

    # bootstrap CIs (over the samples each metric uses)
    def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
        return roc_auc_score(y, s) if y.min() != y.max() else None

    ref["auc_ci95"] = _ci(_auc, ky, ks, n_boot=bootstrap, seed=seed) if ref["auc"] is not None else None
    if threshold is not None:
        t = float(threshold)

        def sens_fn(y: np.ndarray, s: np.ndarray) -> float | None:
            pos = y == 1
            return float(np.mean(s[pos] >= t)) if pos.any() else None

        def spec_fn(y: np.ndarray, s: np.ndarray) -> float | None:
            neg = y == 0
            return float(np.mean(s[neg] < t)) if neg.any() else None

        ref["sensitivity_ci95"] = (_ci(sens_fn, ky, ks, n_boot=bootstrap, seed=seed + 1)
                                   if ref["sensitivity"] is not None else None)
        ref["specificity_ci95"] = (_ci(spec_fn, ky, ks, n_boot=bootstrap, seed=seed + 2)
                                   if ref["specificity"] is not None else None)
    else:
        ref["sensitivity_ci95"] = ref["specificity_ci95"] = None

    dr_known = dr_y != -1
    dr_pred = dr_p.argmax(axis=1)
    base["dr"]["quadratic_kappa_ci95"] = (
        _ci(quadratic_kappa, dr_y[dr_known], dr_pred[dr_known], n_boot=bootstrap, seed=seed + 3)
        if base["dr"]["quadratic_kappa"] is not None else None)

    # segmentation
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    if seg_probs is not None or seg_masks is not None:
        if seg_probs is None or seg_masks is None:
            raise ValueError("seg_probs and seg_masks must be given together "
                             f"(got seg_probs={'None' if seg_probs is None else np.shape(seg_probs)}, "
                             f"seg_masks={'None' if seg_masks is None else np.shape(seg_masks)})")
        base["segmentation"] = segmentation_metrics(seg_probs, seg_masks, seg_valid, lesions=lesions, seed=seed)
        curves = lesion_pr_curves(seg_probs, seg_masks, seg_valid, lesions=lesions, seed=seed)
    else:
        base["segmentation"] = None

    base["bootstrap"] = {"n_boot": int(bootstrap), "alpha": 0.05, "seed": int(seed),
                         "note": "percentile bootstrap over images; assumes images are independent"}

    # plots
    plots: dict[str, str | None] = {"dr_confusion_matrix": None, "referable_roc": None, "lesion_pr_curves": None}
    if base["dr"]["confusion_matrix"] is not None:
        _plot_confusion(np.asarray(base["dr"]["confusion_matrix"]), base["dr"], out / DR_CONFUSION_PNG)
        plots["dr_confusion_matrix"] = DR_CONFUSION_PNG
    if ref["auc"] is not None:
        _plot_roc(ky, ks, ref, out / REFERABLE_ROC_PNG)
        plots["referable_roc"] = REFERABLE_ROC_PNG
    if curves:
        _plot_pr(curves, base["segmentation"], out / LESION_PR_PNG)
        plots["lesion_pr_curves"] = LESION_PR_PNG
    base["plots"] = plots

    result: dict[str, Any] = to_jsonable(base)
    atomic_write_text(out / METRICS_FILE, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _plot_confusion(cm: np.ndarray, dr: Mapping[str, Any], path: Path) -> None:
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(cm, display_labels=list(range(NUM_DR_GRADES))).plot(
        ax=ax, cmap="Blues", colorbar=True, values_format="d")
    kappa = dr.get("quadratic_kappa")
    ktxt = f"{kappa:.3f}" if kappa is not None else "n/a"
    ax.set_xlabel("Predicted DR grade")
    ax.set_ylabel("True DR grade")
    ax.set_title(f"DR grade (n={dr['n']}, acc={dr['accuracy']:.3f}, QWK={ktxt})")
    _save(fig, path)


def _plot_roc(y: np.ndarray, s: np.ndarray, ref: Mapping[str, Any], path: Path) -> None:
    fpr, tpr, _ = roc_curve(y, s)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"AUC = {ref['auc']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    if ref.get("sensitivity") is not None and ref.get("specificity") is not None:
        ax.plot(1 - ref["specificity"], ref["sensitivity"], "o", color="tab:red", ms=9,
                label=(f"threshold {ref['threshold']:.3f}: sens {ref['sensitivity']:.3f}, "
                       f"spec {ref['specificity']:.3f}"))
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"Referable DR (n={ref['n']}: {ref['n_positive']} pos, {ref['n_negative']} neg)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_pr(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
             seg: Mapping[str, Any] | None, path: Path) -> None:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for code, (prec, rec, ap) in curves.items():
        ax.step(rec, prec, where="post", lw=1.5, label=f"{code}: AUPR {ap:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("Recall (pixels)")
    ax.set_ylabel("Precision (pixels)")
    ax.set_title("Lesion segmentation, pooled pixels")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------------------------- training curves
_NON_METRIC_KEYS = {"epoch", "step", "time", "seconds", "wall_s", "elapsed"}
_LOSS_KEYS = {f"{phase}_{part}" for phase in ("train", "val") for part in LOSS_PARTS}  # as training/engine.py writes them


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    vals = []
    for h in history:
        v = h.get(key)
        numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        vals.append(float(v) if numeric and v is not None else np.nan)
    return np.asarray(vals, dtype=np.float64)


def history_panels(history: Sequence[Mapping[str, Any]]) -> list[tuple[list[str], str, bool]]:
    """The panels of the training-curve plot as (keys, title, log scale), empty panels left out.

    Loss: the loss terms as :func:`training.engine.fit` records them (``train_total``, ``val_seg``, ... from
    :data:`training.losses.LOSS_PARTS`) and any key containing "loss"; learning rate (log scale): ``lr``
    and ``*_lr``; validation metrics: the other numeric keys (kappa, AUC, score, ...). Bookkeeping
    (epoch, seconds, images per second) is not plotted.
    """
    keys: list[str] = []
    for h in history:
        for k, v in h.items():
            if k in keys or k in _NON_METRIC_KEYS or k.endswith("_per_s"):
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                keys.append(k)
    loss_keys = [k for k in keys if k in _LOSS_KEYS or "loss" in k]
    lr_keys = [k for k in keys if k not in loss_keys and (k == "lr" or k.endswith("_lr") or k.startswith("lr"))]
    metric_keys = [k for k in keys if k not in loss_keys and k not in lr_keys]
    panels = [(loss_keys, "Loss", False), (metric_keys, "Validation metrics", False), (lr_keys, "Learning rate", True)]
    return [p for p in panels if p[0]]


def plot_history(history: Sequence[Mapping[str, Any]], out_png: str | Path) -> None:
    """Training curves from the per-epoch rows of ``history.json``, one panel per group of
    :func:`history_panels`.  Missing values leave gaps."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    x = _series(history, "epoch")
    if np.isnan(x).any():
        x = np.arange(1, len(history) + 1, dtype=np.float64)

    panels = history_panels(history) or [([], "No numeric values", False)]
    fig = Figure(figsize=(5 * len(panels), 4))
    for i, (ks, title, logy) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for k in ks:
            ax.plot(x, _series(history, k), marker="o", ms=3, label=k)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("Epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ks:
            ax.legend(fontsize=8)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out)

"""Tests for training.metrics on small synthetic arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    LESION_CODES,
    bootstrap_ci,
    calibrated_referable,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    fit_referable_calibration,
    lesion_pr_curves,
    referable_labels,
    referable_score,
    segmentation_metrics,
    sensitivity_specificity,
)


def one_hot(labels, n, eps=0.0):
    labels = np.asarray(labels)
    p = np.full((len(labels), n), eps / max(n - 1, 1))
    p[np.arange(len(labels)), np.clip(labels, 0, n - 1)] = 1.0 - eps
    return p


def test_metrics_use_the_models_label_tables_without_torch(project_root):
    import subprocess
    import sys

    import training.model

    assert LESION_CODES == training.model.LESION_CODES and len(training.model.DR_GRADES) == 5
    code = "import sys, training.metrics, training.labels; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=project_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # metrics and label tables load without the deep-learning stack


# ------------------------------------------------------------------------------ referable
def test_referable_labels_rules():
    dr = np.array([0, 1, 2, 4, 0, 1, -1, -1, 0, -1, 3, 0])
    dme = np.array([0, 0, -1, 0, 1, 3, 2, 0, -1, -1, -1, 2])
    expected = [0, 0, 1, 1, 1, 1, 1, -1, -1, -1, 1, 1]
    assert referable_labels(dr, dme).tolist() == expected


def test_referable_labels_reject_bad_codes_and_shapes():
    with pytest.raises(ValueError, match="dr_true"):
        referable_labels([0, 5], [0, 0])
    with pytest.raises(ValueError, match="dme_true"):
        referable_labels([0, 1], [0, 4])
    with pytest.raises(ValueError, match=r"dme_true \(3,\)"):
        referable_labels([0, 1], [0, 0, 0])
    with pytest.raises(ValueError, match=r"dr_true.*\(2, 1\)"):
        referable_labels([[0], [1]], [0, 0])


def test_referable_score_formula_and_shape_errors():
    dr = np.array([[0.5, 0.3, 0.1, 0.05, 0.05], [0, 0, 0, 0, 1.0]])
    dme = np.array([[0.5, 0.25, 0.25], [1.0, 0, 0]])
    np.testing.assert_allclose(referable_score(dr, dme), [1 - 0.8 * 0.5, 1.0])
    with pytest.raises(ValueError, match=r"dme_probs.*\(2, 4\)"):
        referable_score(dr, np.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="logits"):
        referable_score(dr * 5, dme)


def test_referable_calibration_recovers_a_platt_map_and_keeps_the_ranking():
    rng = np.random.default_rng(3)
    # eyes whose raw score is overconfident: the true log-odds are half the score's, shifted by -0.5
    dr = rng.dirichlet(np.ones(5) * 0.4, size=4000)
    dme = np.c_[np.ones(4000), np.zeros((4000, 2))]
    raw = referable_score(dr, dme)
    z = np.log(np.clip(raw, 1e-6, 1 - 1e-6) / np.clip(1 - raw, 1e-6, 1))
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 * z - 0.5)))).astype(int)
    cal = fit_referable_calibration(np.r_[y, -1], np.r_[raw, 0.3])  # unknown labels are left out
    assert cal["method"] == "platt" and cal["n"] == 4000
    assert cal["slope"] == pytest.approx(0.5, abs=0.08) and cal["intercept"] == pytest.approx(-0.5, abs=0.12)
    p = calibrated_referable(dr, dme, cal)
    assert expected_calibration_error(y, p) < expected_calibration_error(y, raw) / 2
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-12)  # monotone: AUC and the ranking are unchanged
    np.testing.assert_array_equal(calibrated_referable(dr, dme, None), raw)


def test_referable_calibration_refuses_what_it_cannot_fit_or_read():
    with pytest.raises(ValueError, match="one class"):
        fit_referable_calibration([0, 0, 0], [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="slope"):  # the score ranks backwards on these eyes
        fit_referable_calibration([1, 1, 1, 0, 0, 0], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    dr, dme = np.full((1, 5), 0.2), np.full((1, 3), 1 / 3)
    with pytest.raises(ValueError, match="unknown method 'isotonic'"):
        calibrated_referable(dr, dme, {"method": "isotonic"})


def test_choose_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(50, int), np.zeros(150, int)]
    s = np.r_[rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 150)]
    t = choose_threshold(y, s, 0.9)
    sens = np.mean(s[y == 1] >= t)
    assert sens >= 0.9
    # the highest such threshold: the next score above t loses sensitivity below the target
    higher = np.sort(s[s > t])
    if higher.size:
        assert np.mean(s[y == 1] >= higher[0]) < 0.9
    res = sensitivity_specificity(y, s, t)
    assert res["sensitivity"] == pytest.approx(sens)
    assert res["tp"] + res["fn"] == 50 and res["tn"] + res["fp"] == 150


def test_choose_threshold_ignores_unknown_and_needs_two_classes():
    y = np.array([1, 1, 0, 0, -1])
    s = np.array([0.9, 0.8, 0.2, 0.1, 0.95])
    assert choose_threshold(y, s, 1.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1, -1], [0.5, 0.6, 0.1])
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(y, s, 0.0)


# ------------------------------------------------------------------------------ classification
def test_perfect_classification():
    dr = np.array([0, 1, 2, 3, 4, 0, 2, 4])
    dme = np.array([0, 1, 2, 0, 1, 0, 2, 0])
    m = classification_metrics(one_hot(dr, 5), one_hot(dme, 3), dr, dme, threshold=0.5)
    assert m["dr"]["accuracy"] == 1.0
    assert m["dr"]["quadratic_kappa"] == pytest.approx(1.0)
    assert m["dr"]["per_class"]["f1"] == [1.0] * 5
    assert np.trace(np.array(m["dr"]["confusion_matrix"])) == 8
    assert m["dme"]["accuracy"] == 1.0 and m["dme"]["present_auc"] == 1.0
    assert m["referable"]["auc"] == 1.0
    assert m["referable"]["sensitivity"] == 1.0 and m["referable"]["specificity"] == 1.0


def test_reversed_classification_is_bad():
    dr = np.array([0, 1, 2, 3, 4, 0, 4, 1])
    dme = np.zeros(8, int)
    m = classification_metrics(one_hot(4 - dr, 5, 0.1), one_hot(dme, 3), dr, dme)
    assert m["dr"]["quadratic_kappa"] < -0.5
    assert m["referable"]["auc"] < 0.2
    assert m["referable"]["sensitivity"] is None  # no threshold given


def test_unknown_labels_excluded_and_counted():
    dr = np.array([0, 2, -1, -1, 4, 1])
    dme = np.array([0, -1, 3, -1, 1, -1])
    m = classification_metrics(one_hot(dr, 5), one_hot(np.clip(dme, 0, 2), 3), dr, dme, threshold=0.5)
    assert m["n_samples"] == 6
    assert m["dr"]["n"] == 4 and sum(m["dr"]["per_class"]["support"]) == 4
    assert m["dme"]["n_exact"] == 2  # codes 0 and 1 only
    assert m["dme"]["n_present"] == 3  # 0, 3, 1
    # referable: [0, 1, 1, -1, 1, -1]
    assert m["referable"]["n"] == 4
    assert (m["referable"]["n_positive"], m["referable"]["n_negative"]) == (3, 1)


def test_dme_code_3_counts_as_present():
    dme = np.array([3, 3, 0, 0])
    probs = np.array([[0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1]])
    m = classification_metrics(one_hot([0, 0, 0, 0], 5), probs, [-1] * 4, dme)
    assert m["dme"]["n_exact"] == 2 and m["dme"]["accuracy"] == 1.0
    assert m["dme"]["n_present"] == 4 and m["dme"]["n_present_positive"] == 2
    assert m["dme"]["present_accuracy"] == 1.0
    assert m["dme"]["present_auc"] == 1.0
    # DR unknown but DME present -> referable known positive; DME 0 with DR unknown -> unknown
    assert m["referable"]["n"] == 2 and m["referable"]["auc"] is None
    assert "one class" in m["referable"]["auc_reason"]
    assert m["dr"]["n"] == 0 and m["dr"]["quadratic_kappa"] is None


def test_single_grade_kappa_is_none_not_nan():
    dr = np.array([2, 2, 2])
    m = classification_metrics(one_hot(dr, 5), one_hot([0, 0, 0], 3), dr, [0, 0, 0])
    assert m["dr"]["quadratic_kappa"] is None
    assert "quadratic_kappa_reason" in m["dr"]


def test_classification_shape_errors_name_argument():
    with pytest.raises(ValueError, match=r"dr_probs.*\(3, 4\)"):
        classification_metrics(np.full((3, 4), 0.25), one_hot([0, 0, 0], 3), [0, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="dme_true"):
        classification_metrics(one_hot([0, 0, 0], 5), one_hot([0, 0, 0], 3), [0, 0, 0], [0, 0])


# ------------------------------------------------------------------------------ segmentation
def _seg_data(seed=0, n=4, size=32):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, len(LESION_CODES), size, size), dtype=np.uint8)
    for i in range(n):
        for k in range(4):  # lesion 4 (OD) absent everywhere
            y, x = rng.integers(0, size - 8, 2)
            masks[i, k, y:y + 6, x:x + 6] = 1
    return masks


def test_segmentation_perfect_prediction():
    masks = _seg_data()
    m = segmentation_metrics(masks.astype(np.float32), masks)
    for code in LESION_CODES[:4]:
        assert m[code]["aupr"] == pytest.approx(1.0)
        assert m[code]["dice"] == pytest.approx(1.0) and m[code]["iou"] == pytest.approx(1.0)
        assert m[code]["mean_dice"] == pytest.approx(1.0)
    assert m["OD"] is None


def test_segmentation_random_noise_near_positive_rate():
    masks = _seg_data(n=8, size=64)
    probs = np.random.default_rng(3).random(masks.shape)
    m = segmentation_metrics(probs, masks)
    for code in LESION_CODES[:4]:
        rate = m[code]["positive_fraction"]
        assert abs(m[code]["aupr"] - rate) < 0.03, (code, m[code]["aupr"], rate)


def test_segmentation_subsampling_close_to_exact():
    masks = _seg_data(n=8, size=64)
    rng = np.random.default_rng(5)
    probs = np.clip(masks * 0.4 + rng.random(masks.shape) * 0.6, 0, 1)
    exact = segmentation_metrics(probs, masks)
    sub = segmentation_metrics(probs, masks, max_pixels=8000)
    for code in LESION_CODES[:4]:
        assert sub[code]["pixels_subsampled"] and not exact[code]["pixels_subsampled"]
        assert sub[code]["aupr"] == pytest.approx(exact[code]["aupr"], abs=0.05)
        assert sub[code]["dice"] == exact[code]["dice"]  # Dice is never subsampled


def test_segmentation_valid_mask_excludes_images():
    masks = _seg_data()
    probs = masks.astype(np.float32)
    probs[0] = 1.0 - probs[0]  # image 0 totally wrong
    valid = np.array([False, True, True, True])
    m = segmentation_metrics(probs, masks, valid)
    assert m["MA"]["n_images"] == 3 and m["MA"]["aupr"] == pytest.approx(1.0)
    per_lesion = np.ones((4, 5), bool)
    per_lesion[:, 0] = False
    assert segmentation_metrics(probs, masks, per_lesion)["MA"] is None
    with pytest.raises(ValueError, match=r"valid.*\(3,\)"):
        segmentation_metrics(probs, masks, np.ones(3, bool))
    with pytest.raises(ValueError, match=r"masks.*\(4, 5, 32, 30\)"):
        segmentation_metrics(probs, masks[..., :30])


def test_lesion_pr_curves():
    masks = _seg_data()
    curves = lesion_pr_curves(masks.astype(float), masks)
    assert set(curves) == set(LESION_CODES[:4])
    prec, rec, ap = curves["EX"]
    assert ap == pytest.approx(1.0) and prec.shape == rec.shape


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_contains_point_estimate():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y * 0.8 + rng.normal(0, 0.6, 200)
    point = roc_auc_score(y, s)
    low, high = bootstrap_ci(roc_auc_score, y, s, n_boot=200, seed=0)
    assert low < point < high
    assert bootstrap_ci(roc_auc_score, y, s, n_boot=200, seed=0) == (low, high)  # deterministic


def test_bootstrap_skips_undefined_resamples():
    from sklearn.metrics import roc_auc_score

    y = np.array([1, 0, 0, 0, 0])  # many resamples have one class -> ValueError, skipped
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.4])
    low, high = bootstrap_ci(roc_auc_score, y, s, n_boot=100)
    assert low == high == 1.0
    assert bootstrap_ci(lambda a: None, y, n_boot=10) == (None, None)
    with pytest.raises(ValueError, match=r"arrays\[1\]"):
        bootstrap_ci(roc_auc_score, y, s[:3])


# ---------------------------------------------------------------------------------- v2 evaluation helpers
def test_referable_labels_can_read_dr_only_sets_as_dr_at_least_2() -> None:
    from training.metrics import referable_labels

    dr, dme = [0, 1, 2, 0, -1], [-1, -1, -1, 0, -1]
    assert referable_labels(dr, dme).tolist() == [-1, -1, 1, 0, -1]
    assert referable_labels(dr, dme, dme_unknown_as_absent=True).tolist() == [0, 0, 1, 0, -1]


def test_expected_calibration_error_and_reliability_curve() -> None:
    from training.metrics import expected_calibration_error, reliability_curve

    y = np.array([0] * 8 + [1] * 2 + [1] * 9 + [0] * 1)
    p = np.array([0.15] * 10 + [0.85] * 10)  # bin 1: 20% positive at 0.15; bin 8: 90% positive at 0.85
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    frac, conf, count = reliability_curve(y, p)
    assert count[1] == 10 and count[8] == 10 and frac[1] == pytest.approx(0.2) and conf[8] == pytest.approx(0.85)
    assert expected_calibration_error([-1, -1], [0.2, 0.3]) is None


def test_per_patient_refers_when_any_eye_is_referable() -> None:
    from training.metrics import per_patient

    y, s, ids = per_patient(["a", "a", "b", "b", "c"], [0, 1, 0, 0, -1], [0.1, 0.7, 0.2, 0.4, 0.9])
    assert ids == ["a", "b", "c"] and y.tolist() == [1, 0, -1] and s.tolist() == [0.7, 0.4, 0.9]


def test_grouped_bootstrap_resamples_whole_patients() -> None:
    from training.metrics import grouped_bootstrap_ci

    groups = [f"p{i // 2}" for i in range(40)]
    values = np.repeat(np.arange(20, dtype=float), 2)  # both eyes of a patient equal
    seen = []

    def spy(v: np.ndarray) -> float:
        seen.append(v)
        return float(v.mean())

    low, high = grouped_bootstrap_ci(spy, groups, values, n_boot=50, seed=0)
    assert low is not None and low < values.mean() < high
    for v in seen:  # every resample holds pairs: a patient's two eyes are drawn together
        assert len(v) == 40 and all(np.sum(v == x) % 2 == 0 for x in np.unique(v))

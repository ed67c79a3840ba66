"""Tests for training.evaluation: metrics.json contents and the PNG plots."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from training.evaluation import history_panels, plot_history, write_evaluation


def _assert_nontrivial_png(path):
    assert path.is_file()
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    flat = img.reshape(-1, img.shape[-1])
    assert len(np.unique(flat[::7], axis=0)) > 10, f"{path.name} looks blank"


def _synthetic(n=60, seed=0):
    rng = np.random.default_rng(seed)
    dr = rng.integers(0, 5, n)
    dme = rng.integers(0, 3, n)
    dr[:5] = -1
    dme[5:10] = -1
    dme[10:13] = 3
    dr_logits = rng.normal(0, 1, (n, 5))
    dr_logits[np.arange(n), np.clip(dr, 0, 4)] += 2.5
    dme_logits = rng.normal(0, 1, (n, 3))
    dme_logits[np.arange(n), np.clip(dme, 0, 2)] += 2.5
    dr_p = np.exp(dr_logits) / np.exp(dr_logits).sum(1, keepdims=True)
    dme_p = np.exp(dme_logits) / np.exp(dme_logits).sum(1, keepdims=True)
    masks = np.zeros((4, 5, 32, 32), np.uint8)
    for i in range(4):
        for k in range(4):
            y, x = rng.integers(0, 24, 2)
            masks[i, k, y:y + 6, x:x + 6] = 1
    seg = np.clip(masks * 0.5 + rng.random(masks.shape) * 0.5, 0, 1)
    return dr_p, dme_p, dr, dme, seg, masks


def test_write_evaluation_files_and_keys(tmp_path):
    dr_p, dme_p, dr, dme, seg, masks = _synthetic()
    out = tmp_path / "eval"
    res = write_evaluation(out, dr_p, dme_p, dr, dme, seg, masks, np.ones(4, bool), bootstrap=100)
    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded == res
    assert set(loaded) >= {"n_samples", "dr", "dme", "referable", "segmentation", "bootstrap", "plots"}
    assert loaded["n_samples"] == 60 and loaded["dr"]["n"] == 55

    ref = loaded["referable"]
    assert ref["threshold_source"] == "chosen_on_these_data"
    assert ref["sensitivity"] >= 0.9
    for key in ("auc", "sensitivity", "specificity"):
        low, high = ref[f"{key}_ci95"]
        assert low <= ref[key] <= high
    low, high = loaded["dr"]["quadratic_kappa_ci95"]
    assert low <= loaded["dr"]["quadratic_kappa"] <= high

    assert loaded["segmentation"]["OD"] is None
    assert 0 < loaded["segmentation"]["MA"]["aupr"] <= 1
    for name in loaded["plots"].values():
        assert name is not None
        _assert_nontrivial_png(out / name)


def test_write_evaluation_given_threshold_no_seg(tmp_path):
    dr_p, dme_p, dr, dme, *_ = _synthetic(seed=1)
    res = write_evaluation(tmp_path, dr_p, dme_p, dr, dme, threshold=0.5, bootstrap=0)
    assert res["referable"]["threshold"] == 0.5 and res["referable"]["threshold_source"] == "given"
    assert res["referable"]["auc_ci95"] is None
    assert res["segmentation"] is None and res["plots"]["lesion_pr_curves"] is None
    assert not (tmp_path / "lesion_pr_curves.png").exists()


def test_write_evaluation_single_class_referable(tmp_path):
    n = 6
    dr = np.zeros(n, int)
    dme = np.zeros(n, int)
    p5 = np.full((n, 5), 0.2)
    p3 = np.full((n, 3), 1 / 3)
    res = write_evaluation(tmp_path, p5, p3, dr, dme, bootstrap=20)
    assert res["referable"]["auc"] is None and res["referable"]["threshold"] is None
    assert "both classes" in res["referable"]["threshold_reason"]
    assert res["plots"]["referable_roc"] is None
    json.loads((tmp_path / "metrics.json").read_text())


def test_write_evaluation_seg_args_together(tmp_path):
    dr_p, dme_p, dr, dme, seg, _ = _synthetic()
    with pytest.raises(ValueError, match="seg_masks"):
        write_evaluation(tmp_path, dr_p, dme_p, dr, dme, seg_probs=seg, bootstrap=0)


def test_curves_put_the_losses_of_a_real_training_history_in_the_loss_panel(trained_run):
    """history.json as training/engine.py writes it (train_total, val_seg, val_kappa, lr, images/s, ...)."""
    _, out = trained_run
    history = json.loads((out / "history.json").read_text())
    assert {"train_total", "val_total", "lr"} <= set(history[0])  # the real keys, not a test's idea of them
    panels = {title: keys for keys, title, _ in history_panels(history)}
    assert set(panels) == {"Loss", "Validation metrics", "Learning rate"}
    assert {f"{p}_{part}" for p in ("train", "val") for part in ("total", "dr", "dme", "seg")} <= set(panels["Loss"])
    assert not any(k.endswith(("_total", "_dr", "_dme", "_seg")) for k in panels["Validation metrics"])
    assert "val_score" in panels["Validation metrics"] and panels["Learning rate"] == ["lr"]
    assert not [k for keys in panels.values() for k in keys if k.endswith("_per_s") or k in ("epoch", "seconds")]


def test_plot_history(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.3, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.9, "val_loss": 1.0, "val_kappa": 0.5, "val_referable_auc": 0.8, "lr": 5e-4},
        {"epoch": 3, "train_loss": 0.7, "val_loss": 0.95, "val_kappa": 0.6, "val_referable_auc": None, "lr": 2e-4},
    ]
    out = tmp_path / "sub" / "history.png"
    plot_history(history, out)
    _assert_nontrivial_png(out)
    plot_history(history[:1], out)  # first epoch alone works too
    _assert_nontrivial_png(out)
    with pytest.raises(ValueError, match="empty"):
        plot_history([], out)


def test_clinical_evaluation_per_source_with_patient_intervals(tmp_path) -> None:
    from training.evaluation import clinical_evaluation, plot_reliability

    rng = np.random.default_rng(0)
    n = 120
    dr_y = rng.integers(0, 5, n)
    dme_y = np.where(np.arange(n) < 60, rng.integers(0, 3, n), -1)  # second source: DR grades only
    dr_p = np.eye(5)[dr_y] * 0.6 + 0.08
    dme_p = np.full((n, 3), 1 / 3)
    sources = ["idrid"] * 60 + ["aptos"] * 60
    patients = [f"P{i // 2}" for i in range(60)] + [f"P{i // 2}" for i in range(60)]  # same numbers, two sets
    out = clinical_evaluation(dr_p, dme_p, dr_y, dme_y, patients, sources, threshold=0.5, bootstrap=50)
    assert set(out["by_source"]) == {"aptos", "idrid"}
    assert out["overall"]["patients"] == 60  # ids are per source: P0 of idrid is not P0 of aptos
    assert out["by_source"]["aptos"]["dme"]["n_exact"] == 0
    # DR-only set: DR 0-1 counts as not referable, so both classes exist and the AUC is defined
    aptos = out["by_source"]["aptos"]["eye"]
    assert aptos["n"] == 60 and aptos["auc"]["value"] == pytest.approx(1.0)
    low, high = out["overall"]["dr"]["kappa"]["ci95"]
    assert low <= out["overall"]["dr"]["kappa"]["value"] <= high
    assert out["overall"]["patient"]["n"] == 60
    plot_reliability(np.r_[np.zeros(10), np.ones(10)], np.linspace(0, 1, 20), tmp_path / "rel.png")
    assert (tmp_path / "rel.png").stat().st_size > 1000

import numpy as np
import pytest
import torch

from training.data.synthetic import make_fundus
from training.grader import FEATURE_NAMES, apply_grader, features_of, fit_grader, lesion_features


def test_features_shape_determinism_and_lesion_sensitivity():
    healthy = make_fundus(np.random.default_rng(1), size=256, dr_grade=0).image
    exudates = make_fundus(np.random.default_rng(1), size=256, dr_grade=2, dme_grade=2).image
    f0, f1 = lesion_features(healthy), lesion_features(exudates)
    assert f0.shape == (len(FEATURE_NAMES),) and np.array_equal(f0, lesion_features(healthy))
    yellow = [i for i, n in enumerate(FEATURE_NAMES) if n.startswith("yellow")]
    assert f1[yellow].sum() > f0[yellow].sum()
    with pytest.raises(ValueError, match="uint8"):
        lesion_features(healthy.astype(np.float32))


def _toy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURE_NAMES)))
    dr = np.clip(np.rint(x[:, 0] * 1.2 + 2), 0, 4).astype(int)  # grade driven by feature 0
    dme = (x[:, 1] > 0.5).astype(int) * 3  # "present, grade unknown" when feature 1 is high
    return x, dr, dme


def test_fit_and_apply_recover_the_signal():
    x, dr, dme = _toy()
    g = fit_grader(x, dr, dme)
    assert all(isinstance(g[k], torch.Tensor) for k in ("mean", "scale", "dr_coef", "dme_coef"))
    xt, drt, dmet = _toy(100, seed=1)
    cnn_dme = np.tile([0.2, 0.6, 0.2], (100, 1))
    pdr, pdme = apply_grader(g, xt, cnn_dme)
    assert np.allclose(pdr.sum(1), 1) and np.allclose(pdme.sum(1), 1)
    assert np.mean(np.abs(pdr.argmax(1) - drt)) < 0.6
    present = pdme[:, 1] + pdme[:, 2]
    assert np.mean((present > 0.5) == (dmet > 0)) > 0.85
    assert np.allclose(pdme[:, 1], 3 * pdme[:, 2])  # grade 1 vs 2 split as the network's DME head says


def test_fit_needs_all_grades_and_apply_checks_feature_names():
    x, dr, dme = _toy()
    with pytest.raises(ValueError, match="all five grades"):
        fit_grader(x, np.minimum(dr, 3), dme)
    g = fit_grader(x, dr, dme)
    g["features"] = g["features"][:-1] + ["something_else"]
    with pytest.raises(ValueError, match="refit"):
        apply_grader(g, x, np.tile([1.0, 0, 0], (len(x), 1)))


def test_predictor_grades_with_the_checkpoints_grader(tmp_path):
    from screening.inference import Predictor
    from training.checkpoint import labels_dict, save_checkpoint
    from training.model import ModelConfig, build_model

    x, dr, dme = _toy()
    g = fit_grader(x, dr, dme)
    g["dr_coef"] = torch.zeros_like(g["dr_coef"])
    g["dr_intercept"] = torch.tensor([0.0, 0, 0, 0, 20.0], dtype=torch.float64)  # always grade 4
    cfg = ModelConfig(backbone="resnet18", image_size=64, decoder_channels=(16, 16, 16, 8, 8))
    path = save_checkpoint(tmp_path / "g.pt", {
        "model_state": build_model(cfg).state_dict(), "model_config": cfg.to_dict(), "labels": labels_dict(),
        "thresholds": {"referable": 0.5}, "provenance": {"kind": "real"}, "metrics": {}, "model_version": "g",
        "grader": g})
    images = [make_fundus(np.random.default_rng(i), size=64).image for i in range(2)]
    preds = Predictor(path, "cpu", 1).predict(images)
    assert [p.dr_grade for p in preds] == [4, 4] and all(p.referable for p in preds)
    assert features_of(images).shape == (2, len(FEATURE_NAMES))

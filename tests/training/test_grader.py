import cv2
import numpy as np
import pytest
import torch

from training.data.synthetic import make_fundus
from training.data.transforms import subtract_local_mean
from training.grader import (
    FEATURE_NAMES,
    FEATURE_SETS,
    SEG_FEATURE_NAMES,
    apply_grader,
    features_of,
    fit_grader,
    lesion_features,
    segmentation_features,
    uses_segmentation,
)


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


def test_segmentation_features_measure_the_lesion_maps():
    image = make_fundus(np.random.default_rng(3), size=128, dr_grade=0).image
    probs = np.zeros((5, 128, 128), np.float32)
    for y, x in ((50, 50), (70, 80), (60, 30)):  # three separate exudate spots, 5x5 px each, well inside the field
        probs[2, y:y + 5, x:x + 5] = 0.9
    probs[0, 64, 64] = 0.3  # a weak microaneurysm candidate: below 0.5, so no spot
    f = dict(zip(SEG_FEATURE_NAMES, segmentation_features(image, probs)))
    assert f["seg_EX_spots"] == pytest.approx(np.log1p(3)) and f["seg_EX_area50"] > 0 and f["seg_EX_p999"] == pytest.approx(0.9)
    assert f["seg_MA_spots"] == 0 and f["seg_MA_area50"] == 0 and 0 < f["seg_MA_mean"] < 1e-3
    assert f["seg_HE_mean"] == 0
    with pytest.raises(ValueError, match=r"seg_probs must have shape \(5, 128, 128\)"):
        segmentation_features(image, probs[:, :64])
    both = features_of([image, image], probs[None].repeat(2, 0))
    assert both.shape == (2, len(FEATURE_SETS["image+segmentation"]))
    assert np.array_equal(both[0, :len(FEATURE_NAMES)], lesion_features(image))


def test_a_grader_fitted_with_lesion_maps_needs_them():
    rng = np.random.default_rng(0)
    x, dr, dme = _toy()
    xs = np.c_[x, rng.normal(size=(len(x), len(SEG_FEATURE_NAMES)))]
    g = fit_grader(xs, dr, dme)
    assert uses_segmentation(g) and not uses_segmentation(fit_grader(x, dr, dme))
    cnn = np.tile([1.0, 0, 0], (len(x), 1))
    assert apply_grader(g, xs, cnn)[0].shape == (len(x), 5)
    with pytest.raises(ValueError, match=r"needs \(N, 43\) features \(with lesion maps\)"):
        apply_grader(g, x, cnn)
    with pytest.raises(ValueError, match="FEATURE_SETS"):
        fit_grader(x[:, :10], dr, dme)


def test_predictor_feeds_its_lesion_maps_to_a_segmentation_grader(tmp_path):
    from screening.inference import Predictor
    from training.checkpoint import labels_dict, save_checkpoint
    from training.model import ModelConfig, build_model

    x, dr, dme = _toy()
    g = fit_grader(np.c_[x, np.zeros((len(x), len(SEG_FEATURE_NAMES)))], dr, dme)
    n_img = len(FEATURE_NAMES)
    g["mean"] = torch.zeros_like(g["mean"])
    g["scale"] = torch.ones_like(g["scale"])
    g["dr_coef"] = torch.zeros_like(g["dr_coef"])
    g["dr_coef"][4, n_img + SEG_FEATURE_NAMES.index("seg_EX_mean")] = 100.0  # grade 4 iff the EX map is lit
    g["dr_intercept"] = torch.tensor([20.0, 0, 0, 0, 0], dtype=torch.float64)
    cfg = ModelConfig(backbone="resnet18", image_size=64, decoder_channels=(16, 16, 16, 8, 8))
    model = build_model(cfg)
    head = model.seg_head  # the final 3x3 convolution: zero weights, so the bias alone sets every lesion map
    torch.nn.init.zeros_(head.weight)
    images = [make_fundus(np.random.default_rng(i), size=64).image for i in range(2)]

    def grades(ex_bias: float) -> list[int]:
        with torch.no_grad():
            head.bias.copy_(torch.tensor([-10.0, -10, ex_bias, -10, -10]))
        path = save_checkpoint(tmp_path / f"g{ex_bias}.pt", {
            "model_state": model.state_dict(), "model_config": cfg.to_dict(), "labels": labels_dict(),
            "thresholds": {"referable": 0.5}, "provenance": {"kind": "real"}, "metrics": {}, "model_version": "g",
            "grader": g})
        return [p.dr_grade for p in Predictor(path, "cpu", 1).predict(images, explain=False)]

    assert grades(-10.0) == [0, 0] and grades(10.0) == [4, 4]


def test_image_features_are_measured_at_256_px_at_most():
    big = make_fundus(np.random.default_rng(4), size=512, dr_grade=2, dme_grade=2).image
    small = cv2.resize(big, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.array_equal(lesion_features(big), lesion_features(small))


def _reference_lesion_features(image):
    """lesion_features as first written (numpy reductions over the channel axis); the shipped grader was
    fitted on these values, so the faster code must give the same numbers."""
    if image.shape[0] > 256:
        image = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    e = subtract_local_mean(image).astype(np.float32)  # byte-identical to its reference (test_transforms)
    field = cv2.erode((image.max(axis=2) > 12).astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    g, b, lum = e[..., 1], e[..., 2], e.mean(axis=2)
    f = [((lum > t) & field).mean() for t in (150, 170, 190, 210)]
    f += [((g > t) & (b < t - 30) & field).mean() for t in (150, 170, 190, 210)]
    f += [((lum < t) & field).mean() for t in (100, 80, 60)]
    for k in (5, 9):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        for op in (cv2.MORPH_BLACKHAT, cv2.MORPH_TOPHAT):
            th = cv2.morphologyEx(image[..., 1], op, kernel)
            f += [((th > t) & field).mean() for t in (12, 20)]
    f += list(np.percentile(lum[field], [1, 5, 50, 95, 99]))
    f += list(np.std(e[field], axis=0))
    return np.asarray(f, dtype=np.float64)


@pytest.mark.parametrize("grade", [0, 2, 4])
def test_image_features_equal_the_reference_implementation(grade):
    img = make_fundus(np.random.default_rng(grade), size=512, dr_grade=grade, dme_grade=min(grade, 2)).image
    assert np.array_equal(lesion_features(img), _reference_lesion_features(img))


def test_a_blended_grader_mixes_the_heads_and_the_regression_by_its_weight():
    from training.grader import grades_with_grader

    x, dr, dme = _toy()
    g = fit_grader(x, dr, dme)
    xt, _, _ = _toy(50, seed=2)
    heads_dr = np.tile([0.0, 0.0, 0.0, 0.0, 1.0], (50, 1))
    heads_dme = np.tile([0.1, 0.6, 0.3], (50, 1))
    reg_dr, reg_dme = apply_grader(g, xt, heads_dme)
    assert all(np.array_equal(a, b) for a, b in zip(grades_with_grader(g, xt, heads_dr, heads_dme), (reg_dr, reg_dme)))
    pdr, pdme = grades_with_grader({**g, "heads_weight": 0.6}, xt, heads_dr, heads_dme)
    assert np.allclose(pdr, 0.6 * heads_dr + 0.4 * reg_dr) and np.allclose(pdme, 0.6 * heads_dme + 0.4 * reg_dme)
    assert np.allclose(pdr.sum(1), 1) and np.allclose(pdme.sum(1), 1)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="heads_weight"):
            grades_with_grader({**g, "heads_weight": bad}, xt, heads_dr, heads_dme)


def test_the_blend_weight_is_chosen_for_every_source_not_the_largest():
    """Heads that rank source A's photos perfectly and B's at random, a regression the other way round: the mean
    per-source AUC asks for both (a middle weight); heads informative everywhere and a regression at random: about
    the most the grid gives the heads."""
    from training.grader import HEADS_WEIGHT_GRID, choose_heads_weight

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    src = np.where(np.arange(n) < 300, "A", "B")  # A is three times B
    patients = np.arange(n) // 2

    def probs(signal):  # DR probabilities whose referable mass follows `signal`, no DME
        p = np.clip(signal, 0.01, 0.99)
        dr = np.c_[1 - p, np.zeros(n), p, np.zeros(n), np.zeros(n)]
        return dr, np.tile([1.0, 0.0, 0.0], (n, 1))

    noise = rng.uniform(size=n)
    good = 0.2 + 0.6 * y + 0.1 * rng.uniform(size=n)
    heads = probs(np.where(src == "A", good, noise))
    regression = probs(np.where(src == "B", good, noise))
    w, choices = choose_heads_weight(heads, regression, y, src, patients)
    assert len(choices) == 5 and 0.3 <= w <= 0.7
    fair = 0.3 * y + 0.7 * rng.uniform(size=n)  # informative but not separable: any noise mixed in costs AUC
    w, _ = choose_heads_weight(probs(fair), probs(noise), y, src, patients)
    assert w >= max(HEADS_WEIGHT_GRID) - 0.1

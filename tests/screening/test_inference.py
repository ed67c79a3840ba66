import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from screening.explain import head_cams
from screening.inference import Predictor, referable_probability
from training.checkpoint import CheckpointError
from training.data.synthetic import make_fundus


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor(tiny_checkpoint, "cpu", 1)


def _images(n, size=64):
    return [make_fundus(np.random.default_rng(i), size=size).image for i in range(n)]


class _DrOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).dr_logits


def test_head_cams_equal_gradcam_on_the_full_model(predictor):
    """Our one-forward CAM equals pytorch-grad-cam's own GradCAM on encoder.layer4 of the whole network."""
    x = predictor.to_tensor(_images(2))
    classes = [1, 3]
    out = predictor.forward(x)
    ours = head_cams(predictor.model.dr_head, out.features, classes, 64)
    wrapped = _DrOnly(predictor.model)
    with GradCAM(model=wrapped, target_layers=[predictor.model.encoder.layer4]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    assert ours.shape == ref.shape == (2, 64, 64)
    assert np.allclose(ours, ref, atol=1e-4)
    assert not np.allclose(ours[0], head_cams(predictor.model.dr_head, out.features, [0, 0], 64)[0], atol=1e-3)


def test_predict_runs_the_network_once_for_grades_masks_and_both_cams(predictor):
    calls = []
    handle = predictor.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        preds = predictor.predict(_images(3))
    finally:
        handle.remove()
    assert len(calls) == 1
    p = preds[0]
    assert p.masks.shape == (5, 64, 64) and p.dr_cam.shape == (64, 64) and p.dme_cam.shape == (64, 64)
    assert abs(sum(p.dr_probs) - 1) < 1e-5 and abs(sum(p.dme_probs) - 1) < 1e-5
    assert p.dr_grade == int(np.argmax(p.dr_probs))
    assert 0 <= p.dr_cam.min() and p.dr_cam.max() <= 1
    assert set(p.lesion_areas) == {"MA", "HE", "EX", "SE", "OD"}


def test_batch_equals_single_image_predictions(predictor):
    imgs = _images(3)
    batch = predictor.predict(imgs, explain=False)
    single = predictor.predict(imgs[1:2], explain=False)[0]
    assert np.allclose(batch[1].dr_probs, single.dr_probs, atol=1e-5)


def test_referable_probability():
    dr = np.array([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0], [0.5, 0.5, 0, 0, 0]])
    dme = np.array([[1.0, 0, 0], [1.0, 0, 0], [0.5, 0.5, 0]])
    assert np.allclose(referable_probability(dr, dme), [0.0, 1.0, 0.5])


def test_the_checkpoints_referable_calibration_maps_the_score_and_decides_referral(tmp_path, tiny_checkpoint, predictor):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["referable_calibration"] = {"method": "platt", "slope": 2.0, "intercept": -1.0, "n": 100}
    ckpt["thresholds"]["referable"] = 0.5
    path = tmp_path / "calibrated.pt"
    torch.save(ckpt, path)
    calibrated = Predictor(path, "cpu", 1)
    imgs = _images(2)
    raw = predictor.predict(imgs, explain=False)
    mapped = calibrated.predict(imgs, explain=False)
    for r, m in zip(raw, mapped):
        z = np.log(r.referable_score / (1 - r.referable_score))
        assert m.referable_score == pytest.approx(1 / (1 + np.exp(-(2.0 * z - 1.0))), rel=1e-5)
        assert m.referable == (m.referable_score >= 0.5)
        assert m.dr_probs == pytest.approx(r.dr_probs)  # the heads' own probabilities are untouched


def test_checkpoint_without_metadata_is_refused(tmp_path, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    del ckpt["provenance"]
    bad = tmp_path / "bare.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="provenance"):
        Predictor(bad, "cpu", 1)


def test_v2_evidence_heads_grade_and_explain_from_one_forward(tmp_path, make_tiny_checkpoint):
    """A features+lesions checkpoint: one forward gives grades, masks and both CAMs; the report names the source."""
    predictor = Predictor(make_tiny_checkpoint(tmp_path / "v2.pt", grade_inputs="features+lesions"), "cpu", 1)
    calls = []
    handle = predictor.model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        preds = predictor.predict(_images(2))
    finally:
        handle.remove()
    assert len(calls) == 1
    for p in preds:
        assert abs(sum(p.dr_probs) - 1) < 1e-5 and p.dr_cam.shape == (64, 64)
        assert 0 <= p.dr_cam.min() and p.dr_cam.max() <= 1
    out = predictor.forward(predictor.to_tensor(_images(1)))
    from training.model import lesion_evidence

    evidence = lesion_evidence(out.seg_logits)
    maps = [head_cams(predictor.model.dr_head, out.features, [c], 64, evidence) for c in range(5)]
    assert any(m.max() > 0.5 for m in maps)  # gradients reach the features through the evidence head
    assert any(not np.allclose(maps[0], m, atol=1e-3) for m in maps[1:])  # the map depends on the class explained
    assert "lesion maps" in predictor.report_metrics()["Grades from"]
    assert "image features)" in Predictor(make_tiny_checkpoint(tmp_path / "v1.pt"), "cpu", 1).report_metrics()["Grades from"]

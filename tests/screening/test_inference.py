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


# --- GPU: half precision, pinned transfers, batches sized by memory; the CPU path unchanged ------------------

from pathlib import Path  # noqa: E402

from screening.inference import MEMORY_HEADROOM, batch_size_for_memory  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "baseline.pt"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)")


def test_cpu_path_is_bit_identical_to_plain_float32(predictor):
    """The default CPU predictor runs exactly the pre-GPU operations (stack, .to, inference_mode forward):
    every output tensor is bit-for-bit what the plain float32 model gives."""
    imgs = _images(3)
    assert predictor.precision == "float32" and predictor.device.type == "cpu"
    out = predictor.run(predictor.prepare(imgs))
    with torch.inference_mode():
        ref = predictor.model(torch.stack([predictor.transform(image=im)["image"] for im in imgs]))
    for name in ("dr_logits", "dme_logits", "seg_logits", "features"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_batch_size_for_memory():
    gb = 1e9
    # 1 GB fixed + 0.5 GB per image in 20 GB: (20 / 1.25 - 1) / 0.5 = 30 images
    assert batch_size_for_memory(20 * gb, 1 * gb, 0.5 * gb) == 30
    assert batch_size_for_memory(20 * gb, 1 * gb, 0.5 * gb, cap=8) == 8
    assert batch_size_for_memory(1000 * gb, 0, 1e6) == 256  # never more than MAX_GPU_BATCH
    assert batch_size_for_memory((1 + 0.5) * gb * MEMORY_HEADROOM, 1 * gb, 0.5 * gb) == 1
    with pytest.raises(ValueError, match="not enough for one image"):
        batch_size_for_memory(1.5 * gb, 1 * gb, 0.5 * gb)


def test_memory_measurement_needs_cuda(predictor):
    with pytest.raises(RuntimeError, match="CUDA"):
        predictor.measure_memory()


def test_unknown_precision_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="precision 'float8'"):
        Predictor(tiny_checkpoint, "cpu", 1, precision="float8")
    with pytest.raises(ValueError, match="precision 'bfloat16'.*changed a referral"):
        Predictor(tiny_checkpoint, "cpu", 1, precision="bfloat16")  # type: ignore[arg-type]


# What "matches float32" means for half-precision inference (measured with the shipped model v2 on 8 real photos:
# float16 differs by at most 0.0025 in a probability and 1e-5 of the pixels in a mask; bfloat16 by up to 0.03, with a
# referral changed at the threshold, which is why it is refused).
PROB_TOL = 0.02  # any DR/DME probability and the referable score
MASK_PIXELS_TOL = 0.001  # share of a mask's pixels that may flip at the lesion threshold
AREA_TOL = 0.001  # lesion area as a fraction of the fundus field
CAM_MEAN_TOL = 0.02  # mean absolute difference of a Grad-CAM map (values in [0, 1])


def assert_matches_float32(ref, half):
    for a, b in zip(ref, half):
        assert np.abs(np.subtract(a.dr_probs, b.dr_probs)).max() <= PROB_TOL
        assert np.abs(np.subtract(a.dme_probs, b.dme_probs)).max() <= PROB_TOL
        assert abs(a.referable_score - b.referable_score) <= PROB_TOL
        for probs, grade, other in ((a.dr_probs, a.dr_grade, b.dr_grade), (a.dme_probs, a.dme_grade, b.dme_grade)):
            top2 = np.sort(probs)[-2:]
            if top2[1] - top2[0] > 2 * PROB_TOL:  # a near-tie may go either way; anything else may not
                assert grade == other
        assert (a.masks != b.masks).mean() <= MASK_PIXELS_TOL
        assert max(abs(a.lesion_areas[k] - b.lesion_areas[k]) for k in a.lesion_areas) <= AREA_TOL
        assert np.abs(a.dr_cam - b.dr_cam).mean() <= CAM_MEAN_TOL and np.abs(a.dme_cam - b.dme_cam).mean() <= CAM_MEAN_TOL


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(
    "device, precision",
    [
        # the product never runs half precision on a CPU (config refuses it); this proves the autocast path and
        # the tolerance check where no GPU is present. float16 convolutions on a CPU take torch's slow reference
        # path (aten::_slow_conv2d_forward: 98 s for one 512 px photo on the AVX2 test machine, 18 s at 256 px),
        # so the CPU case runs one photo at 256 px; the GPU case runs eight at the model's own size
        ("cpu", "float16"),
        pytest.param("cuda", "float16", marks=needs_cuda),
    ],
)
def test_half_precision_matches_float32_on_real_photos(shared_data, device, precision):
    from screening.imaging import decode

    if not SHIPPED.is_file():
        pytest.skip(f"shipped model not found at {SHIPPED}")
    from training.api import eval_transforms

    ref = Predictor(SHIPPED, device, 2)
    half = Predictor(SHIPPED, device, 2, precision=precision)
    if device == "cpu":  # the network is fully convolutional: both predictors at 256 px (see the parameters)
        for predictor in (ref, half):
            predictor.size = 256
            predictor.transform = eval_transforms(256, predictor.model.config.contrast)
    paths = sorted((shared_data / "srahim").glob("Patient00*.jpg"))[:1 if device == "cpu" else 8]
    images = [decode(p, ref.size).rgb for p in paths]
    batch = half.prepare(images)
    out = half.run(batch)
    assert out.seg_logits.dtype == torch.float16 and out.dr_logits.dtype == torch.float32  # heads stay float32
    assert_matches_float32(ref.predict(images), half.finish(batch, out))


@needs_cuda
def test_gpu_batch_from_memory_fits_and_transfers_from_pinned_memory(tiny_checkpoint, monkeypatch):
    p = Predictor(tiny_checkpoint, "cuda", 1, precision="float16")
    fixed, per_image = p.measure_memory()
    assert per_image > 0
    budget_gb = (fixed + 10 * per_image) * MEMORY_HEADROOM / 1e9
    n = p.batch_size_for(budget_gb)
    assert 9 <= n <= 10
    pinned = []
    real_pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or real_pin(self, *a))
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    preds = p.predict(_images(n))
    torch.cuda.synchronize()
    assert len(preds) == n and pinned
    assert torch.cuda.max_memory_allocated() - start <= budget_gb * 1e9
    cpu = Predictor(tiny_checkpoint, "cpu", 1).predict(_images(n), explain=False)
    assert np.abs(np.subtract([q.dr_probs for q in preds], [q.dr_probs for q in cpu])).max() <= PROB_TOL


@needs_cuda
def test_worker_batch_is_sized_by_gpu_memory(tmp_path, tiny_checkpoint, intake_models):
    from screening import cli
    from screening.config import load_screening_settings

    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ncheckpoint = '{tiny_checkpoint}'\nquality_model = '{intake_models['gradable']}'\n"
                   f"laterality_model = '{intake_models['unsure_eye']}'\ndevice = 'cuda'\nprecision = 'float16'\n"
                   f"gpu_memory_gb = 2\nbatch_size = 48\ndatabase = 'sqlite:///{tmp_path / 'db.sqlite'}'\n")
    with cli.make_worker(load_screening_settings(cfg), cfg) as worker:
        assert worker.s.batch_size == 48  # the tiny model fits 48 images in 2 GB many times over: the cap holds
        assert worker.predictor.precision == "float16" and worker.predictor.device.type == "cuda"


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


def test_a_blended_checkpoint_grades_with_both_and_its_own_calibration(tmp_path, make_tiny_checkpoint):
    """Model v2.1: the network's heads and the v1 lesion regression, w x heads + (1 - w) x regression; P(referable)
    through the blend's own Platt map; the report says what produced the grades, with the shares."""
    from training.checkpoint import read_checkpoint, save_checkpoint
    from training.grader import FEATURE_NAMES, apply_grader, features_of, fit_grader
    from training.metrics import calibrated_referable

    heads_only = make_tiny_checkpoint(tmp_path / "v2.pt", grade_inputs="features+lesions")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, len(FEATURE_NAMES)))
    grader = fit_grader(x, np.arange(100) % 5, (np.arange(100) % 3 == 0).astype(int))
    calibration = {"method": "platt", "slope": 0.5, "intercept": -0.2, "n": 100}
    ckpt = read_checkpoint(heads_only)
    ckpt.update(grader={**grader, "heads_weight": 0.6}, referable_calibration=calibration)
    blended = save_checkpoint(tmp_path / "v2.1.pt", ckpt)

    images = _images(3)
    heads = Predictor(heads_only, "cpu", 1).predict(images, explain=False)
    got = Predictor(blended, "cpu", 1).predict(images, explain=False)
    h_dr, h_dme = np.array([p.dr_probs for p in heads]), np.array([p.dme_probs for p in heads])
    r_dr, r_dme = apply_grader(grader, features_of(images), h_dme)
    want_dr, want_dme = 0.6 * h_dr + 0.4 * r_dr, 0.6 * h_dme + 0.4 * r_dme
    assert np.allclose([p.dr_probs for p in got], want_dr, atol=1e-5)
    assert np.allclose([p.dme_probs for p in got], want_dme, atol=1e-5)
    assert np.allclose([p.referable_score for p in got], calibrated_referable(want_dr, want_dme, calibration), atol=1e-5)
    source = Predictor(blended, "cpu", 1).report_metrics()["Grades from"]
    assert "heads (60%)" in source and "regression on image measurements (40%)" in source

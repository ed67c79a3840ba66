"""Grading stage: evidence heads on a frozen trunk, cached head inputs, temperature scaling, the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training.checkpoint import load_model
from training.data.synthetic import write_synthetic_dataset
from training.grading import (
    CHUNK,
    GridPoint,
    Heads,
    fit_temperature,
    fold_temperature,
    head_inputs_of,
    run_grading_stage,
    source_weights,
    temper_network,
    trunk_model,
)
from training.model import ModelConfig, build_model, lesion_evidence
from training.model.heads import EVIDENCE_STATS, EvidenceHead

TINY = dict(backbone="resnet18", image_size=64, decoder_channels=(16, 16, 16, 8, 8), dropout=0.0)


def test_evidence_heads_read_pooled_features_and_lesion_evidence() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, grade_inputs="features+lesions")).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        features, seg = model.trunk(x)
        vector = EvidenceHead.pooled(features, lesion_evidence(seg))
    assert vector.shape == (3, 2 * 512 + 5 * len(EVIDENCE_STATS))
    assert torch.allclose(out.dr_logits, model.dr_head.classify(vector), atol=1e-5)
    assert out.dme_logits.shape == (3, 3) and out.features.shape == features.shape
    # the evidence moves with the lesion maps: more lesion logit, more evidence
    assert (lesion_evidence(seg + 5.0)[:, :5] > lesion_evidence(seg)[:, :5]).all()
    with pytest.raises(ValueError, match="grade_inputs"):
        build_model(ModelConfig(**TINY, grade_inputs="pixels"))


def test_old_checkpoints_keep_pooled_feature_heads() -> None:
    cfg = ModelConfig.from_dict({k: v for k, v in ModelConfig(**TINY).to_dict().items() if k != "grade_inputs"})
    assert cfg.grade_inputs == "features"
    assert type(build_model(cfg).dr_head).__name__ == "ClassificationHead"


def test_folding_a_temperature_divides_the_logits_exactly() -> None:
    torch.manual_seed(0)
    heads = Heads(2 * 8 + 4, 4, GridPoint(0.0, 0.0, hidden=16)).eval()
    v = torch.randn(10, 20)
    before = heads(v)[0]
    fold_temperature(heads.dr_head, 2.5)
    assert torch.allclose(heads(v)[0], before / 2.5, atol=1e-6)


def test_fit_temperature_recovers_an_overconfident_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=gen) * 1.5
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=gen).squeeze(1)
    t = fit_temperature(true_logits * 3.0, lambda z: F.cross_entropy(z, labels))
    assert 2.6 < t < 3.4


def test_tempering_a_whole_network_from_its_probabilities_scales_its_logits() -> None:
    """E8's heads were trained end to end: T is fitted on their validation probabilities (log-probabilities are
    the logits up to a per-photo constant) and folded into both heads of the network; grades do not move."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).eval()
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    gen = torch.Generator().manual_seed(1)
    true_logits = torch.randn(3000, 5, generator=gen) * 1.5
    dr_y = torch.multinomial(true_logits.softmax(1), 1, generator=gen).squeeze(1).numpy()
    dr_y[:100] = -1  # ungraded photos are left out of the fit
    dme_logits = torch.randn(3000, 3, generator=gen)
    dme_y = torch.multinomial(dme_logits.softmax(1), 1, generator=gen).squeeze(1).numpy()
    dr_p, dme_p = (true_logits * 3.0).softmax(1).numpy(), (dme_logits * 0.5).softmax(1).numpy()
    dr_t, dme_t, temps = temper_network(model, dr_p, dme_p, dr_y, dme_y)
    assert 2.6 < temps["dr_temperature"] < 3.4 and 0.4 < temps["dme_temperature"] < 0.6
    np.testing.assert_allclose(dr_t, true_logits.softmax(1).numpy(), atol=0.03)
    assert (dr_t.argmax(1) == dr_p.argmax(1)).all()
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after.dr_logits, before.dr_logits / temps["dr_temperature"], atol=1e-5)
    assert torch.allclose(after.dme_logits, before.dme_logits / temps["dme_temperature"], atol=1e-5)
    assert torch.equal(after.seg_logits, before.seg_logits)


def test_source_weights_even_out_source_sizes() -> None:
    w = source_weights(["a"] * 90 + ["b"] * 10)
    assert w.mean() == pytest.approx(1.0)
    share_a, share_b = w[:90].sum() / w.sum(), w[90:].sum() / w.sum()
    assert 0.5 < share_a < 0.9 and share_b > 0.1  # sqrt weighting: b from 10% to 25%


@pytest.fixture(scope="module")
def trunk_run(tmp_path_factory: pytest.TempPathFactory, tiny_config_factory) -> tuple[object, Path]:
    """A tiny trunk trained for two steps on 40 synthetic photos (20 patients)."""
    from training.train import run_training

    root = tmp_path_factory.mktemp("grading")
    csv = write_synthetic_dataset(root / "data", 40, size=80, seed=3)
    cfg = tiny_config_factory(csv, root / "trunk", root / "cache")
    run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    return cfg, root


def test_grading_stage_writes_a_calibrated_checkpoint_the_worker_can_load(trunk_run) -> None:
    cfg, root = trunk_run
    out = root / "graded"
    logs: list[str] = []
    summary = run_grading_stage(cfg, root / "trunk" / "best.pt", out, grid=(GridPoint(0.0, 1e-4, hidden=32),),
                                epochs=4, log=logs.append, command="pytest")
    assert any("ETA" in line for line in logs)
    model, meta = load_model(out / "graded.pt")
    assert model.config.grade_inputs == "features+lesions"
    cal = meta["provenance"]["calibration"]
    assert cal["dr_temperature"] > 0 and cal["dme_temperature"] > 0
    # P(referable) itself is mapped on validation when both classes are there, and the threshold is on that scale
    if cal["referable"] is not None:
        assert meta["referable_calibration"] == cal["referable"] and cal["referable"]["slope"] > 0
    else:
        assert "referable_calibration" not in meta and cal["referable_skipped"]  # said why, threshold on the raw score
    assert 0.0 <= meta["thresholds"]["referable"] <= 1.0 and "grader" not in meta
    assert meta["provenance"]["init_from"]["sha256"] and summary["chosen"] == "dropout0.0-wd0.0001-h32"
    # the trunk is the init checkpoint's, unchanged; the cached head inputs equal the saved model's own forward
    trunk, _ = trunk_model(cfg, root / "trunk" / "best.pt", torch.device("cpu"))
    for name, value in trunk.encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[name]), name
    from training.data.cache import load_record
    from training.data.split import configured_split

    rec = [r for r in configured_split(cfg.data)["train"] if r.has_grade][0]
    image = load_record(rec, 64, cfg.data.cache_dir).image
    cached = np.concatenate([np.load(p) for p in sorted((out / "head-inputs").glob("*.npy"))])
    fresh = head_inputs_of(model, [image], torch.device("cpu"))
    assert np.isclose(cached, fresh, atol=1e-4).all(axis=1).any()
    assert json.loads((out / "grading.json").read_text())["threshold"] == pytest.approx(meta["thresholds"]["referable"])


def test_grading_stage_resumes_from_cached_chunks(trunk_run, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, root = trunk_run
    out = root / "resumed"
    point = (GridPoint(0.0, 1e-4, hidden=16),)
    run_grading_stage(cfg, root / "trunk" / "best.pt", out, grid=point, epochs=2, log=lambda _m: None)
    chunks = {p: p.stat().st_mtime_ns for p in (out / "head-inputs").glob("*.npy")}
    assert chunks and CHUNK >= 1

    def no_forward(*_a, **_k):  # a rerun must not run the trunk again
        raise AssertionError("trunk forward ran although every chunk was cached")

    monkeypatch.setattr("training.grading.head_inputs_of", no_forward)
    run_grading_stage(cfg, root / "trunk" / "best.pt", out, grid=point, epochs=2, log=lambda _m: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "head-inputs").glob("*.npy")} == chunks

"""fit-grader and evaluate on a checkpoint: the grader's validation numbers are what evaluate reproduces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import read_checkpoint
from training.data.synthetic import write_synthetic_dataset
from training.evaluate import evaluate_checkpoint, fit_grader_for_checkpoint
from training.grader import uses_segmentation
from training.train import run_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def graded_run(tmp_path_factory: pytest.TempPathFactory, tiny_config_factory):
    """A tiny two-step run on 48 synthetic images (24 patients): enough for every grade in the training split."""
    root = tmp_path_factory.mktemp("fitgrader")
    csv = write_synthetic_dataset(root / "data", 48, size=96, seed=5)
    cfg = tiny_config_factory(csv, root / "run", root / "cache")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_fraction": 0.3, "test_fraction": 0.1})})
    run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    return cfg, root / "run" / "best.pt"


@pytest.mark.parametrize("segmentation", [False, True])
def test_fit_grader_writes_a_checkpoint_whose_evaluation_matches(graded_run, tmp_path: Path, segmentation: bool) -> None:
    cfg, best = graded_run
    out = tmp_path / "graded.pt"
    result = fit_grader_for_checkpoint(cfg, best, out, segmentation=segmentation)
    ckpt = read_checkpoint(out)
    assert uses_segmentation(ckpt["grader"]) is segmentation
    assert ckpt["model_version"].endswith("+lesion-seg-lr" if segmentation else "+lesion-lr")
    assert ckpt["thresholds"]["referable"] == pytest.approx(result["threshold"])
    assert "grader" not in read_checkpoint(best)  # the source checkpoint is left as it was
    summary = evaluate_checkpoint(cfg, out, "val", tmp_path / "eval", bootstrap=10, progress=False)["summary"]
    assert summary["referable"]["auc"] == pytest.approx(result["validation"]["val_ref_auc"])
    assert summary["dr_kappa"] == pytest.approx(result["validation"]["val_kappa"])


@pytest.mark.slow
def test_blend_grader_writes_an_ensemble_whose_evaluation_matches(graded_run, tmp_path: Path) -> None:
    """blend-grader: the network's heads with another checkpoint's regression; evaluate reproduces its validation
    numbers (so the worker, evaluation and the card apply one rule), and the threshold is on the blend's own
    calibrated scale."""
    from training.evaluate import blend_grader_for_checkpoint

    cfg, best = graded_run
    donor = tmp_path / "regression.pt"
    fit_grader_for_checkpoint(cfg, best, donor, segmentation=True)
    out = tmp_path / "blend.pt"
    result = blend_grader_for_checkpoint(cfg, best, donor, out, heads_weight=0.6)
    ckpt = read_checkpoint(out)
    assert ckpt["grader"]["heads_weight"] == 0.6 and uses_segmentation(ckpt["grader"])
    assert ckpt["model_version"].endswith("+blend-lesion-lr-0.6")
    assert ckpt["referable_calibration"] == result["calibration"]
    assert ckpt["metrics"]["validation"]["val_ece_referable"] == pytest.approx(result["validation"]["val_ece_referable"])
    assert ckpt["metrics"]["validation"]["val_ece_referable"] != read_checkpoint(best)["metrics"]["validation"].get(
        "val_ece_referable")  # the blend's own, not the network's carried over
    assert ckpt["provenance"]["grader"]["model_version"] == read_checkpoint(donor)["model_version"]
    # the tiny run's heads were trained end to end, never calibrated: tempered on validation, folded into the saved
    # weights (evaluate below reproduces the blend's numbers only if they were), the rest of the network unchanged
    temps = ckpt["provenance"]["calibration"]
    assert "calibration" not in read_checkpoint(best)["provenance"] and temps["dr_temperature"] > 0
    source = read_checkpoint(best)["model_state"]
    changed = {k for k, v in ckpt["model_state"].items() if not torch.equal(v, source[k])}
    assert changed and all(k.startswith(("dr_head.mlp", "dme_head.mlp")) for k in changed)
    summary = evaluate_checkpoint(cfg, out, "val", tmp_path / "eval", bootstrap=10, progress=False)["summary"]
    assert summary["referable"]["auc"] == pytest.approx(result["validation"]["val_ref_auc"])
    assert summary["dr_kappa"] == pytest.approx(result["validation"]["val_kappa"])
    again = blend_grader_for_checkpoint(cfg, out_calibrated := _without_grader(out, tmp_path), donor,
                                        tmp_path / "blend2.pt", heads_weight=0.6)
    assert read_checkpoint(tmp_path / "blend2.pt")["provenance"]["calibration"] == temps  # not tempered twice
    for k, v in read_checkpoint(out_calibrated)["model_state"].items():
        assert torch.equal(read_checkpoint(tmp_path / "blend2.pt")["model_state"][k], v), k
    assert again["threshold"] == pytest.approx(result["threshold"])
    with pytest.raises(ValueError, match="already carries a grader"):
        blend_grader_for_checkpoint(cfg, out, donor, tmp_path / "again.pt", heads_weight=0.5)
    with pytest.raises(ValueError, match="carries no lesion-evidence grader"):
        blend_grader_for_checkpoint(cfg, best, best, tmp_path / "none.pt", heads_weight=0.5)


def _without_grader(path: Path, tmp_path: Path) -> Path:
    """The blend's network alone (tempered heads, calibration in its provenance), as a network-only checkpoint."""
    from training.checkpoint import save_checkpoint

    ckpt = read_checkpoint(path)
    ckpt.pop("grader")
    return save_checkpoint(tmp_path / "calibrated.pt", ckpt)


def test_evaluation_reads_the_graders_lesion_evidence_from_its_one_network_pass(
    graded_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segmentation grader's features come from the pass that gives the heads' grades: one forward per batch
    (a second pass doubled the evaluation of the shipped model), and the same features a separate pass gives."""
    import numpy as np

    from training.checkpoint import load_model
    from training.evaluate import _features, _pass, _split
    from training.model import MultiTaskNet

    cfg, best = graded_run
    graded = tmp_path / "graded.pt"
    fit_grader_for_checkpoint(cfg, best, graded, segmentation=True)
    model, meta = load_model(graded, torch.device("cpu"))
    recs = _split(cfg, meta)["val"]
    batches = -(-len(recs) // cfg.train.batch_size)
    assert batches > 1
    forward, calls = MultiTaskNet.forward, []

    def counting(self, x):
        calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(MultiTaskNet, "forward", counting)
    evaluate_checkpoint(cfg, graded, "val", tmp_path / "eval", bootstrap=10, progress=False)
    assert len(calls) == batches and sum(calls) == len(recs)
    monkeypatch.undo()

    preds = _pass(model, recs, cfg, torch.device("cpu"), progress=False, seg_features=True)
    separate = _features(recs, model.config.image_size, cfg.data.cache_dir, model, torch.device("cpu"),
                         batch_size=cfg.train.batch_size)
    assert preds.extra is not None and preds.extra.shape == separate.shape
    np.testing.assert_allclose(preds.extra, separate, rtol=1e-5, atol=1e-6)
    assert _pass(model, recs, cfg, torch.device("cpu"), progress=False).extra is None

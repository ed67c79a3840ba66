"""Checkpoints written by training: safe loading, self-description, metadata refusal and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.train as train_module
from training.checkpoint import REQUIRED_KEYS, CheckpointError, export_checkpoint, load_model
from training.train import run_training

from .conftest import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained_with_model(tiny_csv: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tiny epoch; also hands back the in-memory model that training produced."""
    built = []

    def capture(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model)
        return model

    original = train_module.build_model
    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = tiny_config(tiny_csv, out, shared_cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build_model", capture)
        state = run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    assert state.epoch == 1 and len(built) == 1
    return out, built[0].eval()


def _inputs() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = model(x)
    return {"dr": out.dr_logits, "dme": out.dme_logits, "seg": out.seg_logits}


def _write_variant(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_training_checkpoints_load_with_weights_only(trained_with_model, name: str) -> None:
    out, _ = trained_with_model
    ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
    assert set(REQUIRED_KEYS) <= set(ckpt)
    assert {"optimizer_state", "scheduler_state", "epoch", "history"} <= set(ckpt)
    assert ckpt["provenance"]["kind"] == "synthetic"
    assert 0.0 <= ckpt["thresholds"]["referable"] <= 1.0
    assert ckpt["model_config"]["backbone"] == "resnet18" and ckpt["model_config"]["image_size"] == 64
    assert not list(out.glob("*.tmp")), "atomic save left a temporary file behind"


def test_load_model_rebuilds_from_checkpoint_alone(trained_with_model) -> None:
    out, trained = trained_with_model
    model, meta = load_model(out / "last.pt")
    assert not model.training
    assert tuple(model.config.decoder_channels) == (16, 16, 16, 8, 8)
    assert meta["provenance"]["kind"] == "synthetic" and len(meta["checkpoint_sha256"]) == 64
    assert "model_state" not in meta and "optimizer_state" not in meta
    x = _inputs()
    got, want = _outputs(model, x), _outputs(trained, x)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c.pop("provenance"), "provenance"),
        (lambda c: c.pop("model_config"), "model_config"),
        (lambda c: c["thresholds"].pop("referable"), "thresholds.referable"),
        (lambda c: c["provenance"].update(kind="handmade"), "provenance.kind"),
        (lambda c: c["provenance"].pop("kind"), "provenance.kind"),
        (lambda c: c.update(referable_calibration={"method": "platt", "slope": -1.0, "intercept": 0.0}),
         "referable_calibration"),
        (lambda c: c.update(referable_calibration={"method": "isotonic"}), "referable_calibration"),
        (lambda c: c.update(grader={"heads_weight": 1.0}), "grader.heads_weight"),
        (lambda c: c.update(grader={"heads_weight": "0.6"}), "grader.heads_weight"),
    ],
    ids=["no-provenance", "no-model-config", "no-referable-threshold", "bad-kind", "no-kind", "negative-slope",
         "unknown-calibration", "blend-weight-one", "blend-weight-text"],
)
def test_load_model_refuses_checkpoints_lacking_metadata(trained_with_model, tmp_path: Path, edit, named: str) -> None:
    out, _ = trained_with_model
    bad = _write_variant(out / "best.pt", tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_model(bad)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        export_checkpoint(bad, tmp_path / "exported.pt")


def test_load_model_refuses_a_bare_state_dict_and_a_missing_file(trained_with_model, tmp_path: Path) -> None:
    out, trained = trained_with_model
    bare = tmp_path / "bare.pt"
    torch.save(trained.state_dict(), bare)
    with pytest.raises(CheckpointError, match="lacks required metadata"):
        load_model(bare)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt")


def test_export_half_is_smaller_fp16_and_predicts_like_fp32(trained_with_model, tmp_path: Path) -> None:
    out, trained = trained_with_model
    src = out / "best.pt"
    dst = export_checkpoint(src, tmp_path / "shipped.pt", half=True)
    shipped = torch.load(dst, map_location="cpu", weights_only=True)
    assert "optimizer_state" not in shipped and "scheduler_state" not in shipped
    floats = [v for v in shipped["model_state"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert dst.stat().st_size < src.stat().st_size
    original = torch.load(src, map_location="cpu", weights_only=True)
    for key in ("thresholds", "provenance", "labels", "model_config", "model_version"):
        assert shipped[key] == original[key], key

    model, meta = load_model(dst)
    assert meta["thresholds"] == original["thresholds"]
    x = _inputs()
    got, want = _outputs(model, x), _outputs(trained, x)
    torch.testing.assert_close(got["dr"].softmax(1), want["dr"].softmax(1), atol=2e-2, rtol=0)
    torch.testing.assert_close(got["dme"].softmax(1), want["dme"].softmax(1), atol=2e-2, rtol=0)
    torch.testing.assert_close(torch.sigmoid(got["seg"]), torch.sigmoid(want["seg"]), atol=2e-2, rtol=0)

    full = export_checkpoint(src, tmp_path / "full.pt", half=False)
    full_state = torch.load(full, map_location="cpu", weights_only=True)["model_state"]
    assert all(v.dtype == torch.float32 for v in full_state.values() if v.is_floating_point())


def test_test_summary_carries_per_source_clinical_numbers() -> None:
    import numpy as np

    from training.checkpoint import test_summary
    from training.evaluation import clinical_evaluation

    rng = np.random.default_rng(1)
    dr_y = rng.integers(0, 5, 40)
    dr_p = np.eye(5)[dr_y] * 0.5 + 0.1
    clinical = clinical_evaluation(dr_p, np.full((40, 3), 1 / 3), dr_y, np.full(40, -1), [f"p{i // 2}" for i in range(40)],
                                   ["aptos"] * 20 + ["eyepacs"] * 20, threshold=0.5, bootstrap=20)
    out = test_summary({"referable": {"auc": 0.1}, "dr": {"quadratic_kappa": 0.2}, "clinical": clinical})
    assert out["referable AUC"] == clinical["overall"]["eye"]["auc"]["value"]  # v2: DR-only sets count
    assert set(out["by_source"]) == {"aptos", "eyepacs"}
    assert out["by_source"]["aptos"]["patients"] == 10 and "eye AUC 95% CI" in out["overall"]


class _RunsCode:
    """Unpickled, it would create ``marker``: a file holding code, as an attacker would ship it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_hostile_and_damaged_checkpoints_are_refused_without_quoting_torchs_advice(tmp_path: Path) -> None:
    """torch's refusal message tells the reader to load with weights_only=False, i.e. to run the file's code."""
    from training.checkpoint import read_checkpoint

    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model_state": _RunsCode(marker)}, hostile)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(hostile)
    assert "could run code" in str(exc.value) and "weights_only" not in str(exc.value).lower()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(damaged)
    assert "not a loadable checkpoint" in str(exc.value) and "weights_only" not in str(exc.value).lower()
    assert not marker.exists()


def test_fitted_model_files_are_refused_without_quoting_torchs_advice(tmp_path: Path) -> None:
    """The gradability and laterality files load through the same guard as checkpoints (they quoted torch)."""
    from training.checkpoint import load_fitted

    marker = tmp_path / "ran"
    hostile = tmp_path / "quality.pt"
    torch.save({"weights": _RunsCode(marker)}, hostile)
    with pytest.raises(CheckpointError) as exc:
        load_fitted(hostile, what="gradability", command="fit-quality", setting="quality_model", error=CheckpointError)
    message = str(exc.value)
    assert "could run code" in message and "fit-quality" in message and "weights_only" not in message.lower()
    assert not marker.exists()

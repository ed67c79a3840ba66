"""interpolate (WiSE-FT): the weight line between a network and one fine-tuned from it, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from training.data.synthetic import write_synthetic_dataset
from training.evaluate import evaluate_checkpoint
from training.grading import fold_temperature
from training.interpolate import interpolate_checkpoints, interpolate_states, interpolated_network
from training.train import run_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_config_factory):
    """A tiny run (the start) and a second run fine-tuned from its best.pt (the end)."""
    root = tmp_path_factory.mktemp("wise")
    csv = write_synthetic_dataset(root / "data", 32, size=96, seed=3)
    cfg = tiny_config_factory(csv, root / "start", root / "cache")
    run_training(cfg, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    start = root / "start" / "best.pt"
    tuned = cfg.model_copy(update={"train": cfg.train.model_copy(update={"out_dir": root / "end", "init_from": start,
                                                                         "lr": 1e-2, "seed": 1})})
    run_training(tuned, kind="synthetic", resume=False, progress=False, command="pytest", log=lambda _m: None)
    return cfg, start, root / "end" / "best.pt"


def _float_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in read_checkpoint(path)["model_state"].items()}


def test_the_line_starts_at_the_start_ends_at_the_end_and_halves_between() -> None:
    a = {"w": torch.tensor([0.0, 2.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(7)}
    assert torch.equal(interpolate_states(a, b, 0.0)["w"], torch.tensor([0.0, 2.0]))
    assert torch.equal(interpolate_states(a, b, 1.0)["w"], torch.tensor([4.0, 6.0]))
    mid = interpolate_states(a, b, 0.5)
    assert torch.equal(mid["w"], torch.tensor([2.0, 4.0])) and mid["w"].dtype == torch.float32
    assert int(mid["n"]) == 7  # batch-norm counters are the end's, not averaged


def test_the_line_refuses_an_alpha_outside_it_and_networks_of_different_shape() -> None:
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="alpha"):
        interpolate_states(a, b, 1.5)
    with pytest.raises(CheckpointError, match="different layers"):
        interpolate_states(a, {"v": torch.ones(2)}, 0.5)
    with pytest.raises(CheckpointError, match="shape"):
        interpolate_states(a, {"w": torch.ones(3)}, 0.5)


def test_a_pair_that_is_not_start_and_its_fine_tuning_is_refused_naming_init_from(pair) -> None:
    _, start, end = pair
    with pytest.raises(CheckpointError, match="init_from"):
        interpolated_network(end, start, 0.5)  # the wrong way round: start was not fine-tuned from end


def test_the_midpoint_network_is_the_average_of_the_two_networks(pair) -> None:
    _, start, end = pair
    model, ckpt = interpolated_network(start, end, 0.5)
    a, b, mid = _float_state(start), _float_state(end), model.state_dict()
    key = [k for k in a if k.startswith("dr_head.") and k.endswith(".weight")][-1]
    assert not torch.allclose(a[key], b[key])  # fine-tuning moved it, so the test can fail
    assert torch.allclose(mid[key], (a[key] + b[key]) / 2)
    assert ckpt["provenance"]["interpolated"]["alpha"] == 0.5
    assert ckpt["model_version"].endswith("-wise50")
    assert "referable" not in ckpt["thresholds"]  # the end's threshold belongs to the end's scores


def test_a_temperature_blend_grader_folded_into_the_end_is_undone_before_averaging(pair, tmp_path: Path) -> None:
    _, start, end = pair
    ckpt = read_checkpoint(end)
    model, _ = load_model(end)
    fold_temperature(model.dr_head, 0.5)
    fold_temperature(model.dme_head, 2.0)
    ckpt["model_state"] = model.state_dict()
    ckpt["provenance"] = {**ckpt["provenance"], "calibration": {"dr_temperature": 0.5, "dme_temperature": 2.0,
                                                                "fitted_by": "blend-grader, on the validation split"}}
    tempered = save_checkpoint(tmp_path / "tempered.pt", ckpt)
    at_end, made = interpolated_network(start, tempered, 1.0)
    original = _float_state(end)
    for key in [k for k in original if k.startswith(("dr_head.", "dme_head.")) and k.endswith((".weight", ".bias"))]:
        assert torch.allclose(at_end.state_dict()[key], original[key], atol=1e-6)
    assert made["provenance"]["interpolated"]["end"]["untempered"] is True
    assert "calibration" not in made["provenance"]  # blend-grader tempers the new network afresh


def test_the_written_network_loads_and_evaluate_reproduces_its_validation_numbers(pair, tmp_path: Path) -> None:
    cfg, start, end = pair
    out = tmp_path / "wise.pt"
    result = interpolate_checkpoints(cfg, start, end, 0.25, out)
    model, meta = load_model(out)
    assert "grader" not in meta and "referable_calibration" not in meta
    assert meta["thresholds"]["referable"] == pytest.approx(result["threshold"])
    summary = evaluate_checkpoint(cfg, out, "val", tmp_path / "eval", bootstrap=10, progress=False)["summary"]
    assert summary["dr_kappa"] == pytest.approx(result["validation"]["val_kappa"])


def test_the_cli_refuses_a_wrong_pair_with_exit_2_and_says_what_to_use(pair, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    cfg, start, end = pair
    config = tmp_path / "config.toml"
    source = cfg.data.sources[0]
    config.write_text(f'[data]\nsources = [{{ kind = "manifest", path = "{source.path.as_posix()}" }}]\n'
                      f'cache_dir = "{cfg.data.cache_dir.as_posix()}"\n')
    out = tmp_path / "wise.pt"
    assert main(["--config", str(config), "interpolate", "--start", str(end), "--end", str(start), "--alpha", "0.5",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "was not fine-tuned from" in err and "init_from" in err
    assert not out.exists()


def test_reset_batch_norm_measures_the_statistics_again_and_changes_nothing_else(pair) -> None:
    from training.data.split import configured_split
    from training.interpolate import reset_batch_norm

    cfg, start, _ = pair
    model, _ = load_model(start)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm = model.encoder.stem[1]
    assert isinstance(norm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        norm.running_mean.fill_(123.0)  # statistics that fit nothing
    train = configured_split(cfg.data, None)["train"]
    reset_batch_norm(model, train[:6], cfg, torch.device("cpu"))
    assert float(norm.running_mean.abs().max()) < 50.0
    assert norm.momentum == pytest.approx(0.1) and not model.training
    after = model.state_dict()
    for key, value in before.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(after[key], value), key
    with pytest.raises(ValueError, match="no photos"):
        reset_batch_norm(model, [], cfg, torch.device("cpu"))


def test_interpolate_records_the_batch_norm_measurement(pair, tmp_path: Path) -> None:
    cfg, start, end = pair
    out = tmp_path / "wise.pt"
    interpolate_checkpoints(cfg, start, end, 0.5, out, reset_bn=4)
    made = read_checkpoint(out)["provenance"]["interpolated"]
    assert made["batch_norm"]["photos"] == 4 and made["alpha"] == 0.5
    key = "encoder.stem.1.running_var"
    averaged = (_float_state(start)[key] + _float_state(end)[key]) / 2
    assert not torch.allclose(read_checkpoint(out)["model_state"][key].float(), averaged)  # measured, not averaged

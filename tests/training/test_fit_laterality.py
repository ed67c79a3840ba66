"""Fitting the laterality model (training/fit_laterality.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training import cli
from training.fit_laterality import fit_parameters
from training.laterality import load_laterality_model, p_upright, probability_right


def _config(tiny_csv, tmp_path):
    """A config over the synthetic photos (each names its eye), half of them split off for val and test."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"[data]\nsources = [{{ kind = 'manifest', path = '{tiny_csv}' }}]\ncache_dir = '{tmp_path / 'cache' / 'pre'}'\n"
        "val_fraction = 0.25\ntest_fraction = 0.25\nsplit_seed = 0\n")
    return config


def test_fit_recovers_anatomy_the_share_of_inverted_photos_and_bad_foveas():
    """Simulated photos: disc offset +-0.5 by eye, tilt +9 upright / -9 inverted (sd 4; 30 % inverted); a quarter
    of the photos have a shallow "fovea" (depth 0) whose tilt is random."""
    rng = np.random.default_rng(0)
    n = 1200
    right = rng.random(n) < 0.5
    inverted = rng.random(n) < 0.3
    bad = rng.random(n) < 0.25
    side = np.where(right != inverted, 1.0, -1.0)  # an inverted right eye shows its disc on the left
    tilt = np.where(bad, rng.uniform(-25, 25, n), np.where(inverted, -9.0, 9.0) + rng.normal(0, 4, n))
    x = np.c_[side * 0.5 + rng.normal(0, 0.15, n), tilt, np.where(bad, 0.0, 0.3), np.ones(n)]
    params = fit_parameters(x, right.astype(float))
    assert params["side_gain"] > 0 and 7 < params["tilt_mean"] < 11 and 2.5 < params["tilt_sd"] < 6
    assert 0.6 < params["upright_prior"] < 0.8  # 70 % upright
    assert p_upright(params, -9.0, 0.0) > p_upright(params, -9.0, 0.3)  # a shallow fovea is trusted less
    pred = np.array([probability_right(params, o, t, "detect", d, bool(f))[0] >= 0.5 for o, t, d, f in x])
    assert (pred[~bad] == right[~bad]).mean() > 0.9


def test_fit_laterality_command_end_to_end(tiny_csv, tmp_path, capsys):
    config = _config(tiny_csv, tmp_path)
    out = tmp_path / "laterality.pt"
    assert cli.main(["--config", str(config), "fit-laterality", "--output", str(out)]) == 0
    model = load_laterality_model(out)
    assert model["side_gain"] > 0 and 0.5 <= model["confident"] < 1
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["test"]["all"]["detect"]["accuracy"] >= 0.75  # synthetic photos: the disc side is clear
    assert metrics["val"]["all"]["detect"]["log_loss"] > 0
    assert "laterality model written" in capsys.readouterr().out


def test_fit_laterality_with_the_chirality_network(tiny_csv, tmp_path, capsys):
    """``--chirality-epochs``: the network is trained (checkpointed, so a second run resumes instead of training
    again), its weight beside the landmarks is fitted, and the file it writes is a format-3 model that predicts;
    ``--chirality-networks 2`` then reuses that run and trains only the second network."""
    config = _config(tiny_csv, tmp_path)
    out = tmp_path / "laterality.pt"
    args = ["--config", str(config), "fit-laterality", "--output", str(out), "--chirality-epochs", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "chirality network 1 of 1 (seed 0): " in printed and "epoch 1: loss" in printed
    model = load_laterality_model(out)
    assert model["format"] == "dr-laterality-3" and model["_net"] is not None
    assert model["provenance"]["chirality_epochs"] == 1 and len(model["provenance"]["weights"]) == 2
    runs = list((tmp_path / "cache" / "laterality").glob("chirality-run-*.pt"))
    assert len(runs) == 1
    # two networks (E13): the first is the finished run above, resumed (no epoch trained again); only the second
    # (seed 1) trains; their mean is joined
    assert cli.main([*args, "--chirality-networks", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("epoch 1: loss") == 1 and "chirality network 2 of 2 (seed 1)" in printed
    assert printed.index("chirality network 2 of 2") < printed.index("epoch 1: loss")
    assert "the 2 networks' mean right on" in printed
    assert len(list((tmp_path / "cache" / "laterality").glob("chirality-run-*.pt"))) == 2
    model = load_laterality_model(out)
    assert len(model["_net"].members) == 2 and model["provenance"]["chirality_networks"] == 2


def test_several_networks_need_epochs_and_a_positive_count(tiny_csv, tmp_path, capsys):
    config = _config(tiny_csv, tmp_path)
    base = ["--config", str(config), "fit-laterality", "--output", str(tmp_path / "l.pt")]
    assert cli.main([*base, "--chirality-networks", "2"]) != 0
    assert "--chirality-networks N > 1 trains several chirality networks" in capsys.readouterr().err
    assert cli.main([*base, "--chirality-epochs", "1", "--chirality-networks", "0"]) != 0
    assert "--chirality-networks 0: give 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "l.pt").exists()


def test_fit_laterality_refuses_an_unknown_upright_source(tiny_csv, tmp_path, capsys):
    config = _config(tiny_csv, tmp_path)
    assert cli.main(["--config", str(config), "fit-laterality", "--output", str(tmp_path / "l.pt"),
                     "--chirality-epochs", "1", "--upright-source", "messidor"]) != 0
    assert "--upright-source ['messidor']: no such source in [data] sources (they are ['manifest:data'])" in capsys.readouterr().err
    assert not (tmp_path / "l.pt").exists()


def test_fit_weights_follows_the_reader_that_is_right_and_needs_both_eyes():
    """Simulated validation photos: the network's logit names the eye, the landmarks' answer is a coin toss: the
    network gets the larger weight. A split of one eye cannot be fitted, and says so."""
    from training.fit_laterality import fit_weights

    rng = np.random.default_rng(0)
    right = rng.random(200) < 0.5
    cnn = np.where(right, 3.0, -3.0) + rng.normal(0, 1, 200)
    landmarks = rng.uniform(0.3, 0.7, 200)
    a, b = fit_weights(landmarks, cnn, right)
    assert b > 0.5 and abs(a) < b
    with pytest.raises(ValueError, match="all of one eye"):
        fit_weights(landmarks, cnn, np.ones(200, bool))


def test_upright_sources_need_the_network(tiny_csv, tmp_path, capsys):
    config = _config(tiny_csv, tmp_path)
    assert cli.main(["--config", str(config), "fit-laterality", "--output", str(tmp_path / "l.pt"),
                     "--upright-source", "manifest:data"]) != 0
    assert "--upright-source teaches the chirality network" in capsys.readouterr().err


def test_the_log_loss_is_of_the_stated_eye():
    """E13's deciding measure: -log P(stated eye), averaged. Photos with the disc clearly on their eye's side (upright
    mode reads the side alone) give a small loss; the same photos with the opposite labels a large one."""
    from pathlib import Path

    from training.data.records import Record
    from training.fit_laterality import evaluate
    from training.laterality import pack_model

    model = pack_model({"side_gain": 8.0, "tilt_mean": 9.0, "tilt_sd": 4.0, "miss_bias": 0.0, "miss_depth_gain": 10.0,
                        "upright_prior": 0.7}, 0.6, {}, {})
    x = np.array([[0.5, 9.0, 0.3, 1.0], [-0.5, 9.0, 0.3, 1.0]] * 4)
    eyes = ["R", "L"] * 4
    records = [Record(Path(f"{i}.jpg"), str(i // 2), "s", eye=e) for i, e in enumerate(eyes)]
    swapped = [Record(r.image, r.patient_id, r.source, eye="L" if r.eye == "R" else "R") for r in records]
    right = evaluate(model, x, records, n_boot=10)["all"]["upright"]["log_loss"]
    wrong = evaluate(model, x, swapped, n_boot=10)["all"]["upright"]["log_loss"]
    expected = -np.log(1 / (1 + np.exp(-8.0 * 0.5)))  # P(stated eye) = sigmoid(side gain x offset)
    assert right == pytest.approx(expected) and wrong == pytest.approx(-np.log(1 - np.exp(-expected)))

"""Fitting the laterality model (training/fit_laterality.py)."""

from __future__ import annotations

import json

import numpy as np

from training import cli
from training.fit_laterality import fit_parameters
from training.laterality import load_laterality_model, probability_right


def test_fit_recovers_anatomy_and_the_share_of_inverted_photos():
    """Simulated photos: disc offset +-0.5 by eye, tilt +8 upright / -8 inverted (30 % inverted), noisy."""
    rng = np.random.default_rng(0)
    n = 600
    right = rng.random(n) < 0.5
    inverted = rng.random(n) < 0.3
    side = np.where(right != inverted, 1.0, -1.0)  # an inverted right eye shows its disc on the left
    x = np.c_[side * 0.5 + rng.normal(0, 0.15, n), np.where(inverted, -8.0, 8.0) + rng.normal(0, 5, n)]
    a, b, c = fit_parameters(x, right.astype(float))
    assert a > 0 and b > 0  # disc right = right eye; fovea below the disc = upright
    model = {"side_gain": a, "tilt_gain": b, "upright_bias": c}
    pred = np.array([probability_right(model, o, t)[0] >= 0.5 for o, t in x])  # type: ignore[arg-type]
    assert (pred == right).mean() > 0.85


def test_fit_laterality_command_end_to_end(tiny_csv, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(
        f"[data]\nsources = [{{ kind = 'manifest', path = '{tiny_csv}' }}]\ncache_dir = '{tmp_path / 'cache' / 'pre'}'\n"
        "val_fraction = 0.25\ntest_fraction = 0.25\nsplit_seed = 0\n")
    out = tmp_path / "laterality.pt"
    assert cli.main(["--config", str(config), "fit-laterality", "--output", str(out)]) == 0
    model = load_laterality_model(out)
    assert model["side_gain"] > 0 and 0.5 <= model["confident"] < 1
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["test"]["all"]["detect"]["accuracy"] >= 0.75  # synthetic photos: the disc side is clear
    assert "laterality model written" in capsys.readouterr().out

"""Fitting the gradability model: samples, thresholds, the command end to end (training/fit_quality.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import cli
from training.data.records import Record
from training.fit_quality import COLOUR_MARGIN, Sample, choose_thresholds, colour_limit, evaluate, labels_of, plan_samples
from training.quality import REASONS, load_quality_model

from .conftest import tiny_config


def _records(n: int) -> list[Record]:
    return [Record(image=Path(f"/data/p{i}.jpg"), patient_id=f"p{i}", source="s") for i in range(n)]


def test_sample_plan_is_deterministic_and_labelled():
    samples = plan_samples(_records(20), seed=0)
    assert [s.key for s in samples] == [s.key for s in plan_samples(_records(20), seed=0)]
    assert len({s.key for s in samples}) == len(samples)
    kinds = [s.kind for s in samples]
    assert kinds.count("photo") == kinds.count("mild") == kinds.count("not_fundus") == 20 and kinds.count("severe") == 40
    y = labels_of(samples)
    assert y[[s.kind in ("photo", "mild") for s in samples]].sum() == 0
    assert (y.sum(axis=1)[[s.kind in ("severe", "not_fundus") for s in samples]] == 1).all()


def _sample(kind: str, i: int) -> Sample:
    return Sample(f"{kind}{i}", Record(image=Path(f"/d/{i}.jpg"), patient_id=str(i), source="s"), kind,
                  "defocus" if kind in ("mild", "severe") else ("document" if kind == "not_fundus" else ""), i)


def test_thresholds_never_refuse_a_real_photo_and_keep_the_false_ungradable_target():
    rng = np.random.default_rng(0)
    samples = [_sample("photo", i) for i in range(200)] + [_sample("not_fundus", i) for i in range(50)]
    probs = rng.uniform(0, 0.3, (250, len(REASONS)))
    nf = REASONS.index("not_fundus")
    probs[:200, nf] = rng.uniform(0, 0.05, 200)
    probs[0, nf] = 0.2  # one real photo the network finds odd
    probs[200:, nf] = rng.uniform(0.1, 1.0, 50)
    t = choose_thresholds(probs, samples, target_false_ungradable=0.02)
    assert set(t) == set(REASONS)
    assert t["not_fundus"] > 0.2  # raised above the odd real photo, not lowered to catch every picture
    flagged = (probs[:200] >= np.array([t[r] for r in REASONS])).any(axis=1)
    assert flagged.mean() <= 0.02


def test_the_colour_rule_sits_above_every_real_fitting_photo_and_is_counted_apart():
    samples = [_sample("photo", i) for i in range(10)] + [_sample("not_fundus", i) for i in range(4)]
    shares = np.r_[np.linspace(0, 0.54, 10), [0.9, 0.95, 0.2, 0.3]][:, None]
    limit = colour_limit(shares[:, 0], samples)
    assert limit == pytest.approx(0.54 + COLOUR_MARGIN)
    probs = np.zeros((14, len(REASONS)))
    probs[12, REASONS.index("not_fundus")] = 0.9  # the network refuses one; the rule adds the two blue ones
    m = evaluate(probs, samples, {r: 0.5 for r in REASONS}, n_boot=10, blue_shares=shares, colour_max=limit)
    nf = m["not_fundus_refused"]
    assert (nf["rate"], nf["by_colour_rule_only"], nf["real_photos_refused_by_colour_rule"]) == (0.75, 2, 0)
    assert m["colour_rule"] == {"blue_over_red_max": limit} and m["gradable_called_ungradable"]["rate"] == 0


# 16 synthetic photos are too few for the network to settle in its 600 iterations; the test is about the command
@pytest.mark.filterwarnings("ignore:Stochastic Optimizer:sklearn.exceptions.ConvergenceWarning")
def test_fit_quality_command_end_to_end(tiny_csv, tmp_path, capsys):
    """16 synthetic photos through the whole command: the file loads and the metrics name every target."""
    cfg = tiny_config(tiny_csv, tmp_path / "run", tmp_path / "cache" / "preprocessed")
    config = tmp_path / "config.toml"
    config.write_text(
        f"[data]\nsources = [{{ kind = 'manifest', path = '{tiny_csv}' }}]\ncache_dir = '{cfg.data.cache_dir}'\n"
        "val_fraction = 0.25\ntest_fraction = 0.25\nsplit_seed = 0\n")
    out = tmp_path / "models" / "quality.pt"
    assert cli.main(["--config", str(config), "fit-quality", "--output", str(out), "--per-source", "16"]) == 0
    model = load_quality_model(out)
    assert set(model["thresholds"]) == set(REASONS) and model["provenance"]["per_source"] == 16
    assert 0 < model["colour_rule"]["blue_over_red_max"] <= 1
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    for side in ("val", "test"):
        assert {"gradable_called_ungradable", "degraded_caught", "not_fundus_refused"} <= set(metrics[side])
    assert (tmp_path / "cache" / "quality" / "measurements.npz").is_file()  # the second run measures nothing new
    assert (tmp_path / "cache" / "quality" / "colour.npz").is_file()
    assert "gradability model written" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["--per-source", "--target-false-ungradable"])
def test_fit_quality_help_lists_its_options(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit-quality", "--help"])
    assert bad in capsys.readouterr().out

"""``dr-train``: help, clean errors (exit 2, the culprit named) and evaluate's outputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from training.cli import main
from training.evaluation import DR_CONFUSION_PNG, LESION_PR_PNG, METRICS_FILE, REFERABLE_ROC_PNG

torch.set_num_threads(1)

SUBCOMMANDS = ("prepare", "train", "evaluate", "interpolate", "export", "demo")


def write_config(tmp_path: Path, sources: str, cache: Path | None = None) -> Path:
    """A config.toml with the tiny model settings and the given ``sources`` TOML array."""
    path = tmp_path / "config.toml"
    cache = cache or tmp_path / "cache"
    path.write_text(
        f"""
[data]
sources = {sources}
cache_dir = "{cache.as_posix()}"
val_fraction = 0.25
test_fraction = 0.25
split_seed = 0

[model]
backbone = "resnet18"
image_size = 64
decoder_channels = [16, 16, 16, 8, 8]

[train]
out_dir = "{(tmp_path / 'run').as_posix()}"
epochs = 1
batch_size = 4
max_steps_per_epoch = 1
device = "cpu"
"""
    )
    return path


def manifest_source(csv_path: Path) -> str:
    return f'[{{ kind = "manifest", path = "{csv_path.as_posix()}" }}]'


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help and usage errors
        return int(exc.code or 0)


# --------------------------------------------------------------------------------------------- help


def test_top_level_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "dr-train" in out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help_exits_zero(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([sub, "--help"]) == 0
    assert f"dr-train {sub}" in capsys.readouterr().out


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([]) == 2
    assert "required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sub", ["prepare", "train"])
def test_missing_source_folder_exits_2_naming_it(sub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-kaggle-folder"
    cfg = write_config(tmp_path, f'[{{ kind = "kaggle", path = "{missing.as_posix()}" }}]')
    assert run_cli(["--config", str(cfg), sub]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no-such-kaggle-folder" in err
    assert "Traceback" not in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--config", str(tmp_path / "absent.toml"), "prepare"]) == 2
    assert "absent.toml" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["prepare", "train"])
def test_manifest_without_expected_columns_exits_2_naming_them(sub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.csv").write_text("file,grade\na.jpg,0\n")
    cfg = write_config(tmp_path, manifest_source(data / "labels.csv"))
    assert run_cli(["--config", str(cfg), sub]) == 2
    err = capsys.readouterr().err
    assert "lacks column(s)" in err
    for column in ("image", "dr_grade"):  # dme_grade is optional (sets graded for DR only)
        assert f"'{column}'" in err
    assert "labels.csv" in err


@pytest.fixture
def manifest_with_broken_image(tiny_csv: Path, tmp_path: Path) -> Path:
    """A copy of the tiny synthetic set whose manifest also lists a text file named .jpg."""
    data = tmp_path / "data"
    shutil.copytree(tiny_csv.parent, data)
    (data / "images" / "Broken_L.jpg").write_text("this is not a JPEG\n")
    rows = list(csv.DictReader((data / "labels.csv").open()))
    rows.append({**{k: "" for k in rows[0]}, "image": "images/Broken_L.jpg", "patient_id": "Broken",
                 "eye": "L", "dr_grade": "1", "dme_grade": "0"})
    with (data / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return data / "labels.csv"


@pytest.mark.parametrize("sub", ["prepare", "train"])
def test_unreadable_image_fails_clearly(sub: str, manifest_with_broken_image: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, manifest_source(manifest_with_broken_image))
    assert run_cli(["--config", str(cfg), sub]) == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1].split("\r")[-1]  # after the cache's progress bar
    assert message.startswith("error:") and "Broken_L.jpg" in message and "cannot decode" in message
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing was trained around the bad file


# ---------------------------------------------------------------------------------- evaluate, export


def test_evaluate_writes_metrics_and_plots(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run_dir = trained_run
    config = write_config(tmp_path, manifest_source(cfg.data.sources[0].path), cache=cfg.data.cache_dir)
    out = tmp_path / "eval"
    code = run_cli(["--config", str(config), "evaluate", "--checkpoint", str(run_dir / "best.pt"),
                    "--split", "val", "--out", str(out), "--bootstrap", "20", "--device", "cpu"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "metrics and plots written to" in stdout
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert {"dr", "referable"} <= set(metrics)
    for png in (DR_CONFUSION_PNG, REFERABLE_ROC_PNG, LESION_PR_PNG):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_evaluate_missing_checkpoint_exits_2(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = trained_run
    config = write_config(tmp_path, manifest_source(cfg.data.sources[0].path), cache=cfg.data.cache_dir)
    assert run_cli(["--config", str(config), "evaluate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_export_writes_a_smaller_checkpoint(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir = trained_run
    dst = tmp_path / "shipped.pt"
    assert run_cli(["export", str(run_dir / "best.pt"), str(dst)]) == 0
    assert dst.is_file() and dst.stat().st_size < (run_dir / "best.pt").stat().st_size
    assert "exported" in capsys.readouterr().out


# ----------------------------------------------------------------- an ML engineer's check of the command line

@pytest.mark.parametrize("argv, said", [
    (["train", "--epochs", "0"], "--epochs 0: Input should be greater than or equal to 1"),
    (["train", "--image-size", "100"], "--image-size 100: Value error, image_size must be a multiple of 32"),
    (["train", "--lr", "-1"], "--lr -1.0: Input should be greater than 0"),
])
def test_command_line_overrides_are_validated_as_the_file_is(tiny_csv: Path, tmp_path: Path, capsys, argv, said) -> None:
    """A copy with updates skipped validation: --epochs 0 'finished' with no checkpoint, --image-size 100 failed
    after caching every photo at 100 px, without naming the option."""
    config = write_config(tmp_path, manifest_source(tiny_csv))
    assert run_cli(["--config", str(config), *argv]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_export_refuses_to_overwrite_its_own_input_and_an_output_path_error_is_a_message(
        trained_run, tmp_path: Path, capsys) -> None:
    """`export last.pt last.pt` stripped the optimizer state from the run's own checkpoint (no resume any more); an
    output under a file gave a FileExistsError traceback; --test-metrics that is not JSON named no file."""
    import shutil

    _, run_dir = trained_run
    own = tmp_path / "last.pt"
    shutil.copy(run_dir / "last.pt", own)
    size = own.stat().st_size
    assert run_cli(["export", str(own), str(own)]) == 2
    assert "the output is the input" in capsys.readouterr().err and own.stat().st_size == size
    (tmp_path / "afile").write_text("x")
    assert run_cli(["export", str(own), str(tmp_path / "afile" / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "afile" in err
    (tmp_path / "bad.json").write_text("{not json")
    assert run_cli(["export", str(own), str(tmp_path / "s.pt"), "--test-metrics", str(tmp_path / "bad.json")]) == 2
    assert "--test-metrics" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()
    assert run_cli(["evaluate", "--checkpoint", str(own), "--bootstrap", "-5"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err


def test_export_stores_only_a_test_evaluation_of_the_same_model(trained_run, tmp_path: Path, capsys) -> None:
    """`export --test-metrics` took any JSON ({"a": 1} became empty test metrics); a validation run's or another
    model's numbers would have reached the reports as this model's test figures."""
    from training.checkpoint import read_checkpoint

    cfg, run_dir = trained_run
    config = write_config(tmp_path, manifest_source(cfg.data.sources[0].path), cache=cfg.data.cache_dir)
    best = str(run_dir / "best.pt")
    for split in ("val", "test"):
        assert run_cli(["--config", str(config), "evaluate", "--checkpoint", best, "--split", split,
                        "--out", str(tmp_path / split), "--bootstrap", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    evaluated = json.loads((tmp_path / "test" / METRICS_FILE).read_text())["evaluated"]
    assert evaluated["split"] == "test" and evaluated["model_version"] == read_checkpoint(best)["model_version"]
    (tmp_path / "any.json").write_text('{"a": 1}')
    other = json.loads((tmp_path / "test" / METRICS_FILE).read_text())
    other["evaluated"]["model_version"] = "another-model"
    (tmp_path / "other.json").write_text(json.dumps(other))
    same_name = json.loads((tmp_path / "test" / METRICS_FILE).read_text())
    same_name["evaluated"]["content_digest"] = "0" * 16  # another blend of the same base: one version name
    (tmp_path / "same_name.json").write_text(json.dumps(same_name))
    for metrics, said in (("any.json", "not the metrics.json of a `dr-train evaluate` run"),
                          (f"val/{METRICS_FILE}", "of the 'val' split"), ("other.json", "of another model ('another-model'"),
                          ("same_name.json", "content '0000000000000000'")):
        assert run_cli(["export", best, str(tmp_path / "s.pt"), "--test-metrics", str(tmp_path / metrics)]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "s.pt").exists()
    assert run_cli(["export", best, str(tmp_path / "s.pt"), "--test-metrics", str(tmp_path / "test" / METRICS_FILE)]) == 0
    assert read_checkpoint(tmp_path / "s.pt")["metrics"]["test"]["images"] == evaluated["images"]
    # the documented flow: evaluate the float16 export, store its numbers with the float32 source
    assert run_cli(["--config", str(config), "evaluate", "--checkpoint", str(tmp_path / "s.pt"), "--split", "test",
                    "--out", str(tmp_path / "half"), "--bootstrap", "0", "--device", "cpu"]) == 0
    assert run_cli(["export", best, str(tmp_path / "s2.pt"), "--test-metrics", str(tmp_path / "half" / METRICS_FILE)]) == 0

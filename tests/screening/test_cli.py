import json
import logging
from pathlib import Path

import pytest

from screening import cli

from .conftest import write_fundus


def _config(tmp_path: Path, checkpoint: Path, quality: Path | None = None, laterality: Path | None = None) -> Path:
    """A config beside its own folders; the intake-check models are the shipped ones unless given."""
    models = Path(__file__).resolve().parents[2] / "models"
    quality, laterality = quality or models / "quality.pt", laterality or models / "laterality.pt"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ncheckpoint = '{checkpoint}'\nquality_model = '{quality}'\n"
                   f"laterality_model = '{laterality}'\nstable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\n")
    return cfg


def test_a_missing_intake_model_stops_the_worker_saying_what_to_do(tmp_path, tiny_checkpoint, capsys):
    cfg = _config(tmp_path, tiny_checkpoint, quality=tmp_path / "no-quality.pt")
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 2
    err = capsys.readouterr().err
    assert "gradability model not found" in err and "no-quality.pt" in err and "dr-train fit-quality" in err


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["run", "--help"], ["audit", "--help"], ["init-db", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    assert "--once" in capsys.readouterr().out


def test_missing_checkpoint_without_demo_fails_clearly(tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "nope.pt")
    assert cli.main(["--config", str(cfg), "run", "--once", "--no-demo"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_missing_checkpoint_trains_demo_model_once(tmp_path, monkeypatch, tiny_checkpoint):
    import shutil

    import training.demo

    calls = []

    def fake_demo(output, work, minutes, progress):
        calls.append(output)
        shutil.copy(tiny_checkpoint, output)
        return output

    monkeypatch.setattr(training.demo, "train_demo_model", fake_demo)
    from screening.config import load_screening_settings

    settings = load_screening_settings(_config(tmp_path, tmp_path / "absent.pt"))
    settings.work_dir.mkdir(parents=True)
    first = cli.resolve_checkpoint(settings)
    second = cli.resolve_checkpoint(settings)
    assert first == second == settings.work_dir / "demo-model.pt" and len(calls) == 1


def test_run_once_then_audit_exports(tmp_path, tiny_checkpoint, intake_models, capsys):
    cfg = _config(tmp_path, tiny_checkpoint, intake_models["gradable"], intake_models["unsure_eye"])
    write_fundus(tmp_path / "inbox" / "P1_R.jpg", seed=1)
    (tmp_path / "inbox" / "notes.txt").write_text("hello")
    assert cli.main(["--config", str(cfg), "run", "--once"]) == 0
    out = capsys.readouterr().out
    assert "processed 1" in out and "rejected 1" in out
    assert not logging.getLogger("weasyprint.progress").isEnabledFor(logging.INFO)  # no "Step n" lines per report
    assert cli.main(["--config", str(cfg), "audit", "--json", str(tmp_path / "a.json"), "--csv", str(tmp_path / "a.csv")]) == 0
    table = capsys.readouterr().out
    assert "Images graded" in table and "unsupported" in table
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["rejected"] == 1 and sum(data["overall"]["dr_grades"].values()) == 1
    assert list(data["by_model"]) == ["test-synthetic-v1"]
    assert (tmp_path / "a.csv").read_text().startswith("section,model_version,key,value")


def test_bad_config_key_exits_2(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[screening]\ninbox_folder = 'x'\n")
    assert cli.main(["--config", str(cfg), "init-db"]) == 2
    assert "screening.inbox_folder" in capsys.readouterr().err

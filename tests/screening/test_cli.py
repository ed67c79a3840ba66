import json
import logging
from pathlib import Path

import pytest

from screening import cli

from .conftest import write_fundus


def _config(tmp_path: Path, checkpoint: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ncheckpoint = '{checkpoint}'\nstable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\n")
    return cfg


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


def test_run_once_then_audit_exports(tmp_path, tiny_checkpoint, capsys):
    cfg = _config(tmp_path, tiny_checkpoint)
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


def test_init_db_on_each_database_never_prints_the_password(tmp_path, db_url, capsys):
    from sqlalchemy.engine import make_url

    from screening.db import current_revision, head_revision, make_engine

    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":  # the test server trusts local connections: any password is accepted
        url = url.set(password="s3cret")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ndatabase = '{url.render_as_string(hide_password=False)}'\n")
    assert cli.main(["--config", str(cfg), "init-db"]) == 0
    out = capsys.readouterr().out
    assert "database ready" in out and "s3cret" not in out
    engine = make_engine(db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_audit_and_init_db_do_not_import_torch(tmp_path):
    """`dr-screen audit` starts in well under a second: torch (seconds to import) is for the worker only."""
    import subprocess
    import sys

    code = ("import sys; from screening import cli; "
            f"rc = cli.main(['--config', {str(tmp_path / 'c.toml')!r}, 'audit']); "
            "print(rc, 'torch' in sys.modules)")
    (tmp_path / "c.toml").write_text(f"[screening]\ndatabase = 'sqlite:///{tmp_path / 'a.db'}'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stderr[-2000:]

"""One worker per inbox and per database (issue 12: two workers graded every photo twice, then failed most)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from screening import cli
from screening.lock import WorkerLock, WorkerLocked

PROJECT = Path(__file__).resolve().parents[2]


def test_a_second_lock_on_the_same_inbox_or_database_is_refused(tmp_path):
    inbox, other_inbox = tmp_path / "inbox", tmp_path / "inbox2"
    inbox.mkdir()
    other_inbox.mkdir()
    db = f"sqlite:///{tmp_path / 'a.db'}"
    with WorkerLock(inbox, db):
        with pytest.raises(WorkerLocked, match="database") as exc:
            WorkerLock(other_inbox, db).acquire()  # same database, another inbox
        assert "pid" in str(exc.value)
        with pytest.raises(WorkerLocked, match="inbox"):
            WorkerLock(inbox, f"sqlite:///{tmp_path / 'b.db'}").acquire()  # same inbox, another database
        with WorkerLock(other_inbox, f"sqlite:///{tmp_path / 'b.db'}"):
            pass  # a worker of its own
    with WorkerLock(inbox, db):  # released
        pass
    assert list(inbox.iterdir()) == []  # nothing written into the inbox


def test_the_lock_goes_with_a_killed_process(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    db = f"sqlite:///{tmp_path / 'a.db'}"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom screening.lock import WorkerLock\n"
        "WorkerLock(Path(sys.argv[1]), sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)\n"),
        str(inbox), db], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(WorkerLocked, match=f"pid {child.pid}"):
            WorkerLock(inbox, db).acquire()
    finally:
        child.kill()
        child.wait()
    with WorkerLock(inbox, db):
        pass


def test_a_second_worker_is_refused_at_start_with_a_clear_message(tmp_path, tiny_checkpoint, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[screening]\ncheckpoint = '{tiny_checkpoint}'\nstable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\n")
    (tmp_path / "inbox").mkdir()
    with WorkerLock(tmp_path / "inbox", f"sqlite:///{tmp_path / 'screening.db'}"):
        assert cli.main(["--config", str(cfg), "run", "--once"]) == 3
    err = capsys.readouterr().err
    assert "another worker is already running" in err and "Traceback" not in err
    assert not (tmp_path / "screening.db").exists()  # refused before the database was opened (no schema race)

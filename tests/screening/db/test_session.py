"""Database faults seen from the engine: a file deleted or replaced under it, and a lock held past the busy
timeout by another process (issue 12)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from screening.db import DatabaseGone, init_db, make_engine, make_session_factory, session_scope, transaction
from screening.db import repository as repo
from screening.db.models import Patient


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "s.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_ms=100)
    init_db(engine)
    yield path, make_session_factory(engine)
    engine.dispose()


def _add(factory, code: str) -> None:
    with session_scope(factory) as s:
        repo.get_or_create_patient(s, code)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_refuses_every_later_transaction(db, how):
    """The engine used to go on writing into the unlinked file: results recorded nowhere anyone could read."""
    path, factory = db
    _add(factory, "P1")
    if how == "deleted":
        path.unlink()
    else:
        shutil.copy(path, path.with_suffix(".copy"))
        os.replace(path.with_suffix(".copy"), path)
    with pytest.raises(DatabaseGone, match=how):
        _add(factory, "P2")
    with pytest.raises(DatabaseGone):
        with session_scope(factory) as s:
            s.scalar(select(func.count()).select_from(Patient))


def test_a_lock_held_past_the_busy_timeout_is_waited_out(db):
    """Another program holds the write lock for ~1.5 s, fifteen busy timeouts: the unit of work runs when it is
    released instead of failing with "database is locked"."""
    path, factory = db
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(1.5); c.execute('COMMIT')\n"), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        calls = []

        def work(session):
            calls.append(1)
            repo.get_or_create_patient(session, "P3")
            return "stored"

        assert transaction(factory, work, what="a test") == "stored"
        assert time.monotonic() - t0 > 0.5 and len(calls) >= 2
    finally:
        holder.wait(10)
    with session_scope(factory) as s:
        assert repo.find_patient(s, "p3") is not None
    with pytest.raises(Exception, match="locked"):  # bounded waiting, for callers that ask for it
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(1.5); c.execute('COMMIT')\n"), str(path)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            transaction(factory, lambda s: repo.get_or_create_patient(s, "P4"), give_up_after=0.2)
        finally:
            holder.wait(10)

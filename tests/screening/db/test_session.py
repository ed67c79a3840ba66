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


# ------------------------------------------------------------------------ PostgreSQL's faults (issue 15)

def test_postgresql_connections_dropped_by_the_server_are_replaced(pg_url):
    """A server restart or an idle timeout drops the worker's pooled connections: the next unit of work gets a
    fresh one (pool_pre_ping) instead of failing a photo."""
    engine = make_engine(pg_url)
    init_db(engine)
    factory = make_session_factory(engine)
    _add(factory, "P1")
    admin = make_engine(pg_url)
    with admin.connect() as conn:
        killed = conn.exec_driver_sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid()").scalar()
    assert killed >= 1
    _add(factory, "P2")
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(Patient)) == 2
    admin.dispose()
    engine.dispose()


def test_postgresql_deadlock_between_two_workers_is_run_again(pg_url):
    """Two units of work lock two rows in opposite orders: the server aborts one as a deadlock, and transaction()
    runs it again, so both complete."""
    import threading

    engine = make_engine(pg_url)
    init_db(engine)
    factory = make_session_factory(engine)
    _add(factory, "A")
    _add(factory, "B")
    first_locks = threading.Barrier(2)
    runs: list[str] = []
    errors: list[BaseException] = []

    def unit(first: str, second: str):
        def work(session):
            runs.append(first)
            session.execute(Patient.__table__.update().where(Patient.code == first).values(code=first))
            if runs.count(first) == 1:  # the first attempt: both hold their first row before taking the second
                first_locks.wait(10)
            session.execute(Patient.__table__.update().where(Patient.code == second).values(code=second))
        return work

    def run(first: str, second: str) -> None:
        try:
            transaction(factory, unit(first, second), what="a test")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=pair) for pair in (("A", "B"), ("B", "A"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(runs) in (["A", "A", "B"], ["A", "B", "B"])  # one of the two ran again after the deadlock
    engine.dispose()

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

from screening.db import (
    DatabaseGone,
    guard_identity,
    init_db,
    make_engine,
    make_session_factory,
    session_scope,
    transaction,
)
from screening.db import repository as repo
from screening.db.models import DatabaseIdentity, Patient


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


# ------------------------------------------------------------------ the database's identity (any backend)


def _count(factory) -> int:
    with session_scope(factory) as s:
        return s.scalar(select(func.count()).select_from(Patient))


def test_a_database_restored_in_place_from_another_stops_the_guarded_factory(db, tmp_path):
    """A SQLite file overwritten in place with another database (SQLite's own backup/.restore: the same file, the
    same inode) passed the file check: the worker would have gone on recording into the other database. Its
    identity differs, as a PostgreSQL database dropped and created again would."""
    import sqlite3

    path, factory = db
    token = guard_identity(factory)
    assert len(token) == 32 and guard_identity(factory) == token  # noted once
    _add(factory, "P1")
    other = tmp_path / "other.db"
    other_engine = make_engine(f"sqlite:///{other}")
    init_db(other_engine)
    with session_scope(make_session_factory(other_engine)) as s:
        assert repo.database_token(s) not in (None, token)  # every database made gets its own
    inode = path.stat().st_ino
    src, dst = sqlite3.connect(other), sqlite3.connect(path)
    src.backup(dst)  # the restore: page by page into the same file
    src.close()
    dst.close()
    assert path.stat().st_ino == inode
    with pytest.raises(DatabaseGone, match="replaced or re-created"):
        _add(factory, "P2")
    with pytest.raises(DatabaseGone):
        _count(factory)
    assert _count(make_session_factory(make_engine(f"sqlite:///{path}"))) == 0  # P2 went nowhere


def test_a_database_emptied_under_the_guarded_factory_stops_it(db):
    """Created again empty (no screening tables): a clear error, not "no such table" from some later statement."""
    import sqlite3

    path, factory = db
    guard_identity(factory)
    _add(factory, "P1")
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE database_identity")
    with pytest.raises(DatabaseGone, match="no longer holds the screening tables"):
        _add(factory, "P2")


def test_an_unguarded_factory_and_a_guarded_one_on_an_unchanged_database(db):
    path, factory = db
    guard_identity(factory)
    for k in range(3):
        _add(factory, f"P{k}")
    assert _count(factory) == 3
    with session_scope(factory) as s:  # init_db made the identity: guarding wrote nothing more
        assert s.scalar(select(func.count()).select_from(DatabaseIdentity)) == 1

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


def test_workers_starting_together_on_a_database_without_an_identity_agree_on_one(db_url):
    """A database whose identity row is missing (made by hand, or by a tool other than init_db): several workers
    start at once and each makes it if absent. They must note the same one, or every worker but the first to
    commit would stop at its next unit of work; one row is made."""
    import threading

    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:
        conn.execute(DatabaseIdentity.__table__.delete())
    factories = [make_session_factory(make_engine(db_url)) for _ in range(4)]
    start = threading.Barrier(len(factories))
    tokens: list[str] = []
    errors: list[BaseException] = []

    def worker(factory) -> None:
        try:
            start.wait(10)
            tokens.append(guard_identity(factory))
            _add(factory, f"P{len(tokens)}")  # a unit of work after it: the guard passes
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f,)) for f in factories]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(tokens) == 4 and len(set(tokens)) == 1
    with session_scope(factories[0]) as s:
        assert s.scalars(select(DatabaseIdentity.token)).all() == tokens[:1]
    for f in factories:
        f.kw["bind"].dispose()
    engine.dispose()


def test_several_workers_on_postgresql_each_stop_when_the_database_is_re_created(pg_url):
    """Several workers on one server database, each with its own engine (processes on several machines): each
    notes the identity when it starts and checks it in every unit of work. The database dropped and created
    again under the same name (an operator's mistake, a restore of another dump) stops every one of them before
    it writes, both when it is re-created empty and when it is made a screening database again; a worker started
    afterwards works on the new one."""
    from sqlalchemy.engine import make_url

    engines = [make_engine(pg_url) for _ in range(3)]
    init_db(engines[0])
    factories = [make_session_factory(e) for e in engines]
    tokens = {guard_identity(f) for f in factories}
    assert len(tokens) == 1
    for k, f in enumerate(factories):
        _add(f, f"P{k}")
    name = make_url(pg_url).database
    admin = make_engine(make_url(pg_url).set(database="postgres").render_as_string(hide_password=False),
                        isolation_level="AUTOCOMMIT")

    def re_create() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')  # the workers' connections are cut
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    re_create()
    with pytest.raises(DatabaseGone, match="no longer holds the screening tables"):
        _add(factories[0], "Q0")
    re_create()
    init_db(make_engine(pg_url))
    for k, f in enumerate(factories):
        with pytest.raises(DatabaseGone, match="replaced or re-created"):
            _add(f, f"Q{k}")
    fresh = make_session_factory(make_engine(pg_url))
    assert guard_identity(fresh) not in tokens and _count(fresh) == 0  # nothing the old workers tried was written
    _add(fresh, "R1")
    assert _count(fresh) == 1
    for e in engines:
        e.dispose()
    fresh.kw["bind"].dispose()
    admin.dispose()

"""Engine and session helpers. Nothing here is module-level state: callers build and own their engine.

Two faults of the database file are handled here, where every transaction passes:

* **deleted or replaced while in use** (:class:`DatabaseGone`): SQLite keeps writing to the inode it opened,
  so a worker whose ``screening.db`` was deleted, or replaced by a copy, would go on recording results nobody
  will ever read. The file's identity (device, inode) is noted at the first connection and checked at the
  start of every transaction; a mismatch refuses the transaction. The worker stops on it.
* **locked past the busy timeout** (another program holding a write lock, a backup, a long audit query on
  an old SQLite): :func:`transaction` runs a unit of work again until the lock is released, instead of
  failing the photo or the worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_BUSY_TIMEOUT_MS = 30_000
MAX_RETRY_DELAY_S = 30.0

T = TypeVar("T")
log = logging.getLogger("screening")


class DatabaseGone(RuntimeError):
    """The SQLite database file was deleted or replaced while this process had it open. Nothing more is written:
    the process must stop and be restarted on the file that is there now (or the file restored)."""


def sqlite_file_path(url: str) -> str | None:
    """The absolute path of a SQLite file URL; None for other databases and in-memory SQLite."""
    u = make_url(url)
    db = u.database or ""
    if u.get_backend_name() != "sqlite" or db in ("", ":memory:") or u.query.get("mode") == "memory" or db.startswith("file:"):
        return None
    return os.path.abspath(db)


class _FileIdentity:
    """The (device, inode) of a SQLite file, noted once, checked before every transaction."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.identity: tuple[int, int] | None = None

    def note(self) -> None:
        if self.identity is None:
            st = os.stat(self.path)
            self.identity = (st.st_dev, st.st_ino)

    def check(self) -> None:
        if self.identity is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseGone(
                f"the database file {self.path} was deleted while the worker was using it; nothing more was written. "
                "Restore the file (or its backup) and start the worker again") from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise DatabaseGone(
                f"the database file {self.path} was replaced by another file while the worker was using it; nothing "
                "more was written to either. Start the worker again to use the file that is there now")


def make_engine(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS, echo: bool = False, **kwargs: Any) -> Engine:
    """Create an engine for ``url``.

    For SQLite every new DBAPI connection gets ``PRAGMA foreign_keys=ON`` and ``busy_timeout`` (so a
    writer waits for a concurrent one instead of failing with "database is locked"); file databases
    also get ``journal_mode=WAL`` (readers such as the audit never block the worker) and
    ``synchronous=NORMAL`` (safe with WAL), and refuse transactions once their file was deleted or
    replaced (:class:`DatabaseGone`). Other URLs are passed to :func:`create_engine` unchanged.
    """
    engine = create_engine(url, echo=echo, **kwargs)
    if engine.dialect.name == "sqlite":
        path = sqlite_file_path(url)
        guard = _FileIdentity(path) if path is not None else None

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
            cur = dbapi_connection.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                cur.execute("PRAGMA foreign_keys = ON")
                if guard is not None:
                    cur.execute("PRAGMA journal_mode = WAL")
                    cur.execute("PRAGMA synchronous = NORMAL")
                    guard.note()
            finally:
                cur.close()

        if guard is not None:
            @event.listens_for(engine, "begin")
            def _same_file(conn: Any) -> None:
                guard.check()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions keep loaded attributes after commit so results can be used once the unit of work ends."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit when the block succeeds, roll back (and re-raise) when it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_busy(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "database is busy": another connection held the lock for
    longer than the busy timeout. Worth retrying; nothing else is."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def transaction(
    factory: sessionmaker[Session], work: Callable[[Session], T], *, what: str = "a database update",
    give_up_after: float | None = None, sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``work(session)`` as one unit of work (:func:`session_scope`) and return what it returns. While the
    database stays locked by another connection past the busy timeout, wait and run it again from the start
    (it must only touch the database), with a warning each time; by default for as long as it takes, since a
    worker that exits on a lock leaves photos unhandled until someone restarts it. ``give_up_after`` seconds of
    waiting re-raise the last error instead. Any other error is raised at once."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            with session_scope(factory) as session:
                return work(session)
        except OperationalError as exc:
            if not is_busy(exc) or (give_up_after is not None and waited >= give_up_after):
                raise
            log.warning("the database is locked by another program (%s waited %.0f s so far); trying again in %.1f s",
                        what, waited, delay)
            sleep(delay)
            waited += delay
            delay = min(delay * 2, MAX_RETRY_DELAY_S)


__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS", "DatabaseGone", "is_busy", "make_engine", "make_session_factory", "session_scope",
    "sqlite_file_path", "transaction",
]

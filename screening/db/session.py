"""Engine and session helpers. Callers build and own their engine and session factory.

Two faults of the database are handled here, where every transaction passes:

* **deleted, replaced or re-created while in use** (:class:`DatabaseGone`), checked twice:

  - for any database, its identity (a random id written once when it was made,
    :class:`~screening.db.models.DatabaseIdentity`) is noted when the worker starts (:func:`guard_identity`)
    and read again at the start of every unit of work: a PostgreSQL database dropped and created again, or a
    SQLite file restored in place from another database, holds another id (or no screening tables at all);
  - for a SQLite file, also its (device, inode), noted at the first connection: SQLite keeps writing to the
    inode it opened, so a worker whose ``screening.db`` was deleted, or replaced by a copy (the same id!),
    would go on recording results nobody will ever read.

  A mismatch refuses the transaction; the worker stops on it.
* **locked past the busy timeout** (another program holding a write lock, a backup, a long audit query on
  an old SQLite): :func:`transaction` runs a unit of work again until the lock is released, instead of
  failing the photo or the worker.

On PostgreSQL a writer waits for a row lock as long as it takes, so nothing is "busy"; what several workers
can meet there instead is a deadlock or a serialization failure (the server aborts one of two transactions
that wait on each other): :func:`transaction` runs the aborted unit of work again too. A file that vanished is
a SQLite notion; a server that went away is retried (``pool_pre_ping`` replaces dropped connections).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .models import DatabaseIdentity
from .repository import ensure_database_token

DEFAULT_BUSY_TIMEOUT_MS = 30_000
MAX_RETRY_DELAY_S = 30.0

T = TypeVar("T")
log = logging.getLogger("screening")


class DatabaseGone(RuntimeError):
    """The database was deleted, replaced or re-created while this process used it. Nothing more is written: the
    process must stop and be restarted on the database that is there now (or the right one restored)."""


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
    replaced (:class:`DatabaseGone`).

    A server database (PostgreSQL, ``postgresql+psycopg://``) gets ``pool_pre_ping``: a long-running worker's
    pooled connection that the server or the network dropped (server restart, idle timeout) is replaced on
    checkout instead of failing the next photo's transaction. Other URLs are passed to :func:`create_engine`
    unchanged. Every engine hides its statements' parameters from its error texts (``hide_parameters``): they
    hold patient codes and inbox file names, and an error's text may reach a log (:mod:`screening.logs`).
    """
    kwargs.setdefault("hide_parameters", True)
    if make_url(url).get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
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


def _missing_table(exc: DBAPIError) -> bool:
    """True when the statement failed because a table does not exist (SQLite's "no such table", PostgreSQL's
    SQLSTATE 42P01 undefined_table): the database was re-created empty, or is not a screening database."""
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state == "42P01" or "no such table" in str(orig).lower()


class _IdentityGuard:
    """Checks, at the start of each unit of work of a session factory, that the database still has the identity
    noted when the guard was made (see the module docstring)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, session: Session, transaction: Any, connection: Connection) -> None:
        where = connection.engine.url.render_as_string(hide_password=True)
        try:
            found = connection.execute(select(DatabaseIdentity.token).order_by(DatabaseIdentity.id).limit(1)).scalar()
        except DBAPIError as exc:
            if not _missing_table(exc):
                raise  # a lock, a lost connection: transaction() decides whether to wait
            raise DatabaseGone(
                f"the database {where} no longer holds the screening tables (deleted and created again empty, or "
                "another database under its name) while the worker was using it; nothing more was written. "
                "Restore the right database (or run init-db on a new one) and start the worker again") from None
        if found != self.token:
            raise DatabaseGone(
                f"the database {where} was replaced or re-created while the worker was using it (its identity "
                "changed: it is another database now); nothing more was written to it. Start the worker again to "
                "use the database that is there now, or restore the right one first")


_GUARDS: weakref.WeakKeyDictionary[sessionmaker[Session], _IdentityGuard] = weakref.WeakKeyDictionary()


def guard_identity(factory: sessionmaker[Session]) -> str:
    """Note the database's identity now (made when it has none) and check it at the start of every later unit of
    work of ``factory``'s sessions: from then on, a transaction on a database replaced or re-created under it
    raises :class:`DatabaseGone` before any statement of the unit of work runs. The worker calls it once at
    start; calling it again for the same factory keeps the first identity. Returns the identity."""
    guard = _GUARDS.get(factory)
    if guard is not None:
        return guard.token
    guard = _IdentityGuard(transaction(factory, ensure_database_token, what="reading the database's identity"))
    event.listen(factory, "after_begin", guard)
    _GUARDS[factory] = guard
    return guard.token


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


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached at all (a server stopped or restarting, the network
    down, a connection cut): nothing about the file being handled, so it waits and is tried again soon."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    if sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03"):  # connection exception, shutdown
        return True
    text = str(exc.orig).lower()
    return type(exc.orig).__name__ == "ConnectionTimeout" or any(m in text for m in (
        "connection refused", "could not connect", "connection failed", "is the server running", "timeout expired",
        "server closed the connection", "terminating connection", "unable to open database file"))


def log_failure(logger: logging.Logger, exc: BaseException, message: str, *args: object) -> bool:
    """Log ``message`` for ``exc``: one warning line naming the error's kind when the database cannot be reached
    (an outage is the same cause for every file and every try, and a traceback a try buried the log: 1,255 lines in
    40 s), a traceback otherwise. Returns :func:`is_unreachable`'s answer."""
    from ..logs import exception_kind

    unreachable = is_unreachable(exc)
    if unreachable:
        logger.warning(message + ": the database cannot be reached (%s)", *args, exception_kind(exc))
    else:
        logger.error(message, *args, exc_info=exc)
    return unreachable


# SQLSTATEs after which PostgreSQL expects the transaction to be run again: serialization failure, deadlock
RETRY_SQLSTATES = {"40001": "a serialization failure", "40P01": "a deadlock with another worker"}


def _retry_reason(exc: BaseException) -> str | None:
    """Why a unit of work that raised ``exc`` may simply be run again, or None."""
    if is_busy(exc):
        return "the database is locked by another program"
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if isinstance(exc, OperationalError) and sqlstate in RETRY_SQLSTATES:
        return f"the server aborted it after {RETRY_SQLSTATES[sqlstate]}"
    return None


def transaction(
    factory: sessionmaker[Session], work: Callable[[Session], T], *, what: str = "a database update",
    give_up_after: float | None = None, sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``work(session)`` as one unit of work (:func:`session_scope`) and return what it returns. While the
    database stays locked by another connection past the busy timeout (SQLite), or the server aborts the unit
    after a deadlock or serialization failure (PostgreSQL), wait and run it again from the start (it must only
    touch the database), with a warning each time; by default for as long as it takes, since a worker that
    exits on a lock leaves photos unhandled until someone restarts it. ``give_up_after`` seconds of waiting
    re-raise the last error instead. Any other error is raised at once."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            with session_scope(factory) as session:
                return work(session)
        except OperationalError as exc:
            reason = _retry_reason(exc)
            if reason is None or (give_up_after is not None and waited >= give_up_after):
                raise
            log.warning("%s (%s, waited %.0f s so far); trying again in %.1f s", reason, what, waited, delay)
            sleep(delay)
            waited += delay
            delay = min(delay * 2, MAX_RETRY_DELAY_S)


__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS", "RETRY_SQLSTATES", "DatabaseGone", "guard_identity", "is_busy", "is_unreachable", "log_failure", "make_engine",
    "make_session_factory", "session_scope", "sqlite_file_path", "transaction",
]

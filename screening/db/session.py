"""Engine and session helpers. Nothing here is module-level state: callers build and own their engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_BUSY_TIMEOUT_MS = 30_000


def _is_sqlite_file(url: str) -> bool:
    u = make_url(url)
    db = u.database or ""
    return u.get_backend_name() == "sqlite" and db not in ("", ":memory:") and u.query.get("mode") != "memory"


def make_engine(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS, echo: bool = False, **kwargs: Any) -> Engine:
    """Create an engine for ``url``.

    For SQLite every new DBAPI connection gets ``PRAGMA foreign_keys=ON`` and ``busy_timeout`` (so a
    writer waits for a concurrent one instead of failing with "database is locked"); file databases
    also get ``journal_mode=WAL`` (readers such as the audit never block the worker) and
    ``synchronous=NORMAL`` (safe with WAL).

    A server database (PostgreSQL, ``postgresql+psycopg://``) gets ``pool_pre_ping``: a long-running worker's
    pooled connection that the server or the network dropped (server restart, idle timeout) is replaced on
    checkout instead of failing the next photo's transaction. Nothing else differs between the two backends.
    """
    if make_url(url).get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, echo=echo, **kwargs)
    if engine.dialect.name == "sqlite":
        wal = _is_sqlite_file(url)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
            cur = dbapi_connection.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                cur.execute("PRAGMA foreign_keys = ON")
                if wal:
                    cur.execute("PRAGMA journal_mode = WAL")
                    cur.execute("PRAGMA synchronous = NORMAL")
            finally:
                cur.close()

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


__all__ = ["DEFAULT_BUSY_TIMEOUT_MS", "make_engine", "make_session_factory", "session_scope"]

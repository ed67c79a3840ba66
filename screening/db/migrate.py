"""Schema migrations with Alembic, run from code (no alembic.ini).

``init_db(engine)`` is the one call the worker and CLI need at start-up:

* brand-new database (no tables): create the schema from the models and stamp it at head;
* database tracked by Alembic and behind: take a file backup (SQLite files) and upgrade to head;
* already at head: nothing;
* a new database gets its identity (a random id, :class:`~screening.db.models.DatabaseIdentity`), an older one
  gets it from its migration;
* tables but no ``alembic_version``: refuse (an unknown database is never altered blindly).

Several workers may start at once on one database (:mod:`screening.claims`): :func:`schema_lock` makes one of them
create or upgrade the schema while the others wait, then find it at head (a lock file beside a SQLite database,
a PostgreSQL advisory lock on a server).

For staff tooling, :func:`alembic_config` returns a Config usable with ``alembic.command``
(``command.current(alembic_config(url))``, ``command.upgrade(cfg, "head", sql=True)`` for SQL output).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.orm import Session

from screening.db.models import Base
from screening.db.repository import ensure_database_token
from screening.db.session import sqlite_file_path

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version"
# pg_advisory_lock key of schema changes: any constant the database's other users do not use ("DRSCREEN" in hex)
SCHEMA_LOCK_KEY = 0x4452534352454E


class SchemaError(RuntimeError):
    """The database cannot be brought to the current schema automatically."""


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the revisions up to ``revision`` on whatever the database has now."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), revision)


def _backup_sqlite(engine: Engine, tag: str) -> Path | None:
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    if not db or db == ":memory:" or not Path(db).is_file():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(db).with_name(f"{Path(db).name}.{tag}.{stamp}.bak")
    raw = engine.raw_connection()
    try:
        target = sqlite3.connect(dest)
        try:
            driver = raw.driver_connection
            if driver is None:
                raise RuntimeError(f"no open SQLite connection to back up {db} with")
            driver.backup(target)  # consistent online copy, WAL included
        finally:
            target.close()
    finally:
        raw.close()
    return dest


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Held while the schema is created or upgraded, so that two processes starting together never both do it.
    SQLite file: an exclusive ``flock`` on ``<database>.schema.lock`` (released by the kernel even when the
    process is killed); PostgreSQL: a session advisory lock on its own connection. Waits for the holder."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({SCHEMA_LOCK_KEY})")
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({SCHEMA_LOCK_KEY})")
        return
    path = sqlite_file_path(engine.url.render_as_string(hide_password=False)) if engine.dialect.name == "sqlite" else None
    if path is None:  # in-memory SQLite: one process only
        yield
        return
    fd = os.open(path + ".schema.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def init_db(engine: Engine, *, backup: bool = True) -> str:
    """Bring the database to the head revision; returns the revision it is at afterwards. Several processes
    may call it at once (:func:`schema_lock`)."""
    with schema_lock(engine):
        return _init_db(engine, backup=backup)


def _init_db(engine: Engine, *, backup: bool) -> str:
    head = head_revision()
    tables = set(inspect(engine).get_table_names())
    if not tables - {VERSION_TABLE}:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            command.stamp(alembic_config(connection=conn), "head")
            with Session(bind=conn) as session:  # joins this transaction: committed with the schema
                ensure_database_token(session)  # this database's identity, made once
        return head
    current = current_revision(engine)
    if current is None:
        raise SchemaError(
            f"{engine.url.render_as_string(hide_password=True)} has tables ({', '.join(sorted(tables))}) "
            "but no alembic_version: not a screening database, or one from before migrations were tracked; "
            "refusing to alter it"
        )
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current not in known:
        raise SchemaError(
            f"{engine.url.render_as_string(hide_password=True)} is at schema revision {current!r}, which this version "
            f"of the software does not know (its newest is {head!r}): a newer version wrote it. Run that version, or "
            "restore the backup taken before its upgrade (screening.db.pre-<revision>.<time>.bak beside a SQLite "
            "database; your pg_dump for PostgreSQL); nothing was changed"
        )
    if current != head:
        if backup:
            _backup_sqlite(engine, f"pre-{head}")
        upgrade(engine, "head")
    return head


__all__ = [
    "MIGRATIONS_DIR",
    "SchemaError",
    "alembic_config",
    "current_revision",
    "head_revision",
    "init_db",
    "schema_lock",
    "upgrade",
]

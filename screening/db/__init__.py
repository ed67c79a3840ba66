"""Screening records: models, engine/session helpers, migrations and repository functions."""

from screening.db.migrate import SchemaError, current_revision, head_revision, init_db
from screening.db.session import (
    DatabaseGone,
    guard_identity,
    is_busy,
    make_engine,
    make_session_factory,
    session_scope,
    transaction,
)

__all__ = [
    "DatabaseGone",
    "SchemaError",
    "current_revision",
    "guard_identity",
    "head_revision",
    "init_db",
    "is_busy",
    "make_engine",
    "make_session_factory",
    "session_scope",
    "transaction",
]

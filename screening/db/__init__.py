"""Screening records: models, engine/session helpers, migrations and repository functions."""

from screening.db.migrate import SchemaError, current_revision, head_revision, init_db
from screening.db.session import make_engine, make_session_factory, session_scope

__all__ = [
    "SchemaError",
    "current_revision",
    "head_revision",
    "init_db",
    "make_engine",
    "make_session_factory",
    "session_scope",
]

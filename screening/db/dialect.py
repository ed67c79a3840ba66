"""What differs between the two databases the product runs on (SQLite and PostgreSQL) and has one owner here."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session


def insert_on_conflict(session: Session, model: Any) -> Any:
    """``INSERT INTO model`` in the session's dialect, which offers ``on_conflict_do_nothing`` /
    ``on_conflict_do_update`` (the core ``insert`` does not): one statement where two workers may race for a row."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(model)
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(model)
    raise NotImplementedError(f"INSERT ... ON CONFLICT is used here on SQLite and PostgreSQL only, not on {name}: "
                              "set [screening] database to one of those")


__all__ = ["insert_on_conflict"]

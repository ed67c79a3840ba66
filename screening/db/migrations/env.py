"""Alembic environment, driven from code (see :mod:`screening.db.migrate`); no alembic.ini is needed.

``config.attributes["connection"]`` carries an open connection when called by ``init_db``; otherwise
``sqlalchemy.url`` is read from the config (``alembic -x``-less command line use with
``screening.db.migrate.alembic_config(url)``).
"""

from __future__ import annotations

from typing import Any

from alembic import context

from screening.db.models import Base
from screening.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic: no sqlalchemy.url set and no connection handed over; run migrations through init_db")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

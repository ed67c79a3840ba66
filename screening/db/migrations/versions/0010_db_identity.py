"""The database's identity: a random id written once, so that a worker notices its database being replaced.

Revision ID: 0010_db_identity
Revises: 0009_pages
Create Date: 2026-12-02

Why: the worker detected a deleted or replaced database by the SQLite file's inode alone, which says nothing
for a PostgreSQL database dropped and created again, or a SQLite file restored in place from another database
(same inode, other content). One row holds a random id, made here for an existing database and by ``init_db``
for a new one; the worker notes it at start and checks it before every unit of work
(``screening.db.session.guard_identity``). Frozen: this file must not follow later model edits.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0010_db_identity"
down_revision = "0009_pages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "database_identity",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_database_identity"),
    )
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC, as every timestamp column stores it
    op.bulk_insert(table, [{"id": 1, "token": secrets.token_hex(16), "created_at": now}])


def downgrade() -> None:
    op.drop_table("database_identity")

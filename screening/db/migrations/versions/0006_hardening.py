"""Stable reason codes: images.error_code, drops.reason_code, events.code.

Revision ID: 0006_hardening
Revises: 0014_reviews
Create Date: 2026-01-20

Why: the audit grouped errors by their message text, and messages name files and carry numbers, so one
cause showed as many rows. The code says why in a word that never changes (``screening.rejection``:
RejectReason, FailReason, Incident); the message stays for people. All columns are nullable: rows written
before this revision keep NULL and the audit groups them by their message as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_hardening"
down_revision = "0014_reviews"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("error_code", sa.String(length=32), nullable=True))
    op.add_column("drops", sa.Column("reason_code", sa.String(length=32), nullable=True))
    op.add_column("events", sa.Column("code", sa.String(length=32), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002: a batch rebuild would DROP TABLE images under foreign keys.
    op.drop_column("events", "code")
    op.drop_column("drops", "reason_code")
    op.drop_column("images", "error_code")

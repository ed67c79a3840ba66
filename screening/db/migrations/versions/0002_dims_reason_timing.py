"""Image width/height, Drop.reason and Result.inference_ms.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-02

All new columns are nullable, so existing rows stay valid and keep NULL (unknown) there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("width", sa.Integer(), nullable=True))
    op.add_column("images", sa.Column("height", sa.Integer(), nullable=True))
    op.add_column("drops", sa.Column("reason", sa.Text(), nullable=True))
    op.add_column("results", sa.Column("inference_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): a batch table rebuild would DROP TABLE images, which foreign
    # keys from drops/results/events forbid while PRAGMA foreign_keys is ON.
    op.drop_column("results", "inference_ms")
    op.drop_column("drops", "reason")
    op.drop_column("images", "height")
    op.drop_column("images", "width")

"""Image.device (the camera, from DICOM tags) and Result.original_masks (lesion masks at the photo's own size).

Revision ID: 0007_device_original_masks
Revises: 0002
Create Date: 2026-12-01

Both columns are nullable: rows written before keep NULL (camera unknown; masks only in the model's frame).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_device_original_masks"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("device", sa.String(length=128), nullable=True))
    op.add_column("results", sa.Column("original_masks", sa.JSON(), nullable=True))


def downgrade() -> None:
    # plain DROP COLUMN (SQLite >= 3.35), as in 0002: a batch rebuild of images would trip the foreign keys
    op.drop_column("results", "original_masks")
    op.drop_column("images", "device")

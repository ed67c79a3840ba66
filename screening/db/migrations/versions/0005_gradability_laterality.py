"""Intake checks on images: the gradability verdict and the eye read from the photo (issue 13).

Revision ID: 0005_gradability_laterality
Revises: 0006_hardening
Create Date: 2026-01-20

Written before 0006/0007/0014 and chained after 0006_hardening when its branch was merged (the id is descriptive,
not an order). All new columns are nullable: images recorded before this revision were never checked and keep NULL (unknown).
Values are validated by the repository, not by CHECK constraints: adding one to ``images`` on SQLite needs a
table rebuild, which the foreign keys from drops/results/events forbid (see 0002).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_gradability_laterality"
down_revision = "0006_hardening"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("gradable", sa.Boolean()),
    ("quality_reasons", sa.JSON()),
    ("quality_scores", sa.JSON()),
    ("eye_source", sa.String(8)),
    ("predicted_eye", sa.String(1)),
    ("eye_confidence", sa.Float()),
    ("eye_mismatch", sa.Boolean()),
    ("eye_note", sa.Text()),
    ("photo_dir", sa.Text()),  # an ungradable image's published photo folder (it has no results row)
    ("stored_at", sa.DateTime()),  # when the store stage committed the image (naive UTC, as every timestamp here)
)


def upgrade() -> None:
    for name, type_ in _COLUMNS:
        op.add_column("images", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002.
    for name, _ in reversed(_COLUMNS):
        op.drop_column("images", name)

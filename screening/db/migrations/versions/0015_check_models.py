"""Which gradability and laterality models checked each photo.

Revision ID: 0015_check_models
Revises: 0011_audit_tallies
Create Date: 2026-12-02

Why: the intake checks make calls a clinic acts on (ungradable: recapture; the eye's label contradicted), and their
models are refitted (the laterality model changed format twice in two sessions). A flag must say which model
raised it, as a grade says which checkpoint gave it (``results.checkpoint_sha256``). One nullable JSON column:
``{"gradability": "<format> <sha256 prefix>", "laterality": "..."}``; images checked before this revision keep
NULL (unknown).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_check_models"
down_revision = "0011_audit_tallies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("check_models", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002.
    op.drop_column("images", "check_models")

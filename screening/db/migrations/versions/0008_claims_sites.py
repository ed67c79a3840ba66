"""Several workers on one database: claims, and the site of each result.

Revision ID: 0008_claims_sites
Revises: 0003_audit_columns_indexes
Create Date: 2026-12-01

Why (issue 15): one worker per inbox and database was enforced by a file lock, so a programme could not add a
second worker (a GPU box, another clinic) on the same inbox or server database. Now each photo, and each
visit's next report version, is claimed in the database (``claims``: one row per kind and key, a lease renewed
while the work goes on, taken over after a worker dies), and each result records the ``[screening] site`` of
the worker that graded it so that the audit can count per site. A new table and a nullable column: existing
rows keep NULL (graded before sites were recorded). Frozen: this file must not follow later model edits.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_claims_sites"
down_revision = "0003_audit_columns_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(160), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_claims"),
        sa.UniqueConstraint("kind", "key", name="uq_claims_kind_key"),
        sa.CheckConstraint("kind IN ('file', 'visit')", name=op.f("ck_claims_kind")),
    )
    op.create_index("ix_claims_holder", "claims", ["holder"])
    op.create_index("ix_claims_expires_at", "claims", ["expires_at"])
    # a plain ADD COLUMN (no batch rebuild): results is referenced by no foreign key, but a rebuild of a
    # million-row table is minutes where this is instant
    op.add_column("results", sa.Column("site", sa.String(64), nullable=True))
    op.create_index("ix_results_audit_site", "results", ["site", "turnaround_s", "referable", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_results_audit_site", table_name="results")
    op.drop_column("results", "site")  # SQLite >= 3.35 drops a column in place
    op.drop_index("ix_claims_expires_at", table_name="claims")
    op.drop_index("ix_claims_holder", table_name="claims")
    op.drop_table("claims")

"""A person may set a photo's eye, or move it to another patient's visit, after checking its label.

Revision ID: 0018_staff_refiling
Revises: 0017_logout_ends_sessions
Create Date: 2026-12-02

Why: a laterality mismatch or an identity conflict told staff to check the label, but nothing could record the
answer: the photo stayed under the eye and patient its name stated, and a copy named right was refused as a
conflict. ``dr-screen review eye`` now sets (or confirms) the eye and ``dr-screen review move`` files a photo in
another patient's visit. ``images.refiled_at`` is when a person did either (``eye_source`` 'staff' for an eye),
``images.filing_note`` what the photo's report section says about a move; ``exams.refiled_at`` and
``exams.filing_note`` the same for the visit a photo left. The trail is in ``eye_set`` and ``moved`` events. A
visit's report is made again after those times, and a sign-off from before them no longer covers a refiled photo.
NULL: never refiled by a person.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_staff_refiling"
down_revision = "0017_logout_ends_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("refiled_at", sa.DateTime(), nullable=True))
    op.add_column("images", sa.Column("filing_note", sa.Text(), nullable=True))
    op.add_column("exams", sa.Column("refiled_at", sa.DateTime(), nullable=True))
    op.add_column("exams", sa.Column("filing_note", sa.Text(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002.
    for table, column in (("exams", "filing_note"), ("exams", "refiled_at"), ("images", "filing_note"),
                          ("images", "refiled_at")):
        op.drop_column(table, column)

"""A person may set a photo's eye after checking its label.

Revision ID: 0018_eye_set_by_staff
Revises: 0017_logout_ends_sessions
Create Date: 2026-12-02

Why: a laterality mismatch or an identity conflict told staff to check the label, but nothing could record the
answer: the photo stayed under the eye its name stated, with the warning, and a copy named with the right eye was
refused as a conflict. ``dr-screen review eye`` now sets (or confirms) the eye; ``images.eye_set_at`` is when,
``eye_source`` becomes 'staff', and the trail is an ``eye_set`` event. The visit's report is made again after that
time, and a sign-off from before it no longer covers the photo. NULL: never set by a person.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_eye_set_by_staff"
down_revision = "0017_logout_ends_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("eye_set_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002.
    op.drop_column("images", "eye_set_at")

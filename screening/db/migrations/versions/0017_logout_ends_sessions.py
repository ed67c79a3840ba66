"""Logging out of the review page ends the user's sessions.

Revision ID: 0017_logout_ends_sessions
Revises: 0016_report_referral_level
Create Date: 2026-12-02

Why: the page's session is a signed cookie; clearing it at logout did not stop a copy of it (a shared clinic
computer, a saved browser profile) from working for the rest of its 8 hours. ``review_users.sessions_ended_at``
is set at logout, and a session that logged in before it is refused, as one from before a password change
already was. NULL: never logged out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_logout_ends_sessions"
down_revision = "0016_report_referral_level"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("review_users", sa.Column("sessions_ended_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002.
    op.drop_column("review_users", "sessions_ended_at")

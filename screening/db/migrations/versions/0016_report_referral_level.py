"""The recommendation each report version printed: reports.referral_level.

Revision ID: 0016_report_referral_level
Revises: 0015_check_models
Create Date: 2026-12-03

Why: the audit could not say how many visits the programme recommended for urgent referral, recall or rescreening
(found in a staff-style check): its referral rows are per photo (the model's referable yes/no), and a visit whose
photos were all ungradable, recalled or referred as such, was in no visit count at all. Each version now records
the level key of ``screening.report.REFERRAL_LEVELS`` its PDF led with: the model's recommendation on the worker's
draft versions, the grader's on a reviewed version. One nullable column; reports rendered before this revision keep
NULL: what they printed is not guessed (the rules, thresholds and ``ungradable_rule`` may have changed since), and the
audit counts such visits as "recorded before this count".
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_report_referral_level"
down_revision = "0015_check_models"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reports", sa.Column("referral_level", sa.String(16), nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002 and 0015.
    op.drop_column("reports", "referral_level")

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

The audit counts visits by the recommendation standing for them (the latest version's), and a year holds half a
million visits: found by walking every photo of the range and each visit's latest report, that took 1.2 s of the
audit's one second (BENCHMARKS.md). So each visit also keeps, on its own row, when its first photo graded or
stored ungradable arrived (``exams.screened_at``) and its latest version's number, level and whether a grader set
it (``standing_*``), kept by screening.db.tallies as reports are recorded, with an index the audit reads as one
range. Filled here from the rows (the statement of ``tallies.STANDING_SQL``, which this revision may not import).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_report_referral_level"
down_revision = "0015_check_models"
branch_labels = None
depends_on = None


STANDING_SQL = """UPDATE exams SET
    screened_at = (SELECT min(i.received_at) FROM images i WHERE i.exam_id = exams.id
                                                 AND i.state || '' IN ('done', 'reported')),
    standing_version = (SELECT max(r.version) FROM reports r WHERE r.exam_id = exams.id),
    standing_level = (SELECT r.referral_level FROM reports r WHERE r.exam_id = exams.id ORDER BY r.version DESC LIMIT 1),
    standing_by_grader = (SELECT r.review_id IS NOT NULL FROM reports r WHERE r.exam_id = exams.id
                          ORDER BY r.version DESC LIMIT 1)"""

STANDING_COLUMNS = ("screened_at", "standing_version", "standing_level", "standing_by_grader")


def upgrade() -> None:
    op.add_column("reports", sa.Column("referral_level", sa.String(16), nullable=True))
    op.add_column("exams", sa.Column("screened_at", sa.DateTime(), nullable=True))
    op.add_column("exams", sa.Column("standing_version", sa.Integer(), nullable=True))
    op.add_column("exams", sa.Column("standing_level", sa.String(16), nullable=True))
    op.add_column("exams", sa.Column("standing_by_grader", sa.Boolean(), nullable=True))
    op.execute(STANDING_SQL)
    op.create_index("ix_exams_screened_standing", "exams", list(STANDING_COLUMNS))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), as in 0002 and 0015.
    op.drop_index("ix_exams_screened_standing", table_name="exams")
    for column in reversed(STANDING_COLUMNS):
        op.drop_column("exams", column)
    op.drop_column("reports", "referral_level")

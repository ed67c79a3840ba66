"""Clinician sign-off: review_users, reviews, review_eyes and reports.review_id.

Revision ID: 0014_reviews
Revises: 0007_device_original_masks
Create Date: 2026-12-01

New tables only, plus one nullable column on ``reports``: existing rows keep their values (a report made
before this revision is a model draft, ``review_id`` NULL). Reviews are append-only; SQLite triggers
refuse UPDATE and DELETE on them. Frozen: this file must not follow later model edits.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_reviews"
down_revision = "0007_device_original_masks"
branch_labels = None
depends_on = None

_APPEND_ONLY = ("reviews", "review_eyes")


def upgrade() -> None:
    op.create_table(
        "review_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_users"),
        sa.UniqueConstraint("username", name="uq_review_users_username"),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("exam_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("referral", sa.String(16), nullable=False),
        sa.Column("model_referral", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.ForeignKeyConstraint(["exam_id"], ["exams.id"], name="fk_reviews_exam_id_exams", ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["user_id"], ["review_users.id"], name="fk_reviews_user_id_review_users", ondelete="RESTRICT"),
        sa.CheckConstraint("outcome IN ('confirmed', 'corrected')", name=op.f("ck_reviews_outcome")),
        sa.CheckConstraint("source IN ('cli', 'web', 'import')", name=op.f("ck_reviews_source")),
    )
    op.create_index("ix_reviews_exam_id", "reviews", ["exam_id"])
    op.create_index("ix_reviews_reviewed_at", "reviews", ["reviewed_at"])
    op.create_table(
        "review_eyes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("review_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("eye", sa.String(1), nullable=False),
        sa.Column("gradable", sa.Boolean(), nullable=False),
        sa.Column("dr_grade", sa.Integer(), nullable=True),
        sa.Column("dme_grade", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_review_eyes"),
        sa.UniqueConstraint("review_id", "eye", name="uq_review_eyes_review_id_eye"),
        sa.ForeignKeyConstraint(["review_id"], ["reviews.id"], name="fk_review_eyes_review_id_reviews", ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_review_eyes_image_id_images", ondelete="RESTRICT"),
        sa.CheckConstraint("eye IN ('L', 'R')", name=op.f("ck_review_eyes_eye")),
        sa.CheckConstraint("dr_grade IS NULL OR dr_grade BETWEEN 0 AND 4", name=op.f("ck_review_eyes_dr_grade")),
        sa.CheckConstraint("dme_grade IS NULL OR dme_grade BETWEEN 0 AND 2", name=op.f("ck_review_eyes_dme_grade")),
        sa.CheckConstraint(
            "(gradable = 1 AND dr_grade IS NOT NULL AND dme_grade IS NOT NULL) OR "
            "(gradable = 0 AND dr_grade IS NULL AND dme_grade IS NULL)",
            name=op.f("ck_review_eyes_grades_iff_gradable"),
        ),
    )
    op.create_index("ix_review_eyes_image_id", "review_eyes", ["image_id"])
    # reports is referenced by no other table, so the batch rebuild (named foreign key) is allowed with
    # foreign keys ON; its rows are copied over unchanged
    with op.batch_alter_table("reports", recreate="always") as batch:
        batch.add_column(sa.Column("review_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_reports_review_id_reviews", "reviews", ["review_id"], ["id"], ondelete="RESTRICT")
    if op.get_bind().dialect.name == "sqlite":
        for table in _APPEND_ONLY:
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: record a new review instead'); END"
                )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in _APPEND_ONLY:
            for verb in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{verb}")
    with op.batch_alter_table("reports", recreate="always") as batch:
        batch.drop_constraint("fk_reports_review_id_reviews", type_="foreignkey")
        batch.drop_column("review_id")
    op.drop_index("ix_review_eyes_image_id", table_name="review_eyes")
    op.drop_table("review_eyes")
    op.drop_index("ix_reviews_reviewed_at", table_name="reviews")
    op.drop_index("ix_reviews_exam_id", table_name="reviews")
    op.drop_table("reviews")
    op.drop_table("review_users")

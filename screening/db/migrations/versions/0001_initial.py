"""Initial schema: patients, exams, images, drops, results, reports, events.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Frozen: this file describes the schema as first shipped and must not follow later model edits.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patients"),
        sa.UniqueConstraint("code", name="uq_patients_code"),
    )
    op.create_table(
        "exams",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("exam_date", sa.Date(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_exams"),
        sa.UniqueConstraint("patient_id", "exam_date", name="uq_exams_patient_id_exam_date"),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], name="fk_exams_patient_id_patients", ondelete="RESTRICT"),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("exam_id", sa.Integer(), nullable=True),
        sa.Column("eye", sa.String(1), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("source_name", sa.Text(), nullable=False),
        sa.Column("stored_path", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("sha256", name="uq_images_sha256"),
        sa.ForeignKeyConstraint(["exam_id"], ["exams.id"], name="fk_images_exam_id_exams", ondelete="RESTRICT"),
        sa.CheckConstraint(
            "state IN ('received', 'done', 'reported', 'rejected', 'failed')", name=op.f("ck_images_state")
        ),
        sa.CheckConstraint("eye IS NULL OR eye IN ('L', 'R')", name=op.f("ck_images_eye")),
    )
    op.create_index("ix_images_state", "images", ["state"])
    op.create_index("ix_images_exam_id", "images", ["exam_id"])
    op.create_index("ix_images_received_at", "images", ["received_at"])
    op.create_table(
        "drops",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("source_name", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drops"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_drops_image_id_images", ondelete="RESTRICT"),
        sa.CheckConstraint("outcome IN ('new', 'duplicate', 'rejected')", name=op.f("ck_drops_outcome")),
    )
    op.create_index("ix_drops_sha256", "drops", ["sha256"])
    op.create_index("ix_drops_received_at", "drops", ["received_at"])
    op.create_index("ix_drops_image_id", "drops", ["image_id"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("dr_grade", sa.Integer(), nullable=False),
        sa.Column("dr_probs", sa.JSON(), nullable=False),
        sa.Column("dme_grade", sa.Integer(), nullable=False),
        sa.Column("dme_probs", sa.JSON(), nullable=False),
        sa.Column("referable_score", sa.Float(), nullable=False),
        sa.Column("referable", sa.Boolean(), nullable=False),
        *(sa.Column(f"area_{k}", sa.Float(), nullable=False) for k in ("ma", "he", "ex", "se", "od")),
        sa.Column("mask_dir", sa.Text(), nullable=True),
        sa.Column("overlay_path", sa.Text(), nullable=True),
        sa.Column("dr_cam_path", sa.Text(), nullable=True),
        sa.Column("dme_cam_path", sa.Text(), nullable=True),
        sa.Column("device", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.UniqueConstraint("image_id", name="uq_results_image_id"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_results_image_id_images", ondelete="RESTRICT"),
        sa.CheckConstraint("dr_grade BETWEEN 0 AND 4", name=op.f("ck_results_dr_grade")),
        sa.CheckConstraint("dme_grade BETWEEN 0 AND 2", name=op.f("ck_results_dme_grade")),
        *(
            sa.CheckConstraint(f"area_{k} >= 0 AND area_{k} <= 1", name=op.f(f"ck_results_area_{k}"))
            for k in ("ma", "he", "ex", "se", "od")
        ),
    )
    op.create_index("ix_results_model_version", "results", ["model_version"])
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("exam_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
        sa.UniqueConstraint("exam_id", "version", name="uq_reports_exam_id_version"),
        sa.ForeignKeyConstraint(["exam_id"], ["exams.id"], name="fk_reports_exam_id_exams", ondelete="RESTRICT"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("drop_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_events_image_id_images", ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["drop_id"], ["drops.id"], name="fk_events_drop_id_drops", ondelete="RESTRICT"),
    )
    op.create_index("ix_events_image_id", "events", ["image_id"])
    op.create_index("ix_events_created_at", "events", ["created_at"])


def downgrade() -> None:
    for table in ("events", "reports", "results", "drops", "images", "exams", "patients"):
        op.drop_table(table)

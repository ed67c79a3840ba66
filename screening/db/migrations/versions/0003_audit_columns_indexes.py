"""Audit at scale: results carry their exam, arrival time and turnaround; indexes for each audit count.

Revision ID: 0003_audit_columns_indexes
Revises: 0010_db_identity
Create Date: 2026-11-30

Written after 0006_hardening and chained after 0010_db_identity when main (issues 12b and 13a) was merged into
its branch (the id is descriptive, not an order).

The audit used to join every result to its image and look up each exam's first report: fine for a clinic,
tens of seconds over a million results. Now ``results`` holds ``exam_id`` and ``received_at`` (copied from
the image; neither changes after grading) and ``turnaround_s`` (seconds from arrival to the first report
of the exam made at or after the result, NULL while awaiting), and each audit count walks one index.
Existing rows are filled here with the same definitions the audit used before, so its numbers do not change.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003_audit_columns_indexes"
down_revision = "0010_db_identity"  # re-chained when revisions of other branches land below it
branch_labels = None
depends_on = None

CHUNK = 20_000

RESULT_INDEXES = {
    "ix_results_audit_grades": ["model_version", "dr_grade", "dme_grade", "referable", "received_at", "turnaround_s"],
    "ix_results_audit_exams": ["exam_id", "referable", "received_at"],
    "ix_results_audit_model_exams": ["model_version", "exam_id", "referable", "received_at"],
    "ix_results_audit_turnaround": ["model_version", "turnaround_s", "received_at"],
    "ix_results_turnaround": ["turnaround_s", "received_at"],
    "ix_results_image_model": ["image_id", "model_version"],
}


def _utc(value: Any) -> datetime:
    """A timestamp as read back here (naive UTC from PostgreSQL, text or naive from SQLite) -> aware UTC."""
    when: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _turnaround_in_python(bind: sa.Connection) -> None:
    """SQLite has no exact timestamp arithmetic (julianday is off by up to 50 us), so the turnaround is
    computed here from the timestamps themselves, a chunk of results at a time (never all in memory)."""
    select_chunk = sa.text(
        "SELECT r.id, r.received_at, (SELECT min(rp.created_at) FROM reports rp "
        "WHERE rp.exam_id = r.exam_id AND rp.created_at >= r.created_at) AS first_report_at "
        "FROM results r WHERE r.id > :after ORDER BY r.id LIMIT :n"
    )
    update = sa.text("UPDATE results SET turnaround_s = :t WHERE id = :id")
    after = 0
    while rows := bind.execute(select_chunk, {"after": after, "n": CHUNK}).all():
        after = rows[-1][0]
        values = [{"id": rid, "t": (_utc(first) - _utc(received)).total_seconds()}
                  for rid, received, first in rows if first is not None]
        if values:
            bind.execute(update, values)


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("exam_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("received_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("turnaround_s", sa.Float(), nullable=True))
        batch.create_foreign_key("fk_results_exam_id_exams", "exams", ["exam_id"], ["id"], ondelete="RESTRICT")
        batch.drop_index("ix_results_model_version")

    bind = op.get_bind()
    bind.execute(sa.text(
        "UPDATE results SET exam_id = (SELECT images.exam_id FROM images WHERE images.id = results.image_id), "
        "received_at = (SELECT images.received_at FROM images WHERE images.id = results.image_id)"
    ))
    if bind.dialect.name == "postgresql":  # one set-based statement; interval arithmetic is exact there
        bind.execute(sa.text(
            "UPDATE results SET turnaround_s = EXTRACT(EPOCH FROM (f.first_report_at - results.received_at)) "
            "FROM (SELECT r.id, min(rp.created_at) AS first_report_at FROM results r "
            "      JOIN reports rp ON rp.exam_id = r.exam_id AND rp.created_at >= r.created_at GROUP BY r.id) f "
            "WHERE f.id = results.id"
        ))
    else:
        _turnaround_in_python(bind)

    with op.batch_alter_table("results") as batch:
        batch.alter_column("received_at", existing_type=sa.DateTime(), nullable=False)
    for name, cols in RESULT_INDEXES.items():
        op.create_index(name, "results", cols)
    op.drop_index("ix_images_state", table_name="images")
    op.create_index("ix_images_state_received_at", "images", ["state", "received_at"])
    op.create_index("ix_drops_outcome_received_at", "drops", ["outcome", "received_at", "image_id"])


def downgrade() -> None:
    op.drop_index("ix_drops_outcome_received_at", table_name="drops")
    op.drop_index("ix_images_state_received_at", table_name="images")
    op.create_index("ix_images_state", "images", ["state"])
    for name in RESULT_INDEXES:
        op.drop_index(name, table_name="results")
    # 'results' is referenced by no foreign key, so SQLite's batch table rebuild is allowed here
    with op.batch_alter_table("results") as batch:
        batch.drop_constraint("fk_results_exam_id_exams", type_="foreignkey")
        batch.drop_column("turnaround_s")
        batch.drop_column("received_at")
        batch.drop_column("exam_id")
        batch.create_index("ix_results_model_version", ["model_version"])

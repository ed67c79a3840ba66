"""Daily tallies for the audit: grades, exams, drops and gradability counted as rows are written.

Revision ID: 0011_audit_tallies
Revises: 0008_claims_sites
Create Date: 2026-11-30

Why (issue 15): the audit of a year (a million results) must take under a second on SQLite and PostgreSQL; walking
a million rows per count took 1.3 s and more. ``audit_tallies`` keeps those counts per UTC day of arrival, and
``exam_tallies`` where each exam is counted (screening.db.tallies, which keeps both from now on). This revision
creates them and fills them from the rows already there. Frozen: this file must not follow later model edits, so
the statements that fill the tables are written out here (the same as ``screening.db.tallies.REBUILD_SQL`` today).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0011_audit_tallies"
down_revision = "0008_claims_sites"
branch_labels = None
depends_on = None

_FILL = (
    """INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT date(received_at), 'graded', model_version,
           CAST(dr_grade AS VARCHAR) || '|' || CAST(dme_grade AS VARCHAR) || '|' || CASE WHEN referable THEN '1' ELSE '0' END,
           '', count(*)
    FROM results GROUP BY date(received_at), model_version, dr_grade, dme_grade, referable""",
    """INSERT INTO exam_tallies (exam_id, model_version, day, referable, multi_day)
    SELECT exam_id, model_version, min(date(received_at)), max(CASE WHEN referable THEN 1 ELSE 0 END) = 1,
           min(date(received_at)) <> max(date(received_at))
    FROM results WHERE exam_id IS NOT NULL GROUP BY exam_id, model_version""",
    """INSERT INTO exam_tallies (exam_id, model_version, day, referable, multi_day)
    SELECT exam_id, '', min(date(received_at)), max(CASE WHEN referable THEN 1 ELSE 0 END) = 1,
           min(date(received_at)) <> max(date(received_at))
    FROM results WHERE exam_id IS NOT NULL GROUP BY exam_id""",
    """INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT day, 'exams', model_version, '', '', count(*) FROM exam_tallies WHERE NOT multi_day
    GROUP BY day, model_version""",
    """INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT day, 'referable_exams', model_version, '', '', count(*) FROM exam_tallies WHERE NOT multi_day AND referable
    GROUP BY day, model_version""",
    """INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT date(received_at), 'drops', '', outcome, '', count(*) FROM drops GROUP BY date(received_at), outcome""",
    *(f"""INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT date(received_at), '{metric}', '', COALESCE(device, 'unknown'), '', count(*) FROM images
    WHERE gradable IS NOT NULL AND {cond} GROUP BY date(received_at), COALESCE(device, 'unknown')"""
      for metric, cond in (("assessed", "TRUE"), ("ungradable", "NOT gradable"), ("eye_mismatch", "eye_mismatch"),
                           ("eye_not_confirmed", "EXISTS (SELECT 1 FROM events WHERE events.kind = 'eye_not_confirmed' "
                                                 "AND events.image_id = images.id)"))),
)


def _fill_reasons(conn: sa.Connection) -> None:
    """Each reason of the ungradable photos, per day and device (the reasons are a JSON list: split in Python)."""
    counts: dict[tuple[str, str, str], int] = {}
    found: Sequence[Any] = conn.execute(sa.text(
        "SELECT date(received_at), device, CAST(quality_reasons AS TEXT), count(*) FROM images WHERE NOT gradable "
        "GROUP BY date(received_at), device, CAST(quality_reasons AS TEXT)"
    )).all()
    for day, device, listing, n in found:
        reasons = (json.loads(listing) if listing else None) or ["(no reason given)"]
        for reason in dict.fromkeys(str(r) for r in reasons):
            k = (str(day), device or "unknown", reason)
            counts[k] = counts.get(k, 0) + int(n)
    tallies = sa.table("audit_tallies", sa.column("day", sa.Date()), sa.column("metric"), sa.column("model_version"),
                       sa.column("key"), sa.column("detail"), sa.column("n"))
    rows = [{"day": date.fromisoformat(day[:10]), "metric": "ungradable_reason", "model_version": "", "key": device,
             "detail": reason, "n": n} for (day, device, reason), n in sorted(counts.items())]
    if rows:
        conn.execute(tallies.insert(), rows)


def upgrade() -> None:
    op.create_table(
        "audit_tallies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("metric", sa.String(24), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("detail", sa.String(128), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_tallies"),
        sa.UniqueConstraint("day", "metric", "model_version", "key", "detail", name="uq_audit_tallies_day_metric_model_version_key_detail"),
    )
    op.create_table(
        "exam_tallies",
        sa.Column("exam_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("referable", sa.Boolean(), nullable=False),
        sa.Column("multi_day", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["exam_id"], ["exams.id"], name="fk_exam_tallies_exam_id_exams", ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("exam_id", "model_version", name="pk_exam_tallies"),
    )
    op.create_index("ix_exam_tallies_multi_day", "exam_tallies", ["model_version", "multi_day", "exam_id"])
    awaiting = sa.text("turnaround_s IS NULL")
    op.create_index("ix_results_awaiting", "results", ["model_version", "received_at"], sqlite_where=awaiting,
                    postgresql_where=awaiting)
    conn = op.get_bind()
    for sql in _FILL:
        conn.execute(sa.text(sql))
    _fill_reasons(conn)


def downgrade() -> None:
    op.drop_index("ix_results_awaiting", table_name="results")
    op.drop_index("ix_exam_tallies_multi_day", table_name="exam_tallies")
    op.drop_table("exam_tallies")
    op.drop_table("audit_tallies")

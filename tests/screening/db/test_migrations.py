"""Schema migrations: an old (revision 0001) database is upgraded in place without losing rows, on SQLite and on
PostgreSQL (``db_url``): the same revisions serve both."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from screening.db import SchemaError, current_revision, head_revision, init_db, make_engine, make_session_factory
from screening.db.migrate import upgrade
from screening.db.models import Base, Drop, Image, Result


def _cols(engine, table):
    return {c["name"] for c in inspect(engine).get_columns(table)}


def _diff(engine):
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_head_is_third_revision():
    assert head_revision() == "0003"


# rows written by the old schema, with plain SQL as an old worker would have (portable SQL: ids from the
# database's own sequence or rowid, so that PostgreSQL's sequences stay in step)
OLD_ROWS = """
INSERT INTO patients (code, created_at) VALUES ('P001', '2024-03-01 08:00:00.000000');
INSERT INTO exams (patient_id, exam_date, created_at)
SELECT id, '2024-03-01', '2024-03-01 08:00:00.000000' FROM patients WHERE code = 'P001';
INSERT INTO images (exam_id, eye, sha256, source_name, stored_path, state, error, received_at, updated_at)
SELECT id, 'L', 'aa', 'P001_L_20240301.jpg', 'archive/aa.jpg', 'reported', NULL,
       '2024-03-01 08:00:00.000000', '2024-03-01 08:05:00.000000' FROM exams;
INSERT INTO drops (image_id, sha256, source_name, received_at, outcome)
SELECT id, 'aa', 'P001_L_20240301.jpg', '2024-03-01 08:00:00.000000', 'new' FROM images;
INSERT INTO results (image_id, model_version, checkpoint_sha256, dr_grade, dr_probs, dme_grade, dme_probs,
                     referable_score, referable, area_ma, area_he, area_ex, area_se, area_od,
                     mask_dir, overlay_path, dr_cam_path, dme_cam_path, device, created_at)
SELECT id, 'v1', 'cc', 3, '[0,0,0.1,0.8,0.1]', 1, '[0.2,0.7,0.1]', 0.93, TRUE, 0.01, 0.02, 0.0, 0.0, 0.03,
       'work/1', 'work/1/o.png', 'work/1/dr.png', 'work/1/dme.png', 'cpu', '2024-03-01 08:01:00.000000' FROM images;
INSERT INTO reports (exam_id, version, path, model_version, created_at)
SELECT id, 1, 'reports/P001.pdf', 'v1', '2024-03-01 08:02:00.000000' FROM exams;
INSERT INTO events (image_id, drop_id, kind, message, created_at)
SELECT image_id, id, 'state', 'received -> done', '2024-03-01 08:01:00.000000' FROM drops
"""


def test_upgrade_from_revision_1_keeps_rows(db_url, tmp_path):
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert "width" not in _cols(engine, "images") and "reason" not in _cols(engine, "drops")
    assert "inference_ms" not in _cols(engine, "results")
    with engine.begin() as conn:
        for statement in OLD_ROWS.split(";"):
            conn.exec_driver_sql(statement)

    assert init_db(engine) == head_revision()
    assert current_revision(engine) == head_revision()
    assert {"width", "height"} <= _cols(engine, "images")
    assert "reason" in _cols(engine, "drops") and "inference_ms" in _cols(engine, "results")
    assert _diff(engine) == []
    backups = list(tmp_path.glob("screening.db.pre-*.bak"))
    if engine.dialect.name == "sqlite":  # a file copy first; PostgreSQL runs the upgrade in one transaction
        assert len(backups) == 1
        with sqlite3.connect(backups[0]) as b:
            assert b.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
            assert b.execute("SELECT count(*) FROM results").fetchone() == (1,)
    else:
        assert backups == []

    with make_session_factory(engine)() as s:
        img = s.scalars(select(Image)).one()
        assert (img.source_name, img.state, img.eye, img.width, img.height) == ("P001_L_20240301.jpg", "reported", "L", None, None)
        assert img.exam.patient.code == "P001"
        assert img.received_at.isoformat() == "2024-03-01T08:00:00+00:00"
        r = s.scalars(select(Result)).one()
        assert (r.dr_grade, r.dme_grade, r.referable, r.inference_ms) == (3, 1, True, None)
        assert r.dr_probs == [0, 0, 0.1, 0.8, 0.1] and r.area_od == 0.03
        # 0003 copied the image's exam and arrival time and measured the turnaround (08:00 -> report 08:02)
        assert (r.exam_id, r.received_at, r.turnaround_s) == (img.exam_id, img.received_at, 120.0)
        d = s.scalars(select(Drop)).one()
        assert (d.outcome, d.reason) == ("new", None)
        # the new columns are writable
        img.width, img.height, d.reason, r.inference_ms = 2048, 1536, "ok", 41.0
        s.commit()
    engine.dispose()


def test_new_database_is_created_and_stamped(db_url, tmp_path):
    engine = make_engine(db_url)
    assert init_db(engine) == head_revision()
    assert current_revision(engine) == head_revision()
    assert _diff(engine) == []
    assert not list(tmp_path.glob("*.bak"))
    assert init_db(engine) == head_revision()  # idempotent, no backup when nothing to do
    assert not list(tmp_path.glob("*.bak"))


def test_migrations_from_empty_match_models(make_db_url):
    engine = make_engine(make_db_url("chain"))
    upgrade(engine, "head")
    assert _diff(engine) == []
    via_models = make_engine(make_db_url("models"))
    init_db(via_models)
    a, b = inspect(engine), inspect(via_models)
    for table in Base.metadata.tables:
        # column order differs (ALTER TABLE ADD COLUMN appends); everything else must be the same
        assert {c["name"] for c in a.get_columns(table)} == {c["name"] for c in b.get_columns(table)}, table
        for what in ("get_indexes", "get_unique_constraints", "get_check_constraints", "get_foreign_keys"):
            names = lambda insp: sorted(x["name"] or "" for x in getattr(insp, what)(table))  # noqa: E731
            assert names(a) == names(b), (table, what)
    engine.dispose()
    via_models.dispose()


def test_unknown_database_is_refused(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE something (id INTEGER)")
    with pytest.raises(SchemaError, match="alembic_version"):
        init_db(engine)
    engine.dispose()


def test_downgrade_to_revision_1_keeps_rows(db_url):
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(db_url)
    init_db(engine)
    with make_session_factory(engine).begin() as s:
        img = Image(sha256="ab" * 32, source_name="P1_L.jpg", width=10, height=20)
        s.add_all([img, Drop(sha256=img.sha256, source_name="P1_L.jpg", outcome="new", image=img, reason="x")])
    with engine.begin() as conn:  # foreign keys stay ON: no table rebuild may drop 'images'
        command.downgrade(alembic_config(connection=conn), "0001")
    assert current_revision(engine) == "0001" and "width" not in _cols(engine, "images")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM drops WHERE image_id IS NOT NULL").scalar() == 1
    init_db(engine)
    assert current_revision(engine) == head_revision() and _diff(engine) == []
    engine.dispose()


def test_revision_3_fills_the_audit_columns_as_the_repository_keeps_them(db_url):
    """Rows written at head (turnaround kept by add_result/add_report, reports out of order included), taken
    back to 0002 and upgraded again: the migration recomputes exactly the same exam, arrival and turnaround."""
    from datetime import date, datetime, timedelta, timezone

    from alembic import command

    from screening.db import repository as repo
    from screening.db import session_scope
    from screening.db.migrate import alembic_config

    t0 = datetime(2024, 3, 1, 8, tzinfo=timezone.utc)
    at = lambda s: t0 + timedelta(seconds=s, microseconds=s * 7)  # noqa: E731 - sub-second parts too
    engine = make_engine(db_url)
    init_db(engine)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        for e in range(4):
            exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, f"P{e}"), date(2024, 3, 1))
            for k, eye in enumerate("RL"):
                img = repo.add_image(s, sha256=f"{e}{k}".ljust(64, "0"), source_name="x.jpg", exam=exam, eye=eye,
                                     received_at=at(100 * e + k))
                repo.add_result(s, img, model_version="m", checkpoint_sha256="c" * 64, dr_grade=0, dr_probs=[1, 0, 0, 0, 0],
                                dme_grade=0, dme_probs=[1, 0, 0], referable_score=0.1, referable=False,
                                created_at=at(100 * e + 10 * k + 5))
            if e < 3:
                repo.add_report(s, exam, "v2.pdf", "m", version=2, created_at=at(100 * e + 50))
            if e == 1:
                repo.add_report(s, exam, "v1.pdf", "m", version=1, created_at=at(100 * e + 12))  # covers R only
    def snapshot():
        with factory() as s:  # closed again: an open read would hold PostgreSQL's lock against the ALTERs below
            return sorted((r.id, r.exam_id, r.received_at, r.turnaround_s) for r in s.scalars(select(Result)))

    kept = snapshot()
    turnarounds = [t for *_, t in kept]
    assert turnarounds.count(None) == 2 and 12.000084 in turnarounds  # exam 3 unreported; exam 1's R by v1
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0002")
    assert "turnaround_s" not in _cols(engine, "results")
    init_db(engine, backup=False)
    assert snapshot() == kept and _diff(engine) == []
    engine.dispose()

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


def _script():
    from alembic.script import ScriptDirectory

    from screening.db.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config())


def _below(revision: str) -> str:
    """The revision directly below ``revision``, read from the scripts: other branches may land migrations
    between two revisions of this one, and the tests must not care which."""
    down = _script().get_revision(revision).down_revision
    assert isinstance(down, str), (revision, down)
    return down


# the order revisions are applied in (branches merged later may put theirs between these): after hardening, the
# intake checks' columns (issue 13a), pages and the database identity (issue 12b), then the audit columns and the
# claims (issue 15, whose branch was merged after those)
ORDER = ["0001", "0002", "0007_device_original_masks", "0014_reviews", "0006_hardening", "0005_gradability_laterality",
         "0009_pages", "0010_db_identity", "0003_audit_columns_indexes", "0008_claims_sites", "0011_audit_tallies",
         "0015_check_models", "0016_report_referral_level", "0017_logout_ends_sessions",
         "0018_staff_refiling"]


def test_one_linear_chain_with_the_review_and_audit_revisions_in_order():
    """Every revision has one parent and one head ends the chain (the worker upgrades to 'head'); the revisions
    other tests name are in it, in the order their data depends on."""
    script = _script()
    assert len(script.get_heads()) == 1 and head_revision() == script.get_current_head()
    chain = [r.revision for r in script.walk_revisions("base", "heads")][::-1]
    assert all(isinstance(r.down_revision, (str, type(None))) for r in script.walk_revisions())
    assert [r for r in chain if r in ORDER] == ORDER and chain[-1] == head_revision()
    assert chain[:6] == ORDER[:6]  # the intake checks' columns right after hardening (issue 13a)


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
        assert img.device is None
        assert img.exam.patient.code == "P001"
        assert img.received_at.isoformat() == "2024-03-01T08:00:00+00:00"
        r = s.scalars(select(Result)).one()
        assert (r.dr_grade, r.dme_grade, r.referable, r.inference_ms, r.original_masks) == (3, 1, True, None, None)
        assert r.dr_probs == [0, 0, 0.1, 0.8, 0.1] and r.area_od == 0.03
        # 0003_audit_columns_indexes copied the image's exam and arrival time and measured the turnaround (08:00 -> report 08:02)
        assert (r.exam_id, r.received_at, r.turnaround_s) == (img.exam_id, img.received_at, 120.0)
        d = s.scalars(select(Drop)).one()
        assert (d.outcome, d.reason, d.reason_code, img.error_code) == ("new", None, None, None)
        # the new columns are writable
        img.width, img.height, d.reason, r.inference_ms = 2048, 1536, "ok", 41.0
        d.reason_code, img.error_code = "empty", "grading_failed"
        img.device, r.original_masks = "Topcon TRC-NW8", {"MA": "work/aa/mask_MA.tif"}
        s.commit()
    with make_session_factory(engine)() as s:
        img, r = s.scalars(select(Image)).one(), s.scalars(select(Result)).one()
        assert (img.device, r.original_masks) == ("Topcon TRC-NW8", {"MA": "work/aa/mask_MA.tif"})
    engine.dispose()


def test_new_database_is_created_and_stamped(db_url, tmp_path):
    engine = make_engine(db_url)
    assert init_db(engine) == head_revision()
    assert current_revision(engine) == head_revision()
    assert _diff(engine) == []
    assert len(_triggers(engine)) == 4  # reviews are append-only on a new database too
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
            names_a, names_b = (sorted(x["name"] or "" for x in getattr(insp, what)(table)) for insp in (a, b))
            assert names_a == names_b, (table, what)
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
    assert "device" not in _cols(engine, "images") and "original_masks" not in _cols(engine, "results")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM drops WHERE image_id IS NOT NULL").scalar() == 1
    init_db(engine)
    assert current_revision(engine) == head_revision() and _diff(engine) == []
    engine.dispose()


def test_audit_revision_fills_the_audit_columns_as_the_repository_keeps_them(db_url):
    """Rows written at head (turnaround kept by add_result/add_report, reports out of order included), taken
    back below revision 0003_audit_columns_indexes and upgraded again: the migration recomputes exactly the
    same exam, arrival and turnaround."""
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
        command.downgrade(alembic_config(connection=conn), _below("0003_audit_columns_indexes"))
    assert "turnaround_s" not in _cols(engine, "results")
    init_db(engine, backup=False)
    assert snapshot() == kept and _diff(engine) == []
    engine.dispose()


def _triggers(engine) -> set[str]:
    """The append-only triggers (SQLite triggers; PostgreSQL triggers calling a PL/pgSQL function)."""
    sql = ("SELECT name FROM sqlite_master WHERE type = 'trigger'" if engine.dialect.name == "sqlite"
           else "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
    with engine.connect() as conn:
        return {r[0] for r in conn.exec_driver_sql(sql)}


APPEND_ONLY_TRIGGERS = {"reviews_no_update", "reviews_no_delete", "review_eyes_no_update", "review_eyes_no_delete"}

# a clinic database just below the review tables: a visit, one photo graded, two draft reports
BEFORE_REVIEWS_ROWS = """
INSERT INTO patients (id, code, created_at) VALUES (1, 'P001', '2025-03-01 08:00:00.000000');
INSERT INTO exams (id, patient_id, exam_date, created_at) VALUES (1, 1, '2025-03-01', '2025-03-01 08:00:00.000000');
INSERT INTO images (id, exam_id, eye, sha256, source_name, stored_path, state, error, received_at, updated_at, width, height)
VALUES (1, 1, 'R', 'bb', 'P001_R_20250301.jpg', 'archive/bb.jpg', 'reported', NULL,
        '2025-03-01 08:00:00.000000', '2025-03-01 08:05:00.000000', 640, 480);
INSERT INTO results (id, image_id, model_version, checkpoint_sha256, dr_grade, dr_probs, dme_grade, dme_probs,
                     referable_score, referable, area_ma, area_he, area_ex, area_se, area_od,
                     mask_dir, overlay_path, dr_cam_path, dme_cam_path, device, inference_ms, created_at)
VALUES (1, 1, 'v2', 'cc', 2, '[0,0,1,0,0]', 0, '[1,0,0]', 0.8, TRUE, 0, 0, 0, 0, 0.02,
        NULL, NULL, NULL, NULL, 'cpu', 40.5, '2025-03-01 08:01:00.000000');
INSERT INTO reports (id, exam_id, version, path, model_version, created_at)
VALUES (1, 1, 1, 'reports/P001/2025-03-01/report_v1.pdf', 'v2', '2025-03-01 08:02:00.000000');
INSERT INTO reports (id, exam_id, version, path, model_version, created_at)
VALUES (2, 1, 2, 'reports/P001/2025-03-01/report_v2.pdf', 'v2', '2025-03-01 09:00:00.000000')
"""


def test_upgrade_from_below_the_reviews_keeps_rows_and_adds_append_only_reviews(db_url, tmp_path):
    """A clinic database at the revision below the review tables (reports included) gains them; its rows stay;
    a sign-off cannot be edited or deleted afterwards, on SQLite and on PostgreSQL."""
    engine = make_engine(db_url)
    upgrade(engine, _below("0014_reviews"))
    with engine.begin() as conn:
        for statement in BEFORE_REVIEWS_ROWS.split(";"):
            conn.exec_driver_sql(statement)
    assert "reviews" not in inspect(engine).get_table_names()

    assert init_db(engine) == head_revision()
    assert {"review_users", "reviews", "review_eyes"} <= set(inspect(engine).get_table_names())
    assert "review_id" in _cols(engine, "reports")
    assert _diff(engine) == []
    assert _triggers(engine) == APPEND_ONLY_TRIGGERS
    if engine.dialect.name == "sqlite":
        assert len(list(tmp_path.glob(f"screening.db.pre-{head_revision()}.*.bak"))) == 1
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, exam_id, version, path, model_version, created_at, review_id FROM reports ORDER BY id").all()
        assert [(*r[:5], str(r[5])[:19], r[6]) for r in rows] == [  # text on SQLite, a datetime on PostgreSQL
            (1, 1, 1, "reports/P001/2025-03-01/report_v1.pdf", "v2", "2025-03-01 08:02:00", None),
            (2, 1, 2, "reports/P001/2025-03-01/report_v2.pdf", "v2", "2025-03-01 09:00:00", None),
        ]
        assert tuple(conn.exec_driver_sql("SELECT dr_grade, inference_ms FROM results").one()) == (2, 40.5)
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []

    # the new tables work, and a review cannot be edited or deleted afterwards
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO reviews (id, exam_id, reviewer, source, outcome, referral, model_referral, reviewed_at, created_at) "
            "VALUES (1, 1, 'Dr A', 'cli', 'corrected', 'soon', 'routine', '2025-03-02 10:00:00', '2025-03-02 10:00:00')")
        conn.exec_driver_sql("INSERT INTO review_eyes (review_id, image_id, eye, gradable, dr_grade, dme_grade) VALUES (1, 1, 'R', TRUE, 3, 0)")
        conn.exec_driver_sql("UPDATE reports SET review_id = 1 WHERE id = 2")
    for sql in ("UPDATE reviews SET referral = 'routine'", "DELETE FROM review_eyes", "UPDATE review_eyes SET dr_grade = 2",
                "DELETE FROM reviews"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(sql)
    if engine.dialect.name == "postgresql":  # TRUNCATE skips row triggers: refused by a statement trigger
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE review_eyes")
    with pytest.raises(Exception, match="(?i)check constraint"), engine.begin() as conn:  # a gradable eye needs both grades
        conn.exec_driver_sql("INSERT INTO review_eyes (review_id, image_id, eye, gradable, dr_grade, dme_grade) VALUES (1, 1, 'L', TRUE, NULL, 0)")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM review_eyes").scalar() == 1
    engine.dispose()


def test_downgrade_below_the_reviews_keeps_reports(db_url):
    from alembic import command

    from screening.db.migrate import alembic_config

    below = _below("0014_reviews")
    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO patients (id, code, created_at) VALUES (1, 'P1', '2025-01-01 00:00:00')")
        conn.exec_driver_sql("INSERT INTO exams (id, patient_id, exam_date, created_at) VALUES (1, 1, '2025-01-01', '2025-01-01 00:00:00')")
        conn.exec_driver_sql("INSERT INTO reports (exam_id, version, path, model_version, created_at) VALUES (1, 1, 'r.pdf', 'v', '2025-01-01 00:00:00')")
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), below)
    assert current_revision(engine) == below and "review_id" not in _cols(engine, "reports")
    assert not {"reviews", "review_eyes", "review_users"} & set(inspect(engine).get_table_names()) and not _triggers(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT path FROM reports").scalar() == "r.pdf"
    init_db(engine)
    assert current_revision(engine) == head_revision() and _diff(engine) == []
    assert _triggers(engine) == APPEND_ONLY_TRIGGERS
    engine.dispose()


def test_the_database_identity_is_made_once_by_init_or_by_the_migration(make_db_url):
    """Revision 0010_db_identity: an existing database gets its random id from the migration, a new one from
    init_db; each database its own, kept by later runs; downgrading removes it (SQLite and PostgreSQL)."""
    from alembic import command

    from screening.db.migrate import alembic_config

    def token(engine) -> list[str]:
        with engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT token FROM database_identity")]

    old = make_engine(make_db_url("old"))
    upgrade(old, "0006_hardening")
    assert "database_identity" not in inspect(old).get_table_names()
    init_db(old)
    migrated = token(old)
    new = make_engine(make_db_url("new"))
    init_db(new)
    made = token(new)
    assert len(migrated) == len(made) == 1 and migrated != made
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in migrated + made)
    init_db(new)
    assert token(new) == made  # never made twice
    with old.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0006_hardening")
    assert "database_identity" not in inspect(old).get_table_names()
    init_db(old)
    assert len(token(old)) == 1 and _diff(old) == []
    old.dispose()
    new.dispose()


def test_pages_columns_come_and_go_with_revision_0009(db_url):
    """Revision 0009_pages: images.page and images.file_sha256 (indexed), NULL for the rows written before."""
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(db_url)
    upgrade(engine, "0006_hardening")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO images (id, sha256, source_name, state, received_at, updated_at) "
                             "VALUES (1, 'aa', 'P1_R.jpg', 'rejected', '2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    upgrade(engine, "0009_pages")
    assert {"page", "file_sha256"} <= _cols(engine, "images")
    assert "ix_images_file_sha256" in {i["name"] for i in inspect(engine).get_indexes("images")}
    with engine.connect() as conn:
        assert tuple(conn.exec_driver_sql("SELECT sha256, page, file_sha256 FROM images").one()) == ("aa", None, None)
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0006_hardening")
    assert not {"page", "file_sha256"} & _cols(engine, "images")
    init_db(engine)
    assert _diff(engine) == []
    engine.dispose()


def test_check_models_column_comes_and_goes_with_revision_0015(db_url):
    """Revision 0015_check_models: images.check_models, NULL (unknown) for the photos checked before it."""
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(db_url)
    upgrade(engine, "0011_audit_tallies")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO images (id, sha256, source_name, state, received_at, updated_at, gradable) "
                             "VALUES (1, 'aa', 'P1_R.jpg', 'done', '2025-01-01 00:00:00', '2025-01-01 00:00:00', "
                             f"{'true' if engine.dialect.name == 'postgresql' else 1})")
    upgrade(engine, "0015_check_models")
    assert "check_models" in _cols(engine, "images")
    with engine.connect() as conn:
        assert tuple(conn.exec_driver_sql("SELECT sha256, check_models FROM images").one()) == ("aa", None)
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0011_audit_tallies")
    assert "check_models" not in _cols(engine, "images")
    init_db(engine)
    assert _diff(engine) == []
    engine.dispose()


def test_upgrade_from_hardening_adds_the_intake_checks_as_unknown(db_url):
    engine = make_engine(db_url)
    upgrade(engine, "0006_hardening")
    assert "gradable" not in _cols(engine, "images")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO images (id, exam_id, eye, sha256, source_name, stored_path, state, error, received_at, updated_at, "
            "width, height) VALUES (1, NULL, 'R', 'bb', 'P2_R.jpg', NULL, 'reported', NULL, '2025-01-01 08:00:00.000000', "
            "'2025-01-01 08:00:00.000000', 1024, 768)")
    assert init_db(engine) == head_revision()
    assert {"gradable", "quality_reasons", "quality_scores", "eye_source", "predicted_eye", "eye_confidence",
            "eye_mismatch", "eye_note", "photo_dir", "stored_at"} <= _cols(engine, "images")
    assert _diff(engine) == []
    with make_session_factory(engine)() as s:
        img = s.scalars(select(Image)).one()
        assert (img.gradable, img.quality_reasons, img.eye_source, img.eye_mismatch, img.stored_at) == (None,) * 5
        img.gradable, img.quality_reasons, img.quality_scores = False, ["blurred"], {"blurred": 0.9}
        s.commit()
    with make_session_factory(engine)() as s:
        assert s.scalars(select(Image)).one().quality_reasons == ["blurred"]
    engine.dispose()


def test_referral_level_column_comes_and_goes_with_revision_0016(db_url):
    """Revision 0016_report_referral_level: reports.referral_level (the recommendation each version printed, which
    the audit counts visits by), NULL for the reports rendered before it: never guessed."""
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(db_url)
    upgrade(engine, "0015_check_models")
    assert "referral_level" not in _cols(engine, "reports")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO patients (id, code, created_at) VALUES (1, 'P1', '2025-01-01 00:00:00')")
        conn.exec_driver_sql("INSERT INTO exams (id, patient_id, exam_date, created_at) VALUES (1, 1, '2025-01-01', '2025-01-01 00:00:00')")
        conn.exec_driver_sql("INSERT INTO reports (exam_id, version, path, model_version, created_at) "
                             "VALUES (1, 1, 'r.pdf', 'v', '2025-01-01 00:00:00')")
    upgrade(engine, "0016_report_referral_level")
    assert "referral_level" in _cols(engine, "reports")
    with engine.begin() as conn:
        assert tuple(conn.exec_driver_sql("SELECT path, referral_level FROM reports").one()) == ("r.pdf", None)
        # the visit's standing version, filled from the rows: v1, level unknown, no grader; no photo screened
        standing = conn.exec_driver_sql("SELECT screened_at, standing_version, standing_level, standing_by_grader "
                                        "FROM exams").one()
        assert (standing[0], standing[1], standing[2], bool(standing[3])) == (None, 1, None, False)
        conn.exec_driver_sql("INSERT INTO reports (exam_id, version, path, model_version, created_at, referral_level) "
                             "VALUES (1, 2, 'r2.pdf', 'v', '2025-01-02 00:00:00', 'refer_ungradable')")
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0015_check_models")
    assert "referral_level" not in _cols(engine, "reports") and "standing_level" not in _cols(engine, "exams")
    with engine.connect() as conn:  # the reports stay, without the column
        assert [r[0] for r in conn.exec_driver_sql("SELECT path FROM reports ORDER BY version")] == ["r.pdf", "r2.pdf"]
    init_db(engine)
    assert current_revision(engine) == head_revision() and _diff(engine) == []
    engine.dispose()


def test_revision_0016_fills_the_standing_columns_with_the_statement_tallies_rebuilds_them_with():
    """The migration may not import screening.db.tallies, so it carries a copy of the statement: the two must stay
    the same, or an upgraded database and a rebuilt one would disagree."""
    from screening.db import tallies

    revision = _script().get_revision("0016_report_referral_level")
    assert revision is not None and revision.module.STANDING_SQL == tallies.STANDING_SQL
    assert revision.module.STANDING_COLUMNS == tuple(tallies.STANDING_COLUMNS)


def test_a_database_a_newer_version_upgraded_is_refused_saying_so(tmp_path):
    """An older copy of the software on a database a newer one upgraded met a revision it does not know: alembic's
    error came out as a traceback whose message was withheld (it may name a patient), so nothing said what to do."""
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'newer.db'}")
    init_db(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    with pytest.raises(SchemaError, match="revision '0099_from_the_future', which this version of the software does "
                                          "not know .* a newer version wrote it. .*nothing was changed"):
        init_db(engine)
    assert current_revision(engine) == "0099_from_the_future"
    engine.dispose()

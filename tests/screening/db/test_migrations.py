"""Schema migrations: an old (revision 0001) database is upgraded in place without losing rows."""

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


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "old.db"


HEAD = head_revision()  # read from the scripts: a later revision must not break these tests
PREVIOUS = "0007_device_original_masks"  # the head before the review tables
# the order revisions are applied in (branches merged later may put theirs between these)
ORDER = ["0001", "0002", "0007_device_original_masks", "0014_reviews", "0006_hardening", "0005_gradability_laterality",
         "0009_pages", "0010_db_identity"]


def test_the_revisions_form_one_chain_in_order():
    from alembic.script import ScriptDirectory

    from screening.db.migrate import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config())
    assert len(scripts.get_heads()) == 1  # one line of history: no merge revision needed
    chain = [rev.revision for rev in reversed(list(scripts.walk_revisions()))]
    assert [r for r in chain if r in ORDER] == ORDER and chain[-1] == HEAD
    assert chain[:6] == ORDER[:6]  # the intake checks' columns right after hardening (issue 13a)


def test_upgrade_from_revision_1_keeps_rows(db_path):
    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    assert "width" not in _cols(engine, "images") and "reason" not in _cols(engine, "drops")
    assert "inference_ms" not in _cols(engine, "results")

    # rows written by the old schema, with plain SQL as an old worker would have
    raw = sqlite3.connect(db_path)
    raw.executescript(
        """
        INSERT INTO patients (id, code, created_at) VALUES (1, 'P001', '2024-03-01 08:00:00.000000');
        INSERT INTO exams (id, patient_id, exam_date, created_at) VALUES (1, 1, '2024-03-01', '2024-03-01 08:00:00.000000');
        INSERT INTO images (id, exam_id, eye, sha256, source_name, stored_path, state, error, received_at, updated_at)
        VALUES (1, 1, 'L', 'aa', 'P001_L_20240301.jpg', 'archive/aa.jpg', 'reported', NULL,
                '2024-03-01 08:00:00.000000', '2024-03-01 08:05:00.000000');
        INSERT INTO drops (id, image_id, sha256, source_name, received_at, outcome)
        VALUES (1, 1, 'aa', 'P001_L_20240301.jpg', '2024-03-01 08:00:00.000000', 'new');
        INSERT INTO results (id, image_id, model_version, checkpoint_sha256, dr_grade, dr_probs, dme_grade, dme_probs,
                             referable_score, referable, area_ma, area_he, area_ex, area_se, area_od,
                             mask_dir, overlay_path, dr_cam_path, dme_cam_path, device, created_at)
        VALUES (1, 1, 'v1', 'cc', 3, '[0,0,0.1,0.8,0.1]', 1, '[0.2,0.7,0.1]', 0.93, 1, 0.01, 0.02, 0.0, 0.0, 0.03,
                'work/1', 'work/1/o.png', 'work/1/dr.png', 'work/1/dme.png', 'cpu', '2024-03-01 08:01:00.000000');
        INSERT INTO reports (id, exam_id, version, path, model_version, created_at)
        VALUES (1, 1, 1, 'reports/P001.pdf', 'v1', '2024-03-01 08:02:00.000000');
        INSERT INTO events (id, image_id, drop_id, kind, message, created_at)
        VALUES (1, 1, 1, 'state', 'received -> done', '2024-03-01 08:01:00.000000');
        """
    )
    raw.commit()
    raw.close()

    assert init_db(engine) == HEAD
    assert current_revision(engine) == HEAD
    assert {"width", "height"} <= _cols(engine, "images")
    assert "reason" in _cols(engine, "drops") and "inference_ms" in _cols(engine, "results")
    assert _diff(engine) == []
    backups = list(db_path.parent.glob(f"old.db.pre-{HEAD}.*.bak"))
    assert len(backups) == 1
    with sqlite3.connect(backups[0]) as b:
        assert b.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
        assert b.execute("SELECT count(*) FROM results").fetchone() == (1,)

    with make_session_factory(engine)() as s:
        img = s.scalars(select(Image)).one()
        assert (img.source_name, img.state, img.eye, img.width, img.height) == ("P001_L_20240301.jpg", "reported", "L", None, None)
        assert img.device is None
        assert img.exam.patient.code == "P001"
        assert img.received_at.isoformat() == "2024-03-01T08:00:00+00:00"
        r = s.scalars(select(Result)).one()
        assert (r.dr_grade, r.dme_grade, r.referable, r.inference_ms, r.original_masks) == (3, 1, True, None, None)
        assert r.dr_probs == [0, 0, 0.1, 0.8, 0.1] and r.area_od == 0.03
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


def test_new_database_is_created_and_stamped(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    assert init_db(engine) == head_revision()
    assert current_revision(engine) == head_revision()
    assert _diff(engine) == []
    assert len(_triggers(engine)) == 4  # reviews are append-only on a new database too
    assert not list(tmp_path.glob("*.bak"))
    assert init_db(engine) == head_revision()  # idempotent, no backup when nothing to do
    assert not list(tmp_path.glob("*.bak"))


def test_migrations_from_empty_match_models(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'chain.db'}")
    upgrade(engine, "head")
    assert _diff(engine) == []
    via_models = make_engine(f"sqlite:///{tmp_path / 'models.db'}")
    init_db(via_models)
    a, b = inspect(engine), inspect(via_models)
    for table in Base.metadata.tables:
        # column order differs (ALTER TABLE ADD COLUMN appends); everything else must be the same
        assert {c["name"] for c in a.get_columns(table)} == {c["name"] for c in b.get_columns(table)}, table
        for what in ("get_indexes", "get_unique_constraints", "get_check_constraints", "get_foreign_keys"):
            names_a, names_b = (sorted(x["name"] or "" for x in getattr(insp, what)(table)) for insp in (a, b))
            assert names_a == names_b, (table, what)


def test_unknown_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE something (id INTEGER)")
    with pytest.raises(SchemaError, match="alembic_version"):
        init_db(make_engine(f"sqlite:///{path}"))


def test_downgrade_to_revision_1_keeps_rows(tmp_path):
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'down.db'}")
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


def _triggers(engine) -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'")}


def test_upgrade_from_the_previous_head_keeps_rows_and_adds_append_only_reviews(db_path):
    """A clinic database at the revision before (reports included) gains the review tables; its rows stay."""
    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine, PREVIOUS)
    raw = sqlite3.connect(db_path)
    raw.executescript(
        """
        INSERT INTO patients (id, code, created_at) VALUES (1, 'P001', '2025-03-01 08:00:00.000000');
        INSERT INTO exams (id, patient_id, exam_date, created_at) VALUES (1, 1, '2025-03-01', '2025-03-01 08:00:00.000000');
        INSERT INTO images (id, exam_id, eye, sha256, source_name, stored_path, state, error, received_at, updated_at, width, height)
        VALUES (1, 1, 'R', 'bb', 'P001_R_20250301.jpg', 'archive/bb.jpg', 'reported', NULL,
                '2025-03-01 08:00:00.000000', '2025-03-01 08:05:00.000000', 640, 480);
        INSERT INTO results (id, image_id, model_version, checkpoint_sha256, dr_grade, dr_probs, dme_grade, dme_probs,
                             referable_score, referable, area_ma, area_he, area_ex, area_se, area_od,
                             mask_dir, overlay_path, dr_cam_path, dme_cam_path, device, inference_ms, created_at)
        VALUES (1, 1, 'v2', 'cc', 2, '[0,0,1,0,0]', 0, '[1,0,0]', 0.8, 1, 0, 0, 0, 0, 0.02,
                NULL, NULL, NULL, NULL, 'cpu', 40.5, '2025-03-01 08:01:00.000000');
        INSERT INTO reports (id, exam_id, version, path, model_version, created_at)
        VALUES (1, 1, 1, 'reports/P001/2025-03-01/report_v1.pdf', 'v2', '2025-03-01 08:02:00.000000');
        INSERT INTO reports (id, exam_id, version, path, model_version, created_at)
        VALUES (2, 1, 2, 'reports/P001/2025-03-01/report_v2.pdf', 'v2', '2025-03-01 09:00:00.000000');
        """
    )
    raw.commit()
    raw.close()
    assert "reviews" not in inspect(engine).get_table_names()

    assert init_db(engine) == HEAD
    assert {"review_users", "reviews", "review_eyes"} <= set(inspect(engine).get_table_names())
    assert "review_id" in _cols(engine, "reports")
    assert _diff(engine) == []
    assert _triggers(engine) == {"reviews_no_update", "reviews_no_delete", "review_eyes_no_update", "review_eyes_no_delete"}
    assert len(list(db_path.parent.glob(f"old.db.pre-{HEAD}.*.bak"))) == 1
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, exam_id, version, path, model_version, created_at, review_id FROM reports ORDER BY id").all()
        assert [tuple(r) for r in rows] == [
            (1, 1, 1, "reports/P001/2025-03-01/report_v1.pdf", "v2", "2025-03-01 08:02:00.000000", None),
            (2, 1, 2, "reports/P001/2025-03-01/report_v2.pdf", "v2", "2025-03-01 09:00:00.000000", None),
        ]
        assert conn.exec_driver_sql("SELECT dr_grade, inference_ms FROM results").one() == (2, 40.5)
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []

    # the new tables work, and a review cannot be edited or deleted afterwards
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO reviews (id, exam_id, reviewer, source, outcome, referral, model_referral, reviewed_at, created_at) "
            "VALUES (1, 1, 'Dr A', 'cli', 'corrected', 'soon', 'routine', '2025-03-02 10:00:00', '2025-03-02 10:00:00')")
        conn.exec_driver_sql("INSERT INTO review_eyes (review_id, image_id, eye, gradable, dr_grade, dme_grade) VALUES (1, 1, 'R', 1, 3, 0)")
        conn.exec_driver_sql("UPDATE reports SET review_id = 1 WHERE id = 2")
    for sql in ("UPDATE reviews SET referral = 'routine'", "DELETE FROM review_eyes", "UPDATE review_eyes SET dr_grade = 2"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(sql)
    with pytest.raises(Exception, match="CHECK constraint"), engine.begin() as conn:  # a gradable eye needs both grades
        conn.exec_driver_sql("INSERT INTO review_eyes (review_id, image_id, eye, gradable, dr_grade, dme_grade) VALUES (1, 1, 'L', 1, NULL, 0)")
    engine.dispose()


def test_downgrade_to_the_previous_head_keeps_reports(tmp_path):
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'down3.db'}")
    init_db(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO patients (id, code, created_at) VALUES (1, 'P1', '2025-01-01 00:00:00')")
        conn.exec_driver_sql("INSERT INTO exams (id, patient_id, exam_date, created_at) VALUES (1, 1, '2025-01-01', '2025-01-01 00:00:00')")
        conn.exec_driver_sql("INSERT INTO reports (exam_id, version, path, model_version, created_at) VALUES (1, 1, 'r.pdf', 'v', '2025-01-01 00:00:00')")
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), PREVIOUS)
    assert current_revision(engine) == PREVIOUS and "review_id" not in _cols(engine, "reports")
    assert not {"reviews", "review_eyes", "review_users"} & set(inspect(engine).get_table_names()) and not _triggers(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT path FROM reports").scalar() == "r.pdf"
    init_db(engine)
    assert current_revision(engine) == head_revision() and _diff(engine) == []
    assert len(_triggers(engine)) == 4


def test_the_database_identity_is_made_once_by_init_or_by_the_migration(tmp_path):
    """Revision 0010_db_identity: an existing database gets its random id from the migration, a new one from
    init_db; each database its own, kept by later runs; downgrading removes it."""
    from alembic import command

    from screening.db.migrate import alembic_config

    def token(engine) -> list[str]:
        with engine.connect() as conn:
            return [r[0] for r in conn.exec_driver_sql("SELECT token FROM database_identity")]

    old = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(old, "0006_hardening")
    assert "database_identity" not in inspect(old).get_table_names()
    init_db(old)
    migrated = token(old)
    new = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
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


def test_pages_columns_come_and_go_with_revision_0009(tmp_path):
    """Revision 0009_pages: images.page and images.file_sha256 (indexed), NULL for the rows written before."""
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'pages.db'}")
    upgrade(engine, "0006_hardening")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO images (id, sha256, source_name, state, received_at, updated_at) "
                             "VALUES (1, 'aa', 'P1_R.jpg', 'rejected', '2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    upgrade(engine, "0009_pages")
    assert {"page", "file_sha256"} <= _cols(engine, "images")
    assert "ix_images_file_sha256" in {i["name"] for i in inspect(engine).get_indexes("images")}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT sha256, page, file_sha256 FROM images").one() == ("aa", None, None)
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0006_hardening")
    assert not {"page", "file_sha256"} & _cols(engine, "images")
    init_db(engine)
    assert _diff(engine) == []


def test_upgrade_from_hardening_adds_the_intake_checks_as_unknown(db_path):
    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine, "0006_hardening")
    assert "gradable" not in _cols(engine, "images")
    raw = sqlite3.connect(db_path)
    raw.executescript(
        """
        INSERT INTO images (id, exam_id, eye, sha256, source_name, stored_path, state, error, received_at, updated_at,
                            width, height)
        VALUES (1, NULL, 'R', 'bb', 'P2_R.jpg', NULL, 'reported', NULL, '2025-01-01 08:00:00.000000',
                '2025-01-01 08:00:00.000000', 1024, 768);
        """
    )
    raw.commit()
    raw.close()
    assert init_db(engine) == HEAD
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

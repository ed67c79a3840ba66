"""Models and engine/session helpers, on a temporary SQLite file and a PostgreSQL database (``db_url``)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Exam, Image, Patient, Report, Result


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    init_db(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def factory(engine):
    return make_session_factory(engine)


def _result(image: Image, **kw) -> Result:
    values = dict(
        image=image, model_version="m1", checkpoint_sha256="c" * 64, dr_grade=2, dr_probs=[0.1, 0.1, 0.6, 0.1, 0.1],
        dme_grade=0, dme_probs=[0.9, 0.05, 0.05], referable_score=0.7, referable=True,
        received_at=datetime(2024, 1, 1, tzinfo=timezone.utc),  # repository.add_result copies the image's
    )
    values.update(kw)
    return Result(**values)


def test_sqlite_pragmas_on_every_connection(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'screening.db'}")
    init_db(engine)
    with engine.connect() as c1, engine.connect() as c2:
        for conn in (c1, c2):
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_memory_database_works_without_wal():
    eng = make_engine("sqlite://", busy_timeout_ms=1234)
    init_db(eng)
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "memory"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_session_scope_commits_and_rolls_back(factory):
    with session_scope(factory) as s:
        s.add(Patient(code="P1"))
    with pytest.raises(RuntimeError):
        with session_scope(factory) as s:
            s.add(Patient(code="P2"))
            s.flush()
            raise RuntimeError("boom")
    with session_scope(factory) as s:
        assert s.scalars(select(Patient.code)).all() == ["P1"]


@pytest.mark.parametrize(
    "make",
    [
        lambda s: [Patient(code="A"), Patient(code="A")],
        lambda s: [Exam(patient=(p := Patient(code="A")), exam_date=date(2024, 1, 1)), Exam(patient=p, exam_date=date(2024, 1, 1))],
        lambda s: [Image(sha256="a" * 64, source_name="x.jpg"), Image(sha256="a" * 64, source_name="y.jpg")],
        lambda s: [
            _result(img := Image(sha256="b" * 64, source_name="x.jpg")),
            _result(img),
        ],
        lambda s: [
            Report(exam=(e := Exam(patient=Patient(code="B"), exam_date=date(2024, 1, 1))), version=1, path="a.pdf", model_version="m"),
            Report(exam=e, version=1, path="b.pdf", model_version="m"),
        ],
    ],
    ids=["patient.code", "exam(patient,date)", "image.sha256", "result.image_id", "report(exam,version)"],
)
def test_uniqueness_constraints(factory, make):
    with factory() as s:
        s.add_all(make(s))
        with pytest.raises(IntegrityError, match="(?i)unique constraint"):
            s.flush()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image(sha256="c" * 64, source_name="x", state="processing"),
        lambda: Image(sha256="c" * 64, source_name="x", eye="X"),  # one character: PostgreSQL checks VARCHAR(1) first
        lambda: _result(Image(sha256="d" * 64, source_name="x"), dr_grade=5),
        lambda: _result(Image(sha256="d" * 64, source_name="x"), dme_grade=3),
        lambda: _result(Image(sha256="d" * 64, source_name="x"), area_he=1.5),
    ],
    ids=["state", "eye", "dr_grade", "dme_grade", "area"],
)
def test_check_constraints(factory, make):
    with factory() as s:
        s.add(make())
        with pytest.raises(IntegrityError, match="(?i)check constraint"):
            s.flush()


def test_foreign_keys_enforced(factory):
    with factory() as s:
        s.add(Image(sha256="e" * 64, source_name="x", exam_id=999))
        with pytest.raises(IntegrityError, match="(?i)foreign key constraint"):
            s.flush()


def test_timestamps_are_utc(factory):
    ist = timezone(timedelta(hours=5, minutes=30))
    with session_scope(factory) as s:
        img = Image(sha256="f" * 64, source_name="P1_L_20240101.jpg", received_at=datetime(2024, 1, 1, 10, 0, tzinfo=ist))
        s.add(img)
    with factory() as s:
        img = s.scalars(select(Image)).one()
        assert img.received_at == datetime(2024, 1, 1, 4, 30, tzinfo=timezone.utc)
        assert img.received_at.tzinfo == timezone.utc
        assert img.updated_at.tzinfo == timezone.utc and img.state == "received"
        stored = s.execute(text("SELECT received_at FROM images")).scalar()  # text on SQLite, naive datetime on PostgreSQL
        assert str(stored).startswith("2024-01-01 04:30:00")


def test_naive_datetime_refused(factory):
    with factory() as s:
        s.add(Image(sha256="9" * 64, source_name="x", received_at=datetime(2024, 1, 1)))
        with pytest.raises(StatementError, match="naive datetime"):
            s.flush()


def test_result_json_and_areas_roundtrip(factory):
    with session_scope(factory) as s:
        s.add(_result(Image(sha256="1" * 64, source_name="x"), area_ma=0.001, area_od=0.02, inference_ms=12.5))
    with factory() as s:
        r = s.scalars(select(Result)).one()
        assert r.dr_probs == [0.1, 0.1, 0.6, 0.1, 0.1] and r.dme_probs == [0.9, 0.05, 0.05]
        assert r.areas == {"ma": 0.001, "he": 0.0, "ex": 0.0, "se": 0.0, "od": 0.02}
        assert r.referable is True and r.inference_ms == 12.5
        assert r.image.result is r

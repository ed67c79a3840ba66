"""Review fixtures: visits seeded straight into the database (fast, hand-checkable numbers), and a real
worker run over synthetic photos (results, pictures and draft PDFs on disk) for the reviewed report."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from screening.config import ScreeningSettings
from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db import repository as repo
from screening.db.models import Exam

from ..conftest import write_fundus

PROJECT = Path(__file__).resolve().parents[3]
TEMPLATES = PROJECT / "templates"
T0 = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc)
_n = iter(range(1, 100_000))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def seed_visit(
    s: Session, code: str, eyes: dict[str, tuple[int, int, bool]], *, day: date = date(2025, 3, 3),
    model_version: str = "v1", received: datetime = T0, report_at: datetime | None = None,
) -> Exam:
    """A visit whose eyes have results (``eye -> (dr, dme, referable)``), and a draft report when ``report_at``."""
    exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, code), day)
    for eye, (dr, dme, referable) in eyes.items():
        sha = f"{next(_n):064x}"
        img = repo.add_image(s, sha256=sha, source_name=f"{code}_{eye}.jpg", exam=exam, eye=eye, received_at=received)
        dr_probs = [0.05] * 5
        dr_probs[dr] = 0.8
        dme_probs = [0.1] * 3
        dme_probs[dme] = 0.8
        repo.add_result(s, img, model_version=model_version, checkpoint_sha256="c" * 64, dr_grade=dr, dr_probs=dr_probs,
                        dme_grade=dme, dme_probs=dme_probs, referable_score=0.9 if referable else 0.1, referable=referable,
                        created_at=received + timedelta(seconds=30))
        repo.set_state(s, img, "done")
    if report_at is not None:
        repo.add_report(s, exam, f"reports/{code}/v1.pdf", model_version, created_at=report_at)
    return exam


@pytest.fixture
def factory(tmp_path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'review.db'}")
    init_db(engine)
    yield make_session_factory(engine)
    engine.dispose()


@dataclasses.dataclass
class Worked:
    settings: ScreeningSettings
    factory: sessionmaker[Session]
    exams: dict[str, int]  # patient code -> exam id


def run_worker(settings: ScreeningSettings, photos: dict[str, int]) -> Worked:
    """Grade ``photos`` (file name -> synthetic seed) with the tiny checkpoint; reports rendered inline."""
    from screening.inference import Predictor
    from screening.pipeline import Worker

    settings = settings.model_copy(update={"report_renderer": "inline"})
    for name, seed in photos.items():
        write_fundus(settings.inbox / name, seed=seed)
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    with Worker(settings, Predictor(settings.checkpoint, "cpu", 1), factory, TEMPLATES) as worker:
        out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.failed) == (len(photos), 0)
    with session_scope(factory) as s:
        from sqlalchemy import select

        from screening.db.models import Patient

        exams = {p.code: p.exams[0].id for p in s.scalars(select(Patient))}
    return Worked(settings, factory, exams)


@pytest.fixture
def worked(settings) -> Worked:
    """P1: both eyes, P2: right eye only, graded and reported by the real worker."""
    return run_worker(settings, {"P1_R.jpg": 1, "P1_L.jpg": 2, "P2_R.jpg": 3})

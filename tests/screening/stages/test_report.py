"""The report stage alone: the version is decided in one place, from the database, the reports on their way
and the files on disk; the result says which version it wrote."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db import repository as repo
from screening.db.models import Exam
from screening.inference import Predictor
from screening.renderer import RenderResult
from screening.report import report_folder
from screening.stages import ReportFailed, ReportStage, ReportWritten

PROJECT = Path(__file__).resolve().parents[3]


class Keep:
    """A renderer that keeps its jobs; the test answers for it."""

    def __init__(self) -> None:
        self.jobs, self.done = [], []

    def start(self) -> None:
        pass

    def submit(self, job) -> None:
        self.jobs.append(job)

    def results(self, timeout: float = 0.0) -> list:
        done, self.done = self.done, []
        return done

    @property
    def pending(self) -> int:
        return len(self.jobs)

    def close(self, timeout: float = 30.0) -> None:
        pass


@pytest.fixture
def stage(settings):
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    return ReportStage(settings, factory, Predictor(settings.checkpoint, "cpu", 1), Keep(), PROJECT / "templates")


def _graded_exam(factory) -> int:
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P7"), date(2025, 3, 1))
        image = repo.add_image(s, sha256="a" * 64, source_name="P7_R.jpg", exam=exam, eye="R")
        repo.add_result(s, image, model_version="m", checkpoint_sha256="c" * 64, dr_grade=0, dr_probs=[1, 0, 0, 0, 0],
                        dme_grade=0, dme_probs=[1, 0, 0], referable_score=0.1, referable=False)
        repo.set_state(s, image, "done")
        return exam.id


def test_version_counts_the_database_the_queue_and_the_disk(stage, settings):
    exam_id = _graded_exam(stage.factory)
    folder = report_folder(settings.reports, "P7", date(2025, 3, 1))
    folder.mkdir(parents=True)
    (folder / "report_v3.pdf").write_bytes(b"%PDF published before a crash, never recorded")
    assert stage.submit() == 1
    assert stage.submit([exam_id]) == 1  # a second one while the first is on its way
    assert [j.ctx.report_version for j in stage.renderer.jobs] == [4, 5]
    first, second = stage.renderer.jobs
    stage.renderer.done = [RenderResult(first.key, 4, folder / "report_v4.pdf"), RenderResult(second.key, 5, None, "disk full")]
    outcomes = stage.collect()
    assert outcomes == [ReportWritten(exam_id, 4, folder / "report_v4.pdf"), ReportFailed(exam_id, 5, "disk full")]
    with session_scope(stage.factory) as s:
        assert [r.version for r in s.get(Exam, exam_id).reports] == [4]
        assert repo.next_report_version(s, exam_id) == 5
    assert stage.in_flight == {}

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


def test_start_up_removes_unrecorded_pdfs_and_renders_a_missing_one_again(stage, settings):
    """A renderer that finished after its worker died left report_vN.pdf files no row records (issue 12)."""
    from sqlalchemy import select

    from screening.db.models import Event

    exam_id = _graded_exam(stage.factory)
    folder = report_folder(settings.reports, "P7", date(2025, 3, 1))
    folder.mkdir(parents=True)
    (folder / "report_v1.pdf").write_bytes(b"%PDF v1, recorded")
    with session_scope(stage.factory) as s:
        repo.add_report(s, s.get(Exam, exam_id), folder / "report_v1.pdf", "m", version=1)
    (folder / "report_v2.pdf").write_bytes(b"%PDF v2, published after the worker died")
    (folder / "latest.pdf").write_bytes(b"%PDF v2, published after the worker died")
    (settings.reports / "notes.pdf").write_bytes(b"someone else's file")  # not a report folder: left alone
    assert stage.reconcile() == []
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pdf", "report_v1.pdf"]
    assert (folder / "latest.pdf").read_bytes() == b"%PDF v1, recorded" and (settings.reports / "notes.pdf").exists()
    (folder / "report_v1.pdf").unlink()  # a recorded report deleted by hand: counted, and the visit made again
    assert stage.reconcile() == [exam_id]
    assert not (folder / "latest.pdf").exists() or (folder / "latest.pdf").read_bytes() != b"%PDF v2, published after the worker died"
    with session_scope(stage.factory) as s:
        codes = [e.code for e in s.scalars(select(Event).where(Event.kind == "reconcile"))]
    assert codes == ["orphan_report_removed", "report_file_missing"]
@pytest.mark.parametrize("rule, result_grade", [("worst", 3), ("latest", 1)])
def test_every_field_of_an_eye_goes_into_the_report_and_the_rule_picks_the_result(settings, rule, result_grade):
    stage = ReportStage(settings.model_copy(update={"eye_result": rule}), *_parts(settings), PROJECT / "templates")
    with session_scope(stage.factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P8"), date(2025, 3, 2))
        for k, (eye, grade) in enumerate([("R", 0), ("R", 3), ("L", 0), ("R", 1)]):
            image = repo.add_image(s, sha256=f"{k:064x}", source_name=f"P8_{eye}_{k}.jpg", exam=exam, eye=eye)
            probs = [0.0] * 5
            probs[grade] = 1.0
            repo.add_result(s, image, model_version="m", checkpoint_sha256="c" * 64, dr_grade=grade, dr_probs=probs,
                            dme_grade=0, dme_probs=[1, 0, 0], referable_score=0.1, referable=False,
                            mask_dir=f"work/{k}", original_masks={"MA": f"work/{k}/mask_MA.tif"} if k == 1 else None)
            repo.set_state(s, image, "done")
        exam_id = exam.id
    assert stage.submit([exam_id]) == 1
    ctx = stage.renderer.jobs[0].ctx
    assert [f.source_name for f in ctx.fields("R")] == ["P8_R_0.jpg", "P8_R_1.jpg", "P8_R_3.jpg"]  # arrival order
    assert [f.source_name for f in ctx.fields("L")] == ["P8_L_2.jpg"]
    assert ctx.eye_result_rule == rule and ctx.eye("R").dr_grade == result_grade
    assert [f.mask_folder for f in ctx.fields("R")] == [None, Path("work/1"), None]  # only where TIFFs were made


def _parts(settings):
    engine = make_engine(settings.database)
    init_db(engine)
    return make_session_factory(engine), Predictor(settings.checkpoint, "cpu", 1), Keep()


# --------------------------------------------------------------------- several workers (issue 15), on each database

@pytest.fixture
def two_workers(settings_db):
    """Two report stages as two workers have them: one database, each its own claims and renderer. Their claims
    are closed afterwards: a claim left held keeps its heartbeat thread renewing it for the rest of the session."""
    from screening.claims import Claimer

    engine = make_engine(settings_db.database)
    init_db(engine)
    factory = make_session_factory(engine)
    predictor = Predictor(settings_db.checkpoint, "cpu", 1)
    claimers = [Claimer(factory, f"site-{n}", 30.0) for n in "ab"]
    stages = [ReportStage(settings_db, factory, predictor, Keep(), PROJECT / "templates", claims=c) for c in claimers]
    yield factory, stages
    for claimer in claimers:
        claimer.close()
    engine.dispose()


def _eye(factory, exam_id: int, eye: str, n: int) -> int:
    """One more graded photo of the visit, as the store stage leaves it (done, result stored)."""
    with session_scope(factory) as s:
        image = repo.add_image(s, sha256=f"{n:064x}", source_name=f"P5_{eye}.jpg", exam=s.get(Exam, exam_id), eye=eye)
        repo.add_result(s, image, model_version="m", checkpoint_sha256="c" * 64, dr_grade=n % 5, dr_probs=[0.2] * 5,
                        dme_grade=0, dme_probs=[1, 0, 0], referable_score=0.1, referable=False)
        repo.set_state(s, image, "done")
        return image.id


def _finish(stage, version_folder: Path) -> list:
    """The renderer of ``stage`` finishes every job it holds (writing the PDF); the stage records them."""
    for job in stage.renderer.jobs:
        path = version_folder / f"report_v{job.ctx.report_version}.pdf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%PDF")
        stage.renderer.done.append(RenderResult(job.key, job.ctx.report_version, path))
    stage.renderer.jobs = []
    return stage.collect()


def test_two_eyes_stored_by_two_workers_make_versions_1_and_2_in_order(two_workers, settings_db):
    """Worker a reports the right eye; worker b stores the left eye meanwhile and must wait for a's version,
    then makes version 2 with both eyes: never two version 1s, never a gap."""
    factory, (a, b) = two_workers
    with session_scope(factory) as s:
        exam_id = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P5"), date(2025, 3, 4)).id
    folder = report_folder(settings_db.reports, "P5", date(2025, 3, 4))
    _eye(factory, exam_id, "R", 1)
    assert a.submit([exam_id]) == 1
    _eye(factory, exam_id, "L", 2)
    assert b.submit([exam_id]) == 0 and b.waiting == {exam_id} and b.busy  # a holds the visit
    assert b.collect() == [] and b.waiting == {exam_id}
    assert [o.version for o in _finish(a, folder)] == [1]  # recorded, then the visit's claim released
    b._waiting_retry_at = 0.0
    b.collect()
    assert b.waiting == frozenset() and [j.ctx.report_version for j in b.renderer.jobs] == [2]
    assert {f.eye for f in b.renderer.jobs[0].ctx.eyes} == {"R", "L"}
    assert [o.version for o in _finish(b, folder)] == [2]
    with session_scope(factory) as s:
        assert [r.version for r in s.get(Exam, exam_id).reports] == [1, 2]
        assert {i.state for i in s.get(Exam, exam_id).images} == {"reported"}


def test_a_visit_another_worker_covered_meanwhile_is_not_rendered_again(two_workers, settings_db):
    factory, (a, b) = two_workers
    with session_scope(factory) as s:
        exam_id = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P5"), date(2025, 3, 4)).id
    _eye(factory, exam_id, "R", 1)
    _eye(factory, exam_id, "L", 2)
    assert a.submit([exam_id]) == 1 and b.submit([exam_id]) == 0  # both stored an eye; a's version has both
    _finish(a, report_folder(settings_db.reports, "P5", date(2025, 3, 4)))
    b._waiting_retry_at = 0.0
    assert b.collect() == [] and not b.busy and b.renderer.jobs == []
    with session_scope(factory) as s:
        assert [r.version for r in s.get(Exam, exam_id).reports] == [1]


def test_a_visit_claimed_afresh_drops_a_dead_workers_unrecorded_version(two_workers, settings_db):
    """A worker killed after its renderer published v2 but before recording it: the next worker to claim the
    visit removes that file and makes v2 itself, so the recorded versions have no gap."""
    factory, (a, _) = two_workers
    exam_id = _graded_exam(factory)
    folder = report_folder(settings_db.reports, "P7", date(2025, 3, 1))
    folder.mkdir(parents=True)
    (folder / "report_v1.pdf").write_bytes(b"%PDF v1")
    with session_scope(factory) as s:
        repo.add_report(s, s.get(Exam, exam_id), folder / "report_v1.pdf", "m", version=1)
    (folder / "report_v2.pdf").write_bytes(b"%PDF v2 of a dead worker")
    (folder / "latest.pdf").write_bytes(b"%PDF v2 of a dead worker")
    assert a.submit([exam_id]) == 1
    assert [j.ctx.report_version for j in a.renderer.jobs] == [2]
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pdf", "report_v1.pdf"]
    assert (folder / "latest.pdf").read_bytes() == b"%PDF v1"


def test_start_up_makes_a_signed_off_visits_missing_report_again_as_its_reviewed_version(worked):
    """A signed-off visit's PDF deleted by hand: start-up makes the grader's version again, not a model draft that
    would stand in its place (on the PDF staff open and in the audit's standing recommendation)."""
    from pypdf import PdfReader

    from screening.db import reviews as rrepo
    from screening.review import sign_off
    from screening.review.reviewed_report import ModelCatalog, render_reviewed_report

    signed, unsigned = worked.exams["P1"], worked.exams["P2"]
    with session_scope(worked.factory) as s:
        review_id = sign_off(s, signed, reviewer="Dr A. Grey", source="cli", comment="seen").id
    reviewed = render_reviewed_report(worked.factory, signed, catalog=ModelCatalog.from_settings(worked.settings),
                                      clinic_name="North Clinic", templates_dir=PROJECT / "templates",
                                      reports_dir=worked.settings.reports, retries=1)
    Path(reviewed.path).unlink()
    with session_scope(worked.factory) as s:
        [draft] = rrepo.exam_reports(s, unsigned)
    Path(draft.path).unlink()

    stage = ReportStage(worked.settings, worked.factory, Predictor(worked.settings.checkpoint, "cpu", 1), Keep(),
                        PROJECT / "templates")
    assert stage.reconcile() == [unsigned]  # only the visit without a sign-off gets the model's version
    with session_scope(worked.factory) as s:
        latest = rrepo.exam_reports(s, signed)[0]
        exam = s.get(Exam, signed)
        assert (latest.version, latest.review_id) == (reviewed.version + 1, review_id)
        assert (exam.standing_version, exam.standing_by_grader) == (latest.version, True)
    text = " ".join((p.extract_text() or "") for p in PdfReader(latest.path).pages).lower()
    assert "reviewed by dr a. grey" in " ".join(text.split())
    assert (Path(latest.path).parent / "latest.pdf").read_bytes() == Path(latest.path).read_bytes()


def test_a_reports_folder_moved_in_the_settings_does_not_render_every_visit_again(stage, settings, tmp_path):
    """The recorded PDFs are where they were written; only a report gone from both places is made again."""
    exam_id = _graded_exam(stage.factory)
    old = tmp_path / "old-reports" / "P7" / "2025-03-01"
    old.mkdir(parents=True)
    (old / "report_v1.pdf").write_bytes(b"%PDF v1, in the folder the settings named before")
    with session_scope(stage.factory) as s:
        repo.add_report(s, s.get(Exam, exam_id), old / "report_v1.pdf", "m", version=1)
    assert stage.reconcile() == []  # settings.reports is another folder now: the recorded file is still there
    (old / "report_v1.pdf").unlink()
    assert stage.reconcile() == [exam_id]


def _reconciled_render_failed(stage, settings) -> tuple[int, Path]:
    """A visit whose photos are all reported and whose recorded v1 is not on disk: reconcile hands it over, and its
    render fails (disk full). Returns the exam and its report folder."""
    exam_id = _graded_exam(stage.factory)
    folder = report_folder(settings.reports, "P7", date(2025, 3, 1))
    with session_scope(stage.factory) as s:
        repo.add_report(s, s.get(Exam, exam_id), folder / "report_v1.pdf", "m", version=1)  # never on disk
        for image in s.get(Exam, exam_id).images:
            repo.set_state(s, image, "reported")
    assert stage.reconcile() == [exam_id]
    assert stage.submit([exam_id]) == 1
    job = stage.renderer.jobs[-1]
    stage.renderer.done = [RenderResult(job.key, job.ctx.report_version, None, "No space left on device")]
    assert stage.collect() == [ReportFailed(exam_id, 2, "No space left on device")]
    return exam_id, folder


def test_a_failed_render_of_a_reconciled_visit_is_tried_again_by_the_catch_up(stage, settings):
    """Its photos are all reported, so only reconcile knew it needed a version: a failed render (disk full) was
    never tried again while the worker ran."""
    exam_id, folder = _reconciled_render_failed(stage, settings)
    assert stage.submit() == 1  # the catch-up
    job = stage.renderer.jobs[-1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report_v2.pdf").write_bytes(b"%PDF v2")
    stage.renderer.done = [RenderResult(job.key, 2, folder / "report_v2.pdf")]
    assert stage.collect() == [ReportWritten(exam_id, 2, folder / "report_v2.pdf")]
    assert stage.submit() == 0  # made: nothing more to do


def test_the_catch_up_leaves_a_reconciled_visit_alone_once_another_version_is_recorded(stage, settings):
    """Its render failed; a grader's sign-off (or another worker) then recorded a newer version: a model draft made
    now would stand over it."""
    exam_id, folder = _reconciled_render_failed(stage, settings)
    with session_scope(stage.factory) as s:  # someone else's version 2, on disk
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report_v2.pdf").write_bytes(b"%PDF v2, the reviewed version")
        repo.add_report(s, s.get(Exam, exam_id), folder / "report_v2.pdf", "m", version=2)
    assert stage.submit() == 0

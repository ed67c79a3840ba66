"""The reviewed version of a visit's report, from a real worker run (tiny model, synthetic photos)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pypdf import PdfReader
from sqlalchemy import select

from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.db.models import Event, Report
from screening.report import EyeReview, ReportError
from screening.review import ReviewError, load_visit, sign_off
from screening.review.reviewed_report import ModelCatalog, render_reviewed_report

from ..conftest import TEMPLATES, run_worker


def _text(path) -> str:
    """The PDF's text, white space collapsed (headings are upper-cased by the stylesheet: compare case-blind)."""
    return " ".join(" ".join((p.extract_text() or "").split()) for p in PdfReader(str(path)).pages)


def _has(text: str, needle: str) -> bool:
    return " ".join(needle.split()).lower() in text.lower()


def _render(w, exam_id, catalog=None, templates=TEMPLATES):
    return render_reviewed_report(w.factory, exam_id, catalog=catalog or ModelCatalog.from_settings(w.settings),
                                  clinic_name="North Clinic", templates_dir=templates, reports_dir=w.settings.reports, retries=1)


def test_correction_is_rendered_as_a_new_version_beside_the_models_answers(worked_db):
    worked = worked_db  # on SQLite, then on PostgreSQL
    exam_id = worked.exams["P1"]
    with session_scope(worked.factory) as s:
        visit = load_visit(s, exam_id)
        right = visit.eye("R").finding
        new_dr = (right.dr_grade + 2) % 5
        review = sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli", comment="see <macula>",
                          answers=[EyeReview("R", True, new_dr, right.dme_grade), EyeReview("L", False, None, None)])
        review_id = review.id
        [draft] = rrepo.exam_reports(s, exam_id)
    draft_bytes = open(draft.path, "rb").read()

    report = _render(worked, exam_id)
    assert (report.version, report.review_id) == (draft.version + 1, review_id)
    assert report.path.endswith(f"report_v{report.version}.pdf") and report.path != draft.path
    assert open(draft.path, "rb").read() == draft_bytes  # the draft version stays as it was
    text = _text(report.path)
    for needle in ["Clinician sign-off", "Reviewed by Dr A. Grey on", "corrected the automated grading", "Comment: see <macula>",
                   f"Grader: {new_dr} –", "(corrected)", "Grader: ungradable",
                   f"{right.dr_grade} – {right.dr_name}",  # the model's own answer is still printed
                   "Model's recommendation", "NOT FOR CLINICAL USE"]:  # a demo model stays watermarked
        assert _has(text, needle), needle
    # the sign-off box adds at most a page (test_report checks that typical findings stay on two)
    assert len(PdfReader(report.path).pages) <= len(PdfReader(draft.path).pages) + 1
    with session_scope(worked.factory) as s:
        assert rrepo.report_of_review(s, review_id).version == report.version
        assert [r.version for r in rrepo.exam_reports(s, exam_id)] == [report.version, draft.version]


def test_confirmation_says_confirmed_and_takes_metrics_from_the_grading_checkpoint(worked_db):
    worked = worked_db  # on SQLite, then on PostgreSQL
    exam_id = worked.exams["P2"]
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Ms B. Abbot", source="web")
    catalog = ModelCatalog.from_settings(worked.settings)
    text = _text(_render(worked, exam_id, catalog).path)
    assert "confirmed the automated grading" in text and "(corrected)" not in text
    assert "Validation DR kappa" in text and "test-synthetic-v1" in text
    # the checkpoint that graded the visit is gone: no metrics of another model, a 'synthetic' version stays demo
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Ms B. Abbot", source="web", comment="second look")
    text = _text(_render(worked, exam_id, ModelCatalog([worked.settings.work_dir / "nothing.pt"])).path)
    assert "Validation DR kappa" not in text and "NOT FOR CLINICAL USE" in text and "second look" in text


def test_no_reviewed_report_without_a_current_sign_off(worked_db):
    worked = worked_db  # on SQLite, then on PostgreSQL
    with pytest.raises(ReviewError, match="has not been signed off"):
        _render(worked, worked.exams["P1"])


def test_a_failed_render_keeps_the_sign_off_and_logs_it(worked_db, tmp_path):
    worked = worked_db  # on SQLite, then on PostgreSQL
    exam_id = worked.exams["P2"]
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli")
    broken = tmp_path / "no-templates"
    broken.mkdir()
    with pytest.raises((ReportError, FileNotFoundError)):
        _render(worked, exam_id, templates=broken)
    with session_scope(worked.factory) as s:
        assert rrepo.current_review(s, exam_id) is not None
        assert s.scalars(select(Report).where(Report.review_id.is_not(None))).all() == []
        assert "review" in s.scalars(select(Event.message).where(Event.kind == "report_failed")).one()
    assert _render(worked, exam_id).review_id is not None  # and it can be made later


def test_reviewed_version_passes_a_version_already_on_disk(worked_db):
    """A version the worker published but has not recorded yet is never overwritten: the reviewed one follows it."""
    worked = worked_db  # on SQLite, then on PostgreSQL
    exam_id = worked.exams["P2"]
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli")
        [draft] = rrepo.exam_reports(s, exam_id)
    unrecorded = Path(draft.path).with_name("report_v2.pdf")
    unrecorded.write_bytes(b"%PDF-1.4 published by the worker, not yet recorded")
    report = _render(worked, exam_id)
    assert report.version == 3 and report.path.endswith("report_v3.pdf")
    assert unrecorded.read_bytes().startswith(b"%PDF-1.4 published by the worker")


def test_with_workers_sharing_the_database_the_reviewed_version_waits_for_the_visits_claim(worked_db, monkeypatch):
    """A worker is making a version of the visit (it holds the visit's claim): the reviewed version is not numbered
    beside it; after a bounded wait the sign-off stays and the render is refused, and once the worker is done
    the reviewed version follows the recorded ones, with no gap (issue 15)."""
    from screening.claims import Claimer
    from screening.db.models import Claim, ClaimKind
    from screening.review import reviewed_report

    worked = worked_db
    exam_id = worked.exams["P2"]
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="web")
    worker = Claimer(worked.factory, "north", 30.0)
    page = Claimer(worked.factory, "north-review", 30.0)
    assert worker.take(ClaimKind.VISIT, str(exam_id))
    monkeypatch.setattr(reviewed_report, "CLAIM_WAIT_S", 1.0)
    render = lambda: render_reviewed_report(  # noqa: E731
        worked.factory, exam_id, catalog=ModelCatalog.from_settings(worked.settings), clinic_name="North Clinic",
        templates_dir=TEMPLATES, reports_dir=worked.settings.reports, retries=1, claims=page)
    with pytest.raises(ReportError, match="a worker has been writing a version"):
        render()
    worker.close()
    report = render()
    assert report.version == 2 and report.review_id is not None
    with session_scope(worked.factory) as s:
        assert s.scalars(select(Claim)).all() == []  # the page gave the visit back
    page.close()


def test_a_visit_the_worker_found_ungradable_is_reviewed_and_rendered_with_its_photo(settings, intake_models):
    """Every photo ungradable (the intake checks' verdict): the visit is still reviewed, its reviewed version shows
    the ungradable eye, its photo and the grader beside it, and names the configured model (none graded it)."""
    w = run_worker(settings.model_copy(update={"quality_model": intake_models["dark_blurred"]}), {"U9_R.jpg": 4})
    exam_id = w.exams["U9"]
    with session_scope(w.factory) as s:
        visit = load_visit(s, exam_id)
        assert visit.newest_graded is None and not visit.eye("R").finding.gradable
        assert visit.eye("R").finding.photo_path is not None and visit.eye("R").finding.photo_path.is_file()
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli")
    text = _text(_render(w, exam_id).path)
    for needle in ["Clinician sign-off", "confirmed the automated grading", "Recall: ungradable image",
                   "Ungradable: recapture", "Grader: ungradable (agrees)", "test-synthetic-v1"]:
        assert _has(text, needle), needle


def test_each_version_records_the_recommendation_it_printed_and_the_audit_counts_the_standing_one(settings_db, intake_models):
    """reports.referral_level: the worker's draft records the model's referral as its PDF printed it (here every
    photo ungradable under ungradable_rule "refer"), the reviewed version the grader's; the audit counts the visit
    as screened (it has no graded photo, so "Visits graded" never did) under the recommendation standing: first the
    model's, then the grader's (on SQLite and PostgreSQL)."""
    from screening.audit import audit_summary

    w = run_worker(settings_db.model_copy(update={"quality_model": intake_models["dark_blurred"], "ungradable_rule": "refer"}),
                   {"U7_R.jpg": 4})
    exam_id = w.exams["U7"]
    with session_scope(w.factory) as s:
        [draft] = rrepo.exam_reports(s, exam_id)
        assert (draft.review_id, draft.referral_level) == (None, "refer_ungradable")
        before = audit_summary(s).visits
    assert before is not None and before.screened == 1 and before.set_by_grader == 0
    assert before.by_recommendation["refer_ungradable"] == 1
    with session_scope(w.factory) as s:  # the grader can grade the photo: proliferative DR
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli", answers=[EyeReview("R", True, 4, 0)], ungradable_rule="refer")
    reviewed = _render(w, exam_id)
    assert (reviewed.version, reviewed.referral_level) == (2, "urgent")
    assert _has(_text(reviewed.path), "Urgent referral")
    with session_scope(w.factory) as s:
        after = audit_summary(s).visits
    assert after is not None and (after.screened, after.set_by_grader) == (1, 1)
    assert after.by_recommendation["urgent"] == 1 and after.by_recommendation["refer_ungradable"] == 0

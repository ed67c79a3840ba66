"""Repository functions: flush only, never commit; duplicates, recovery queries, report versions."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from screening.db import repository as repo
from screening.db import session_scope
from screening.db.models import Drop, Event, Exam, Image, Patient, Report, Result

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=timezone.utc)



def _result(session, image, *, at=None, **kw):
    values = dict(
        model_version="m1", checkpoint_sha256="c" * 64, dr_grade=1, dr_probs=[0.2, 0.6, 0.1, 0.05, 0.05],
        dme_grade=0, dme_probs=[0.9, 0.05, 0.05], referable_score=0.2, referable=False, created_at=at,
    )
    values.update(kw)
    return repo.add_result(session, image, **values)


def _count(session, model):
    return session.scalar(select(func.count()).select_from(model))


def test_functions_flush_but_never_commit(factory):
    s = factory()
    patient = repo.get_or_create_patient(s, "P001")
    exam = repo.get_or_create_exam(s, patient, date(2024, 5, 1))
    img = repo.add_image(s, sha256="A" * 64, source_name="P001_L_20240501.jpg", exam=exam, eye="L")
    repo.record_drop(s, sha256="a" * 64, source_name="P001_L_20240501.jpg", outcome="new", image=img)
    _result(s, img)
    repo.set_state(s, img, "done")
    repo.add_report(s, exam, "reports/P001_20240501_v1.pdf", "m1")
    repo.add_event(s, "info", "hello")
    assert img.id is not None and exam.id is not None  # flushed: ids assigned
    assert img.sha256 == "a" * 64  # hashes stored lower-case

    with factory() as other:  # nothing is visible to another session: no commit happened
        assert _count(other, Patient) == 0 and _count(other, Image) == 0
    s.rollback()
    s.close()
    with factory() as s2:
        for model in (Patient, Exam, Image, Drop, Result, Report, Event):
            assert _count(s2, model) == 0, model.__name__


def test_get_or_create_is_idempotent(factory):
    with session_scope(factory) as s:
        p = repo.get_or_create_patient(s, "P001")
        assert repo.get_or_create_patient(s, " P001 ") is p
        e = repo.get_or_create_exam(s, p, date(2024, 5, 1))
        assert repo.get_or_create_exam(s, p, date(2024, 5, 1)) is e
        assert repo.get_or_create_exam(s, p, date(2024, 5, 2)) is not e
    with session_scope(factory) as s:  # and across units of work
        p = repo.get_or_create_patient(s, "P001")
        assert repo.get_or_create_exam(s, p, date(2024, 5, 1)).id == e.id
        assert _count(s, Patient) == 1 and _count(s, Exam) == 2
    with pytest.raises(ValueError):
        with session_scope(factory) as s:
            repo.get_or_create_patient(s, "  ")


def _arrive(session, sha, name, at):
    """What the worker does for each file: a new Image or a duplicate Drop."""
    image = repo.get_image_by_sha(session, sha)
    if image is None:
        image = repo.add_image(session, sha256=sha, source_name=name, received_at=at)
        return image, repo.record_drop(session, sha256=sha, source_name=name, outcome="new", image=image, received_at=at)
    return image, repo.record_drop(session, sha256=sha, source_name=name, outcome="duplicate", image=image, received_at=at)


def test_duplicate_drop_recorded_twice_with_one_image(factory):
    sha = "d" * 64
    with session_scope(factory) as s:
        img1, d1 = _arrive(s, sha, "P001_L_20240501.jpg", T0)
        _result(s, img1)
    with session_scope(factory) as s:
        img2, d2 = _arrive(s, sha, "copy of P001_L_20240501.jpg", T0 + timedelta(minutes=5))
    with factory() as s:
        assert _count(s, Image) == 1 and _count(s, Result) == 1
        drops = s.scalars(select(Drop).order_by(Drop.id)).all()
        assert [d.outcome for d in drops] == ["new", "duplicate"]
        assert {d.image_id for d in drops} == {img1.id} and img2.id == img1.id
        assert drops[1].source_name == "copy of P001_L_20240501.jpg"
        # adding the same content as an Image again is refused by the database
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            repo.add_image(s, sha256=sha, source_name="again.jpg")


def test_set_state_logs_events_and_keeps_error_only_for_failures(factory):
    with session_scope(factory) as s:
        img = repo.add_image(s, sha256="e" * 64, source_name="x.jpg")
        before = img.updated_at
        repo.set_state(s, img, "failed", "CUDA out of memory")
        assert (img.state, img.error) == ("failed", "CUDA out of memory")
        assert img.updated_at >= before
        repo.set_state(s, img, "received")
        assert (img.state, img.error) == ("received", None)
        with pytest.raises(ValueError, match="unknown state"):
            repo.set_state(s, img, "processing")
        with pytest.raises(ValueError, match="unknown drop outcome"):
            repo.record_drop(s, sha256="e" * 64, source_name="x.jpg", outcome="dup")
    with factory() as s:
        msgs = s.scalars(select(Event.message).where(Event.kind == "state").order_by(Event.id)).all()
        assert msgs == ["received -> failed: CUDA out of memory", "failed -> received"]


def test_exam_images_with_results_orders_right_eye_first(factory):
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2024, 5, 1))
        left = repo.add_image(s, sha256="1" * 64, source_name="P1_L", exam=exam, eye="L")
        right = repo.add_image(s, sha256="2" * 64, source_name="P1_R", exam=exam, eye="R")
        pending = repo.add_image(s, sha256="3" * 64, source_name="P1_R_again", exam=exam, eye="R")
        _result(s, left, dr_grade=3, referable=True)
        _result(s, right, dr_grade=0)
        exam_id = exam.id
    with factory() as s:
        pairs = repo.exam_images_with_results(s, exam_id)
        assert [(i.eye, r.dr_grade) for i, r in pairs] == [("R", 0), ("L", 3)]
        pairs = repo.exam_images_with_results(s, exam_id, include_pending=True)
        assert [(i.id, r is None) for i, r in pairs] == [(right.id, False), (pending.id, True), (left.id, False)]


def test_report_versions(factory):
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2024, 5, 1))
        assert repo.next_report_version(s, exam.id) == 1
        assert repo.add_report(s, exam, "r/v1.pdf", "m1").version == 1
        assert repo.next_report_version(s, exam.id) == 2
        assert repo.add_report(s, exam, "r/v2.pdf", "m1").version == 2
        exam_id = exam.id
    with pytest.raises(IntegrityError):
        with session_scope(factory) as s:
            repo.add_report(s, s.get(Exam, exam_id), "r/dup.pdf", "m1", version=2)


def test_a_report_records_the_recommendation_it_printed(factory):
    """reports.referral_level (revision 0016_report_referral_level): a level key of screening.report.REFERRAL_LEVELS,
    what the audit counts visits by; anything else is refused before it reaches the database."""
    from screening.report import REFERRAL_LEVELS

    assert repo.REFERRAL_LEVEL_KEYS == tuple(REFERRAL_LEVELS)  # the database layer's copy of the keys
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2024, 5, 1))
        repo.add_report(s, exam, "r/v1.pdf", "m1", referral_level="refer_ungradable")
        repo.add_report(s, exam, "r/v2.pdf", "m1")  # loaded by other means: not known
        with pytest.raises(ValueError, match="unknown referral level 'refer'"):
            repo.add_report(s, exam, "r/v3.pdf", "m1", referral_level="refer")
        exam_id = exam.id
    with factory() as s:
        assert [(r.version, r.referral_level) for r in s.get(Exam, exam_id).reports] == [(1, "refer_ungradable"), (2, None)]


def test_images_in_state_for_recovery(factory):
    with session_scope(factory) as s:
        a = repo.add_image(s, sha256="a" * 64, source_name="a", received_at=T0 + timedelta(seconds=2))
        b = repo.add_image(s, sha256="b" * 64, source_name="b", received_at=T0)
        c = repo.add_image(s, sha256="c" * 64, source_name="c", received_at=T0)
        repo.set_state(s, c, "done")
    with factory() as s:
        assert [i.id for i in repo.images_in_state(s, "received")] == [b.id, a.id]
        assert {i.id for i in repo.images_in_state(s, ["received", "done"])} == {a.id, b.id, c.id}
        assert repo.images_in_state(s, []) == []


def test_exams_needing_report(factory):
    with session_scope(factory) as s:
        p = repo.get_or_create_patient(s, "P1")
        exams = [repo.get_or_create_exam(s, p, date(2024, 5, d)) for d in (1, 2, 3, 4, 5)]
        imgs = [repo.add_image(s, sha256=f"{i}" * 64, source_name=f"{i}", exam=e, eye="L") for i, e in enumerate(exams)]
        for img in imgs:
            _result(s, img, at=T0)
            repo.set_state(s, img, "done")
        # exams[0]: done, no report -> needs one
        # exams[1]: done, report after the result -> covered
        repo.add_report(s, exams[1], "r1.pdf", "m1", created_at=T0 + timedelta(seconds=1))
        # exams[2]: report older than a newer result of the second eye -> needs a new version
        repo.add_report(s, exams[2], "r2.pdf", "m1", created_at=T0 + timedelta(seconds=1))
        right = repo.add_image(s, sha256="f" * 64, source_name="R", exam=exams[2], eye="R")
        _result(s, right, at=T0 + timedelta(seconds=5))
        repo.set_state(s, right, "done")
        # exams[3]: already reported
        repo.set_state(s, imgs[3], "reported")
        # exams[4]: image failed, no result is done
        repo.set_state(s, imgs[4], "failed", "boom")
        ids = [e.id for e in exams]
    with factory() as s:
        assert [e.id for e in repo.exams_needing_report(s)] == [ids[0], ids[2]]


def test_result_carries_exam_arrival_and_turnaround_for_the_audit(factory):
    """results.exam_id/received_at are the image's; turnaround_s is arrival -> first report made at or after
    the result, whatever order the rows are recorded in (models.Result, revision 0003)."""
    sec = lambda n: T0 + timedelta(seconds=n)  # noqa: E731
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2024, 5, 1))
        left = repo.add_image(s, sha256="1" * 64, source_name="P1_L.jpg", exam=exam, eye="L", received_at=sec(0))
        right = repo.add_image(s, sha256="2" * 64, source_name="P1_R.jpg", exam=exam, eye="R", received_at=sec(5))
        late = repo.add_image(s, sha256="3" * 64, source_name="P1_L2.jpg", exam=exam, eye="L", received_at=sec(6))
        r_left = _result(s, left, at=sec(10))
        assert (r_left.exam_id, r_left.received_at, r_left.turnaround_s) == (exam.id, sec(0), None)
        repo.add_report(s, exam, "v2.pdf", "m1", version=2, created_at=sec(100))
        assert r_left.turnaround_s == 100.0
        repo.add_report(s, exam, "v1.pdf", "m1", version=1, created_at=sec(40))  # recorded late: the earlier wins
        assert r_left.turnaround_s == 40.0
        r_right = _result(s, right, at=sec(50))  # stored after the v2 report it is covered by
        assert r_right.turnaround_s == 95.0
        r_late = _result(s, late, at=sec(200))  # newer than every report: awaiting
        assert r_late.turnaround_s is None
        repo.add_report(s, exam, "v3.pdf", "m1", created_at=sec(300))
        assert (r_left.turnaround_s, r_right.turnaround_s, r_late.turnaround_s) == (40.0, 95.0, 294.0)
    with factory() as s:  # and so they were stored
        assert sorted(s.scalars(select(Result.turnaround_s))) == [40.0, 95.0, 294.0]


def _checks(**kw):
    values = dict(gradable=True, reasons=[], scores={"blurred": 0.01}, eye_source="name", predicted_eye="L",
                  eye_confidence=0.9, eye_mismatch=False)
    values.update(kw)
    return values


def test_record_checks_stores_the_verdict_and_logs_what_staff_must_see(factory):
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P7"), date(2024, 5, 1))
        img = repo.add_image(s, sha256="7" * 64, source_name="P7_L.jpg", exam=exam, eye="L")
        repo.record_checks(s, img, **_checks(gradable=False, reasons=["blurred", "haze"], predicted_eye="R",
                                             eye_mismatch=True, eye_note="Laterality mismatch: ..."))
    with session_scope(factory) as s:
        img = s.scalars(select(Image)).one()
        assert (img.gradable, img.quality_reasons, img.predicted_eye, img.eye_mismatch) == (False, ["blurred", "haze"], "R", True)
        assert [(e.kind, e.message) for e in s.scalars(select(Event).where(Event.kind != "state"))] == [
            ("ungradable", "blurred, haze"), ("eye_mismatch", "stated L, photo shows R (0.90)")]


@pytest.mark.parametrize(("change", "fragment"), [
    ({"gradable": False}, "needs at least one reason"),
    ({"reasons": ["blurred"]}, "no ungradable reasons"),
    ({"eye_source": "guess"}, "eye source"),
    ({"predicted_eye": "X"}, "eye"),
    ({"eye_confidence": 1.5}, "probability"),
])
def test_record_checks_refuses_inconsistent_values(factory, change, fragment):
    with session_scope(factory) as s:
        img = repo.add_image(s, sha256="8" * 64, source_name="P8_L.jpg", eye="L")
        with pytest.raises(ValueError, match=fragment):
            repo.record_checks(s, img, **_checks(**change))


def test_an_ungradable_image_needs_a_report_like_a_result(factory):
    """It has no result row: the time it was stored (done) stands for one."""
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P9"), date(2024, 5, 1))
        img = repo.add_image(s, sha256="9" * 64, source_name="P9_L.jpg", exam=exam, eye="L")
        repo.record_checks(s, img, **_checks(gradable=False, reasons=["too_dark"]))
        repo.set_state(s, img, "done")
        assert [e.id for e in repo.exams_needing_report(s)] == [exam.id]
        repo.add_report(s, exam, "r.pdf", "m1", created_at=datetime.now(timezone.utc) + timedelta(seconds=1))
        repo.set_state(s, img, "reported")
        assert repo.exams_needing_report(s) == []

"""Review repository: the visit's current photos, append-only sign-offs, logins."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from screening.db import repository as repo
from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.db.models import Event, Result, Review, ReviewEye


def _graded(s, exam, eye, dr, sha):
    img = repo.add_image(s, sha256=sha * 64, source_name=f"{eye}.jpg", exam=exam, eye=eye)
    repo.add_result(s, img, model_version="m", checkpoint_sha256="c" * 64, dr_grade=dr, dr_probs=[0.2] * 5, dme_grade=0,
                    dme_probs=[1 / 3] * 3, referable_score=0.1, referable=False)
    return img


def test_graded_fields_are_every_graded_photo_of_each_eye_in_arrival_order(factory):
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2025, 1, 2))
        first_left = _graded(s, exam, "L", 1, "a")
        second_left = _graded(s, exam, "L", 3, "b")  # the same eye photographed again: a second field
        right = _graded(s, exam, "R", 0, "c")
        repo.add_image(s, sha256="d" * 64, source_name="R2.jpg", exam=exam, eye="R")  # not graded yet: left out
        other = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P2"), date(2025, 1, 2))
        fields = rrepo.graded_fields(s)
        assert list(fields) == [exam.id]  # the exam without results is absent
        assert list(fields[exam.id]) == ["R", "L"]  # right eye first
        assert [g.image.id for g in fields[exam.id]["L"]] == [first_left.id, second_left.id]
        assert [g.result.dr_grade for g in fields[exam.id]["L"]] == [1, 3]
        assert [g.image.id for g in fields[exam.id]["R"]] == [right.id]
        assert rrepo.graded_fields(s, [other.id]) == {}


def test_reviews_are_appended_and_the_latest_is_current(factory):
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2025, 1, 2))
        img = _graded(s, exam, "R", 2, "a")
        first = rrepo.add_review(s, exam, reviewer="A", source="cli", outcome="confirmed", referral="routine",
                                 model_referral="routine", eyes=[rrepo.EyeGrades(img.id, "R", True, 2, 0)])
        second = rrepo.add_review(s, exam, reviewer="B", source="web", outcome="corrected", referral="ungradable",
                                  model_referral="routine", eyes=[rrepo.EyeGrades(img.id, "R", False, None, None)],
                                  reviewed_at=datetime(2025, 1, 3, tzinfo=timezone.utc))
        exam_id, first_id, second_id = exam.id, first.id, second.id
    with session_scope(factory) as s:
        current = rrepo.current_review(s, exam_id)
        assert current.id == second_id and current.reviewer == "B" and current.eyes[0].gradable is False
        assert [r.id for r in rrepo.review_history(s, exam_id)] == [second_id, first_id]
        assert s.scalar(select(Result.dr_grade)) == 2  # the model's result is untouched
        assert [e.message for e in s.scalars(select(Event).where(Event.kind == "review"))] == [
            f"exam {exam_id}: review {first_id} confirmed (cli), referral routine",
            f"exam {exam_id}: review {second_id} corrected (web), referral ungradable"]
    # history cannot be rewritten, not even through the ORM
    with pytest.raises(IntegrityError, match="append-only"), session_scope(factory) as s:
        s.get(Review, first_id).referral = "urgent"
    with pytest.raises(IntegrityError, match="append-only"), session_scope(factory) as s:
        s.delete(s.scalars(select(ReviewEye)).first())


def test_exams_with_unrendered_review_are_those_whose_current_sign_off_has_no_pdf(factory):
    """`review render`'s candidates, found in SQL: a visit rendered for an earlier sign-off but not its current one
    is among them; one rendered for its current sign-off, or never signed off, is not."""
    def sign(s, exam, img):
        return rrepo.add_review(s, exam, reviewer="A", source="cli", outcome="confirmed", referral="routine",
                                model_referral="routine", eyes=[rrepo.EyeGrades(img.id, "R", True, 2, 0)])

    with session_scope(factory) as s:
        exams = [repo.get_or_create_exam(s, repo.get_or_create_patient(s, f"P{k}"), date(2025, 1, 2)) for k in range(3)]
        imgs = [_graded(s, exam, "R", 2, "abc"[k]) for k, exam in enumerate(exams)]
        done = sign(s, exams[0], imgs[0])
        repo.add_report(s, exams[0], "reports/0/v1.pdf", "m", review_id=done.id)
        earlier = sign(s, exams[1], imgs[1])
        repo.add_report(s, exams[1], "reports/1/v1.pdf", "m", review_id=earlier.id)
        sign(s, exams[1], imgs[1])  # signed off again: its PDF is not made yet
        assert rrepo.exams_with_unrendered_review(s) == [exams[1].id]  # exams[2]: never signed off


def test_review_checks_in_the_database(factory):
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), date(2025, 1, 2))
        img = _graded(s, exam, "R", 2, "a")
    for bad in (rrepo.EyeGrades(img.id, "R", True, None, 0), rrepo.EyeGrades(img.id, "R", False, 2, None),
                rrepo.EyeGrades(img.id, "R", True, 5, 0)):
        with pytest.raises(IntegrityError, match="(?i)check"), session_scope(factory) as s:
            rrepo.add_review(s, s.get(type(exam), exam.id), reviewer="A", source="cli", outcome="corrected",
                             referral="routine", model_referral="routine", eyes=[bad])
    with pytest.raises(ValueError), session_scope(factory) as s:
        rrepo.add_review(s, s.get(type(exam), exam.id), reviewer="A", source="email", outcome="corrected",
                         referral="routine", model_referral="routine", eyes=[])


def test_users(factory):
    with session_scope(factory) as s:
        rrepo.add_user(s, "grey", "Dr A. Grey", "hash")
        rrepo.add_user(s, "abbot", "Ms B. Abbot", "hash")
    with session_scope(factory) as s:
        assert [u.username for u in rrepo.list_users(s)] == ["abbot", "grey"]
        assert rrepo.get_user(s, "grey").display_name == "Dr A. Grey" and rrepo.get_user(s, "nobody") is None
        assert rrepo.count_active_users(s) == 2
        rrepo.get_user(s, "grey").active = False
    with session_scope(factory) as s:
        assert rrepo.count_active_users(s) == 1
    with pytest.raises(IntegrityError), session_scope(factory) as s:
        rrepo.add_user(s, "grey", "again", "hash")

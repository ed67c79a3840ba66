"""The review queue and the sign-off rules (seeded visits, no files)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.db.models import Exam, Result
from screening.report import EyeReview
from screening.review import ReviewError, load_visit, recently_reviewed, referral_from_answers, review_queue, sign_off

from .conftest import T0, at, seed_ungradable, seed_visit


def _ids(visits):
    return [v.patient_code for v in visits]


def test_queue_puts_the_most_urgent_referrals_first_then_the_oldest(factory):
    with session_scope(factory) as s:
        seed_visit(s, "OLD_NORMAL", {"R": (0, 0, False)}, report_at=at(100))
        seed_visit(s, "NEW_URGENT", {"R": (4, 0, True), "L": (1, 0, False)}, report_at=at(900))
        seed_visit(s, "OLD_ROUTINE", {"L": (2, 0, True)}, report_at=at(200))
        seed_visit(s, "NO_REPORT", {"R": (1, 0, False)})  # ready since its result (T0 + 30 s)
        seed_visit(s, "DME_ONLY", {"R": (0, 1, False)}, report_at=at(50))  # DME risk refers too
    with session_scope(factory) as s:
        queue = review_queue(s)
        # the urgent (proliferative) visit first though newest; then the routine ones, oldest first
        assert _ids(queue) == ["NEW_URGENT", "DME_ONLY", "OLD_ROUTINE", "NO_REPORT", "OLD_NORMAL"]
        assert [v.referable for v in queue] == [True, True, True, False, False]
        assert [v.model_referral.level for v in queue] == ["urgent", "routine", "routine", "rescreen_12", "rescreen_24"]
        assert queue[3].ready_at == T0 + timedelta(seconds=30) and queue[4].ready_at == at(100)
        assert recently_reviewed(s) == []


def test_confirm_and_correct_are_stored_beside_the_model_and_leave_the_queue(factory):
    with session_scope(factory) as s:
        exam = seed_visit(s, "P1", {"R": (2, 0, True), "L": (1, 0, False)}, report_at=at(60))
        exam_id = exam.id
    with session_scope(factory) as s:
        r = sign_off(s, exam_id, reviewer="  Dr Grey ", source="cli")
        assert (r.outcome, r.referral, r.model_referral, r.reviewer) == ("confirmed", "routine", "routine", "Dr Grey")
        assert [(e.eye, e.gradable, e.dr_grade, e.dme_grade) for e in r.eyes] == [("R", True, 2, 0), ("L", True, 1, 0)]
    with session_scope(factory) as s:
        assert review_queue(s) == [] and _ids(recently_reviewed(s)) == ["P1"]
        answers = [EyeReview("R", True, 3, 0), EyeReview("L", True, 1, 0)]
        r = sign_off(s, exam_id, reviewer="Dr Abbot", source="web", answers=answers, comment="venous beading\nsuperior")
        assert (r.outcome, r.referral, r.comment) == ("corrected", "soon", "venous beading\nsuperior")  # referral follows the grades
    with session_scope(factory) as s:
        assert [h.reviewer for h in rrepo.review_history(s, exam_id)] == ["Dr Abbot", "Dr Grey"]
        assert sorted(s.scalars(select(Result.dr_grade))) == [1, 2]  # the model's grades are never overwritten
        visit = load_visit(s, exam_id)
        assert visit.current_review.reviewer == "Dr Abbot" and not visit.awaiting_review


def test_same_grades_with_another_referral_is_a_correction(factory):
    with session_scope(factory) as s:
        exam_id = seed_visit(s, "P1", {"R": (1, 0, False)}).id
        model = [EyeReview("R", True, 1, 0)]
        assert sign_off(s, exam_id, reviewer="A", source="cli", answers=model).outcome == "confirmed"
        r = sign_off(s, exam_id, reviewer="A", source="cli", answers=model, referral="routine")  # more urgent: allowed
        assert (r.outcome, r.referral) == ("corrected", "routine")


def test_several_fields_of_an_eye_the_result_follows_the_rule_and_a_new_field_reopens_the_visit(factory):
    now = datetime.now(timezone.utc) - timedelta(minutes=10)
    with session_scope(factory) as s:
        exam_id = seed_visit(s, "P1", {"R": (3, 0, True)}, received=now).id  # macula-centred field: severe NPDR
        seed_visit(s, "P1", {"R": (1, 0, False)}, received=now + timedelta(seconds=60))  # disc-centred field: mild
    with session_scope(factory) as s:
        worst, latest = load_visit(s, exam_id, "worst"), load_visit(s, exam_id, "latest")
        assert len(worst.eye("R").fields) == 2 and len(worst.field_ids) == 2
        assert worst.eye("R").model_answer == EyeReview("R", True, 3, 0) and worst.model_referral.level == "soon"
        assert latest.eye("R").model_answer == EyeReview("R", True, 1, 0) and latest.model_referral.level == "rescreen_12"
        review = sign_off(s, exam_id, reviewer="A", source="cli", seen_fields=worst.field_ids)
        assert (review.outcome, review.referral) == ("confirmed", "soon")
        assert review.eyes[0].image_id == worst.eye("R").image_id  # the field that gave the eye's result
    with session_scope(factory) as s:
        assert review_queue(s) == []
        seed_visit(s, "P1", {"R": (2, 0, True)}, received=datetime.now(timezone.utc))  # a third field, after the sign-off
    with session_scope(factory) as s:
        assert [v.exam_id for v in review_queue(s)] == [exam_id]
        with pytest.raises(ReviewError, match="a new photo was graded"):
            sign_off(s, exam_id, reviewer="A", source="cli", seen_fields=worst.field_ids)


def test_a_photo_graded_after_the_sign_off_puts_the_visit_back_in_the_queue(factory):
    with session_scope(factory) as s:
        exam = seed_visit(s, "P1", {"R": (0, 0, False)}, report_at=at(60))
        exam_id = exam.id
        sign_off(s, exam_id, reviewer="A", source="cli")
    with session_scope(factory) as s:
        seed_visit(s, "P1", {"L": (2, 0, True)}, received=at(3600))  # the second eye arrives later
    with session_scope(factory) as s:
        [visit] = review_queue(s)
        assert visit.exam_id == exam_id and visit.awaiting_review and visit.current_review is not None
        with pytest.raises(ReviewError, match="leaves out the left eye"):
            sign_off(s, exam_id, reviewer="A", source="cli", answers=[EyeReview("R", True, 0, 0)])
        assert sign_off(s, exam_id, reviewer="A", source="cli").referral == "routine"
        assert review_queue(s) == []


def test_the_queue_reads_only_visits_that_may_await_review_and_misses_none(factory):
    """The queue builds only the visits its SQL prefilter names (a year's signed-off visits stay in the database).
    Each way a sign-off stops covering a visit must be among them, even when no timestamp moved after the sign-off
    (a result stored by a worker while a grader was signing off carries the earlier time)."""
    from sqlalchemy import update

    from screening.db.models import Image
    from screening.review import load_visits

    old = at(60)
    with session_scope(factory) as s:
        covered = seed_visit(s, "COVERED", {"R": (0, 0, False), "L": (0, 0, False)}, report_at=at(60)).id
        late_eye = seed_visit(s, "LATE_EYE", {"R": (0, 0, False)}, report_at=at(60)).id
        swapped = seed_visit(s, "SWAPPED", {"R": (0, 0, False), "L": (1, 0, False)}, report_at=at(60)).id
        waiting = seed_visit(s, "NEVER_SIGNED", {"R": (2, 0, True)}, report_at=at(60)).id
        for exam_id in (covered, late_eye, swapped):
            sign_off(s, exam_id, reviewer="A", source="cli")
    with session_scope(factory) as s:
        assert rrepo.exams_maybe_awaiting_review(s) == [waiting]
        # the second eye's result, stored with a time before the sign-off
        seed_visit(s, "LATE_EYE", {"L": (2, 0, True)}, received=T0)
        # the two photos' eyes exchanged behind the sign-off's back, no time recorded
        ids = {i.eye: i.id for i in s.scalars(select(Image).where(Image.exam_id == swapped))}
        s.execute(update(Image).where(Image.id == ids["L"]).values(eye="R", updated_at=old))
        s.execute(update(Image).where(Image.id == ids["R"]).values(eye="L", updated_at=old))
        s.execute(update(Image).where(Image.exam_id == late_eye).values(updated_at=old))
    with session_scope(factory) as s:
        rule = {v.exam_id for v in load_visits(s) if v.awaiting_review}
        assert rule == {late_eye, swapped, waiting}
        assert rrepo.exams_maybe_awaiting_review(s) == sorted(rule)
        assert {v.exam_id for v in review_queue(s)} == rule
        assert [v.exam_id for v in recently_reviewed(s)] == [covered]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(reviewer="   "), "name is empty"),
        (dict(reviewer="Dr\x1b[31mRed"), "control characters"),
        (dict(reviewer="x" * 121), "at most 120"),
        (dict(comment="y" * 2001), "at most 2000"),
        (dict(source="email"), "unknown review source"),
        (dict(answers=[EyeReview("R", True, 2, 0)]), "leaves out the left eye"),
        (dict(answers=[EyeReview("R", True, 2, 0), EyeReview("R", True, 2, 0), EyeReview("L", True, 0, 0)]), "given twice"),
        (dict(answers=[EyeReview("R", True, 4, 0), EyeReview("L", True, 0, 0)], referral="routine"), "less urgent"),
        (dict(answers=[EyeReview("R", False, None, None), EyeReview("L", True, 0, 0)], referral="rescreen_24"), "less urgent"),
        (dict(referral="no_images"), "unknown referral"),
        (dict(reviewed_at=datetime(2025, 1, 1)), "no time zone"),
        (dict(reviewed_at=datetime.now(timezone.utc) + timedelta(hours=1)), "in the future"),
        (dict(seen_fields={999, 998}), "a new photo was graded"),
        (dict(seen_review_id=12345), "signed off by nobody"),
    ],
)
def test_sign_off_refuses_with_a_reason(factory, kwargs, message):
    with session_scope(factory) as s:
        exam_id = seed_visit(s, "P1", {"R": (2, 0, True), "L": (0, 0, False)}).id
    args = dict(reviewer="Dr Grey", source="cli") | kwargs
    with session_scope(factory) as s:
        with pytest.raises(ReviewError, match=message):
            sign_off(s, exam_id, **args)
        assert rrepo.current_review(s, exam_id) is None


def test_sign_off_of_a_visit_someone_else_signed_meanwhile_is_refused(factory):
    with session_scope(factory) as s:
        exam_id = seed_visit(s, "P1", {"R": (2, 0, True)}).id
        seen = load_visit(s, exam_id).field_ids
        sign_off(s, exam_id, reviewer="Dr Abbot", source="web", seen_fields=seen, seen_review_id=None)
    with session_scope(factory) as s, pytest.raises(ReviewError, match="signed off by Dr Abbot .* while it was open"):
        sign_off(s, exam_id, reviewer="Dr Grey", source="web", seen_fields=seen, seen_review_id=None)


def test_unknown_visit_and_visit_without_results(factory):
    from screening.db import repository as repo

    with session_scope(factory) as s:
        exam_id = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P9"), date(2025, 1, 1)).id
    with session_scope(factory) as s:
        with pytest.raises(ReviewError, match="no visit 777"):
            load_visit(s, 777)
        with pytest.raises(ReviewError, match="no graded photo yet"):
            sign_off(s, exam_id, reviewer="A", source="cli")


@pytest.mark.parametrize(
    ("answers", "level"),
    [
        ([EyeReview("R", True, 0, 0), EyeReview("L", True, 0, 0)], "rescreen_24"),
        ([EyeReview("R", True, 1, 0)], "rescreen_12"),
        ([EyeReview("R", True, 1, 0), EyeReview("L", True, 0, 1)], "routine"),
        ([EyeReview("R", True, 3, 0), EyeReview("L", False, None, None)], "soon"),  # a referral outranks the recall
        ([EyeReview("R", True, 1, 0), EyeReview("L", False, None, None)], "ungradable"),
        ([EyeReview("R", False, None, None)], "ungradable"),
        ([EyeReview("L", True, 4, 2)], "urgent"),
    ],
)
def test_referral_implied_by_the_graders_answers(answers, level):
    assert referral_from_answers(answers) == level


@pytest.mark.parametrize(("rule", "level"), [("recall", "ungradable"), ("refer", "refer_ungradable")])
def test_an_eye_the_worker_found_ungradable_is_reviewed_as_ungradable(factory, rule, level):
    """The model's answer for it is 'ungradable' (no grade) and its referral follows [screening] ungradable_rule;
    confirming records that; a grader may grade it instead."""
    with session_scope(factory) as s:
        exam = seed_visit(s, "U1", {"R": (0, 0, False)}, report_at=at(60))
        left = seed_ungradable(s, exam, "L", stored=T0 + timedelta(seconds=40))
        exam_id = exam.id
    with session_scope(factory) as s:
        [visit] = review_queue(s, ungradable_rule=rule)
        eye = visit.eye("L")
        assert eye is not None and eye.image_id == left and not eye.finding.gradable
        assert eye.model_answer == EyeReview("L", False, None, None) and eye.result.model_version is None
        assert visit.model_referral.level == level and visit.model_version == "v1"
        r = sign_off(s, exam_id, reviewer="Dr Grey", source="cli", ungradable_rule=rule)
        assert (r.outcome, r.referral, r.model_referral) == ("confirmed", level, level)
        assert [(e.eye, e.gradable, e.image_id) for e in r.eyes] == [("R", True, visit.eye("R").image_id), ("L", False, left)]
    with session_scope(factory) as s:
        r = sign_off(s, exam_id, reviewer="Dr Abbot", source="web", ungradable_rule=rule,
                     answers=[EyeReview("R", True, 0, 0), EyeReview("L", True, 2, 0)])
        assert (r.outcome, r.referral) == ("corrected", "routine")


def test_a_visit_whose_photos_are_all_ungradable_is_in_the_queue_and_a_new_one_reopens_it(factory):
    with session_scope(factory) as s:
        exam = repo_exam = seed_visit(s, "U2", {})
        seed_ungradable(s, repo_exam, "R", stored=at(10))
        exam_id = exam.id
    with session_scope(factory) as s:
        [visit] = review_queue(s)
        assert visit.model_version == "not graded" and visit.newest_graded is None and visit.ready_at == at(10)
        sign_off(s, exam_id, reviewer="Dr Grey", source="cli", reviewed_at=at(20))
    with session_scope(factory) as s:
        assert review_queue(s) == []
        seed_ungradable(s, s.get(Exam, exam_id), "R", stored=datetime.now(timezone.utc))  # a recapture, ungradable again
    with session_scope(factory) as s:
        assert _ids(review_queue(s)) == ["U2"]


def test_a_new_photo_after_an_urgent_sign_off_keeps_it_ahead_and_lowering_it_needs_a_chosen_referral_and_a_reason(factory):
    """A grader referred a visit urgently; a field arriving after the sign-off must not put it behind routine visits
    by the model's lower answer, nor let one 'confirm' quietly lower the referral."""
    with session_scope(factory) as s:
        urgent = seed_visit(s, "GRADED_4", {"R": (1, 0, False)}, report_at=at(60)).id
        sign_off(s, urgent, reviewer="Dr A", source="cli", answers=[EyeReview("R", True, 4, 0)])
        seed_visit(s, "ROUTINE_OLD", {"L": (2, 0, True)}, report_at=at(30))
    with session_scope(factory) as s:
        # a second field, graded (30 s after its arrival) after the sign-off
        seed_visit(s, "GRADED_4", {"R": (1, 0, False)}, received=datetime.now(timezone.utc) - timedelta(seconds=30))
    with session_scope(factory) as s:
        queue = review_queue(s)
        assert _ids(queue) == ["GRADED_4", "ROUTINE_OLD"]  # the model alone says rescreen: it was last before
        visit = queue[0]
        assert visit.model_referral.level == "rescreen_12" and visit.queue_level == "urgent"
        assert visit.reopened is not None and visit.reopened.referral == "urgent"
        assert [f.source_name for f in visit.new_since_review] == ["GRADED_4_R.jpg"] and len(visit.fields) == 2
        assert visit.ready_at == visit.new_since_review[0].graded_at  # it waits since the new field, not its draft
        for kwargs in (dict(), dict(answers=[EyeReview("R", True, 1, 0)]),
                       dict(answers=[EyeReview("R", True, 1, 0)], referral="rescreen_12"),  # chosen, but no reason
                       dict(answers=[EyeReview("R", True, 1, 0)], comment="artefact")):  # a reason, not chosen
            with pytest.raises(ReviewError, match="recommended 'Urgent referral.*less urgent 'Rescreen in 12 months'"):
                sign_off(s, urgent, reviewer="Dr B", source="cli", **kwargs)
        lowered = sign_off(s, urgent, reviewer="Dr B", source="cli", answers=[EyeReview("R", True, 1, 0)],
                           referral="rescreen_12", comment="the new field shows the first one's vessels were an artefact")
        assert lowered.referral == "rescreen_12"
        # once signed off again, the visit is not reopened: the next sign-off is free to change it either way
        assert _ids(review_queue(s)) == ["ROUTINE_OLD"] and load_visit(s, urgent).reopened is None


def test_a_retake_after_an_ungradable_sign_off_follows_its_grades(factory):
    """'Recall: ungradable image' is what the new photograph answers: it is neither kept ahead in the queue nor
    required to be lowered with a chosen referral and a comment."""
    with session_scope(factory) as s:
        exam_id = seed_visit(s, "RETAKE", {"L": (0, 0, False)}, report_at=at(60)).id
        seed_ungradable(s, s.get(Exam, exam_id), "R", stored=at(90))
        first = sign_off(s, exam_id, reviewer="Dr A", source="cli")
        assert first.referral == "ungradable"
    with session_scope(factory) as s:
        seed_visit(s, "RETAKE", {"R": (0, 0, False)}, received=datetime.now(timezone.utc) - timedelta(seconds=30))
    with session_scope(factory) as s:
        visit = load_visit(s, exam_id)
        assert visit.reopened is not None and visit.queue_level == visit.model_referral.level
        again = sign_off(s, exam_id, reviewer="Dr A", source="cli",
                         answers=[EyeReview("R", True, 0, 0), EyeReview("L", True, 0, 0)])
        assert again.referral == "rescreen_24"


def test_a_visit_outline_is_covered_exactly_when_the_visit_no_longer_awaits_review(factory):
    """The audit's agreement reads signed-off visits as outlines (columns, not built visits: 30 s per 50,000 visits
    otherwise) and asks them the queue's rule. Each way a sign-off stops covering a visit, and two ways it still
    does (an ungradable verdict stored before it, a photo's eye confirmed before it), give the same answer both ways:
    one rule (visits.covers), two readers."""
    from sqlalchemy import update

    from screening.db.models import Image
    from screening.review import load_visits
    from screening.review.eyes import move_photos, set_eyes
    from screening.review.visits import load_outlines

    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    with session_scope(factory) as s:
        covered = seed_visit(s, "COVERED", {"R": (0, 0, False), "L": (0, 0, False)}, report_at=at(60))
        ungradable_before = seed_visit(s, "UNGRADABLE_BEFORE", {"R": (1, 0, False)}, report_at=at(60))
        seed_ungradable(s, ungradable_before, "L", stored=at(50))
        confirmed_before = seed_visit(s, "CONFIRMED_BEFORE", {"R": (0, 0, False)}, report_at=at(60))
        set_eyes(s, [(confirmed_before.images[0].id, "R")], "Ann Lee", "worklist", now=at(70))
        ids = {name: seed_visit(s, name, eyes, report_at=at(60)).id for name, eyes in (
            ("LATE_EYE", {"R": (0, 0, False)}), ("SWAPPED", {"R": (0, 0, False), "L": (1, 0, False)}),
            ("EYE_SET", {"R": (0, 0, False)}), ("UNGRADABLE_AFTER", {"R": (0, 0, False)}),
            ("MOVED_OUT", {"R": (0, 0, False), "L": (1, 0, False)}))}
        ids |= {"COVERED": covered.id, "UNGRADABLE_BEFORE": ungradable_before.id, "CONFIRMED_BEFORE": confirmed_before.id}
        field_moved = seed_visit(s, "FIELD_MOVED_OUT", {"R": (2, 0, True)}, report_at=at(60))
        seed_visit(s, "FIELD_MOVED_OUT", {"R": (0, 0, False)})  # a second field: the eye's result is the first (worst)
        ids["FIELD_MOVED_OUT"] = field_moved.id
        never = seed_visit(s, "NEVER_SIGNED", {"R": (2, 0, True)}, report_at=at(60)).id
        for exam_id in ids.values():
            sign_off(s, exam_id, reviewer="A", source="cli")
    with session_scope(factory) as s:
        seed_visit(s, "LATE_EYE", {"L": (2, 0, True)}, received=T0)  # its time is before the sign-off
        photos = {i.eye: i.id for i in s.scalars(select(Image).where(Image.exam_id == ids["SWAPPED"]))}
        s.execute(update(Image).where(Image.id == photos["L"]).values(eye="R"))
        s.execute(update(Image).where(Image.id == photos["R"]).values(eye="L"))
        eye_set = s.scalars(select(Image.id).where(Image.exam_id == ids["EYE_SET"])).one()
        set_eyes(s, [(eye_set, "R")], "Ann Lee", "worklist", now=later)
        seed_ungradable(s, s.get(Exam, ids["UNGRADABLE_AFTER"]), "L", stored=later)
        left = s.scalars(select(Image.id).where(Image.exam_id == ids["MOVED_OUT"], Image.eye == "L")).one()
        move_photos(s, [left], "OTHER", date(2025, 3, 3), "L", "Ann Lee", "worklist", now=later)
        second = max(s.scalars(select(Image.id).where(Image.exam_id == ids["FIELD_MOVED_OUT"])))
        move_photos(s, [second], "OTHER", date(2025, 3, 3), "R", "Ann Lee", "worklist", now=later)  # only the visit's time
    with session_scope(factory) as s:
        visits = {v.exam_id: v for v in load_visits(s, [*ids.values(), never])}
        outlines = {o.exam_id: o for o in load_outlines(s, [*ids.values(), never])}
        assert outlines.keys() == visits.keys() == {*ids.values(), never}
        answers = {}
        for name, exam_id in ids.items():
            review = visits[exam_id].current_review
            assert review is not None
            answers[name] = outlines[exam_id].covered_by(review.created_at, [(e.image_id, e.eye) for e in review.eyes])
            assert answers[name] == (not visits[exam_id].awaiting_review), name
        assert {name for name, covered in answers.items() if covered} == {"COVERED", "UNGRADABLE_BEFORE", "CONFIRMED_BEFORE"}
        for exam_id, outline in outlines.items():  # the model versions and arrival times the audit's periods use
            assert sorted((p.image_id, p.eye, p.model_version, p.received_at) for p in outline.photos) \
                == sorted((f.image_id, e.eye, f.model_version, f.received_at) for e in visits[exam_id].eyes for f in e.fields)
            assert outline.first_report_at == visits[exam_id].first_report_at == at(60)

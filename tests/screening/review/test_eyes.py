"""A person sets a photo's eye after checking its label (seeded visits, no files)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from screening.db import repository as repo
from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.db.models import Event, Image
from screening.findings import stored_finding
from screening.report import EyeReview
from screening.review import ReviewError, load_visit, sign_off
from screening.review.eyes import set_eyes
from screening.review.visits import starting_answers

from .conftest import at, seed_visit


def _mislabelled_visit(s):
    """P1: the right-eye photo shows the left eye (the intake flagged it), and the left-eye photo the right one."""
    exam = seed_visit(s, "P1", {"R": (2, 0, True), "L": (0, 0, False)}, report_at=at(60))
    right, left = exam.images
    for image, shows in ((right, "L"), (left, "R")):
        repo.record_checks(s, image, gradable=True, reasons=[], scores={}, eye_source="name", predicted_eye=shows,
                           eye_confidence=0.97, eye_mismatch=True, eye_note="Laterality mismatch: check the label.")
        repo.set_state(s, image, "reported")
    return exam.id, right.id, left.id


def test_a_swapped_pair_is_set_together_the_warning_goes_and_the_visit_needs_a_new_version(factory):
    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
        assert [e.id for e in repo.exams_needing_report(s)] == []  # its report covers both photos
        assert load_visit(s, exam_id).cautions  # the label in doubt
    with session_scope(factory) as s:
        done = set_eyes(s, [(right, "L"), (left, "R")], " Ann Lee ", "camera worklist", now=at(120))
        assert [(e.image_id, e.before, e.after, e.changed) for e in done] == [(right, "R", "L", True), (left, "L", "R", True)]
        assert not any(e.contradicted for e in done)  # each photo now filed under the eye it reads as
    with session_scope(factory) as s:
        a, b = s.get(Image, right), s.get(Image, left)
        assert (a.eye, b.eye) == ("L", "R") and a.eye_source == b.eye_source == "staff"
        assert a.state == b.state == "done" and a.refiled_at == at(120)
        assert a.eye_mismatch  # the intake's finding stays, for the audit
        assert a.eye_note.startswith("Eye set to the left eye by Ann Lee on ") and "(camera worklist)" in a.eye_note
        assert "filed as the right eye from the file name" in a.eye_note and "reads as the left eye (97% sure)" in a.eye_note
        finding = stored_finding(a, a.result)
        assert finding is not None and not finding.eye_mismatch and finding.eye_note == a.eye_note  # information now
        assert [e.id for e in repo.exams_needing_report(s)] == [exam_id]
        visit = load_visit(s, exam_id)
        assert not visit.cautions and visit.eye("L").image_id == right
        trail = s.scalars(select(Event.message).where(Event.kind == "eye_set").order_by(Event.id)).all()
        assert trail == ["eye R -> L by Ann Lee: camera worklist", "eye L -> R by Ann Lee: camera worklist"]
        repo.add_report(s, s.get(Image, right).exam, "reports/P1/v2.pdf", "v1", created_at=at(130))
        assert repo.exams_needing_report(s) == []  # a version made after the change covers it


def test_a_confirmed_eye_keeps_its_eye_and_loses_the_warning(factory):
    with session_scope(factory) as s:
        exam_id, right, _ = _mislabelled_visit(s)
        with pytest.raises(ReviewError, match=f"image {right}: the photo reads as the left eye \\(97% sure\\), not the "
                                              "right eye.*add --against-photo"):
            set_eyes(s, [(right, "R")], "Ann Lee", "checked the camera's worklist")  # a mistyped id, most often
        (done,) = set_eyes(s, [(right, "R")], "Ann Lee", "checked the camera's worklist", now=at(120), against_photo=True)
        assert (done.before, done.after, done.changed) == ("R", "R", False)
        assert done.contradicted and (done.photo_reads, done.photo_confidence) == ("L", 0.97)  # the command warns
        image = s.get(Image, right)
        assert image.eye == "R" and image.eye_note.startswith("Eye confirmed as the right eye by Ann Lee")
        assert not stored_finding(image, image.result).eye_mismatch
        with pytest.raises(ReviewError, match=f"image {right} is already filed as the right eye, set by a person"):
            set_eyes(s, [(right, "R")], "Ann Lee", "again", against_photo=True)


def test_a_sign_off_made_before_the_eye_was_set_no_longer_covers_the_visit(factory):
    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
        review = sign_off(s, exam_id, reviewer="Dr Grey", source="cli")
        assert not load_visit(s, exam_id).awaiting_review
    with session_scope(factory) as s:
        set_eyes(s, [(right, "L"), (left, "R")], "Ann Lee", "worklist", now=review.created_at + timedelta(minutes=5))
    with session_scope(factory) as s:
        visit = load_visit(s, exam_id)
        assert visit.awaiting_review and visit.reopened is not None
        assert {f.image_id for f in visit.new_since_review} == {right, left}
        assert visit.ready_at == review.created_at + timedelta(minutes=5)


def test_after_a_swap_the_earlier_answers_are_not_put_on_the_other_photo_however_the_times_fall(factory):
    """The sign-off graded the right-named photo DR 3; once it is filed as the left eye, neither eye starts from that
    answer (it was for the other photo), and the sign-off no longer covers the visit even if its row was written
    after the eyes were set (a sign-off that read the visit before the change, committed after it)."""
    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
        answers = [EyeReview("R", True, 3, 0), EyeReview("L", True, 0, 0)]
        review = sign_off(s, exam_id, reviewer="Dr Grey", source="cli", answers=answers)
        set_eyes(s, [(right, "L"), (left, "R")], "Ann Lee", "worklist", now=review.created_at - timedelta(minutes=1))
    with session_scope(factory) as s:
        visit = load_visit(s, exam_id)
        assert visit.awaiting_review
        given, _ = starting_answers(visit)
        assert given == {"R": visit.eye("R").model_answer, "L": visit.eye("L").model_answer}
        assert given["L"].dr_grade == 2  # the model's grade of the photo now filed as the left eye, not the grader's 3


def test_refusals_name_the_photo_and_change_nothing(factory):
    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
        refused = repo.add_image(s, sha256="f" * 64, source_name="P9.jpg", exam=None, eye=None)
        repo.set_state(s, refused, "rejected", "no eye in the name", code="identity")
        waiting = repo.add_image(s, sha256="e" * 64, source_name="P1_R2.jpg", exam=s.get(Image, right).exam, eye="R")
        ids = (refused.id, waiting.id)
    cases = [
        ([(999, "L")], "there is no image 999"),
        ([(ids[0], "L")], f"image {ids[0]} is not in a visit (it was rejected: identity); drop the file"),
        ([(ids[1], "L")], f"image {ids[1]} is still being graded"),
        ([(right, "L"), (right, "R")], f"image {right} is given twice"),
        ([(right, "L"), (999, "R")], "there is no image 999"),  # all or none: the first photo is not set either
        ([], "no photo given"),
    ]
    for eyes, message in cases:
        with session_scope(factory) as s, pytest.raises(ReviewError, match=message.replace("(", r"\(").replace(")", r"\)")):
            set_eyes(s, eyes, "Ann Lee", "worklist")
    for reviewer, reason, message in (("", "worklist", "name of the person"), ("Ann", " ", "say what the label was"),
                                      ("Ann\x1b[31m", "worklist", "control characters")):
        with session_scope(factory) as s, pytest.raises(ReviewError, match=message):
            set_eyes(s, [(right, "L")], reviewer, reason)
    with session_scope(factory) as s:
        assert [s.get(Image, i).eye for i in (right, left)] == ["R", "L"]
        assert s.scalars(select(Event).where(Event.kind == "eye_set")).all() == []


# ------------------------------------------------------------------------------------------------ moving photos


def test_a_photo_stored_under_the_wrong_patient_moves_to_the_right_visit_and_both_need_a_new_version(factory):
    from screening.db import tallies
    from screening.db.models import Exam
    from screening.review.eyes import move_photos

    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
        other = seed_visit(s, "P2", {"R": (1, 0, False)}, report_at=at(60)).id
        signed_at = sign_off(s, other, reviewer="Dr Grey", source="cli").created_at
        assert repo.exams_needing_report(s) == [] and tallies.check(s) == []
    with session_scope(factory) as s:
        (moved,) = move_photos(s, [left], "p2", None, None, "Ann Lee", "camera worklist",
                               now=signed_at + timedelta(minutes=1))
        assert (moved.from_exam, moved.to_exam, moved.eye, moved.emptied) == (exam_id, other, "L", False)
    with session_scope(factory) as s:
        image = s.get(Image, left)
        assert image.exam_id == other and image.eye == "L" and image.state == "done"
        assert image.result.exam_id == other  # the audit's visit counts read the result's copy of the visit
        assert image.filing_note.startswith("Filed in this visit by Ann Lee on ") and "(camera worklist)" in image.filing_note
        finding = stored_finding(image, image.result)
        assert finding.source_name == "file name withheld: moved from another visit"  # its file name named P1
        left_visit = s.get(Exam, exam_id)
        assert "P1_L.jpg" in left_visit.filing_note and "Do not act on those versions" in left_visit.filing_note
        assert [e.id for e in repo.exams_needing_report(s)] == [exam_id, other]
        assert tallies.check(s) == []  # the audit's counts follow the rows
        (message,) = s.scalars(select(Event.message).where(Event.kind == "moved")).all()
        assert message == f"image moved from visit {exam_id} to visit {other} by Ann Lee: camera worklist"
        p2 = load_visit(s, other)
        assert p2.awaiting_review and [f.image_id for f in p2.new_since_review] == [left]  # the sign-off saw no left eye
        assert load_visit(s, exam_id).filing_note == left_visit.filing_note
        assert [f.image_id for f in load_visit(s, exam_id).fields] == [right]
    with session_scope(factory) as s:  # moved on again: the visit it leaves now never names P1's file
        move_photos(s, [left], "P3", None, None, "Ann Lee", "second look", now=signed_at + timedelta(minutes=2))
        assert tallies.check(s) == []
    with session_scope(factory) as s:
        note = s.get(Exam, other).filing_note
        assert "(file name withheld: moved from another visit)" in note and "P1" not in note
    with session_scope(factory) as s:  # moved back where it came from: that visit's note says so
        move_photos(s, [left], "P1", None, None, "Ann Lee", "it was P1's after all", now=signed_at + timedelta(minutes=3))
        assert s.get(Image, left).exam_id == exam_id and tallies.check(s) == []
        note = s.get(Exam, exam_id).filing_note
        assert note.index("is not this visit's") < note.index("Then Ann Lee moved a photograph into this visit")
        assert "(it was P1's after all): the photographs shown in this version are the ones filed in it now." in note


def test_moving_out_a_field_that_was_not_the_eyes_result_reopens_the_visit_it_left(factory):
    """The sign-off answered for the eye by its worse field; the other field (not this patient's) moved out, so the
    grader saw a photo that is gone: the visit awaits review again (its eyes and result fields are unchanged)."""
    from datetime import datetime, timezone

    from screening.review.eyes import move_photos

    start = datetime.now(timezone.utc) - timedelta(minutes=30)
    with session_scope(factory) as s:
        exam_id = seed_visit(s, "P1", {"R": (3, 0, True)}, received=start).id
        seed_visit(s, "P1", {"R": (1, 0, False)}, received=start + timedelta(seconds=60))
        visit = load_visit(s, exam_id)
        worse, other = visit.eye("R").image_id, next(f.image_id for f in visit.fields if f.image_id != visit.eye("R").image_id)
        signed_at = sign_off(s, exam_id, reviewer="Dr Grey", source="cli").created_at
    with session_scope(factory) as s:
        move_photos(s, [other], "P2", None, None, "Ann Lee", "worklist", now=signed_at + timedelta(minutes=1))
    with session_scope(factory) as s:
        visit = load_visit(s, exam_id)
        assert visit.eye("R").image_id == worse and visit.awaiting_review and visit.reopened is not None


def test_a_visit_left_without_photos_still_gets_a_version_and_a_sign_off_there_no_longer_covers_it(factory):
    from datetime import date

    from screening.db import tallies
    from screening.db.models import Exam, Patient
    from screening.review.eyes import move_photos

    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
        sign_off(s, exam_id, reviewer="Dr Grey", source="cli")
    with session_scope(factory) as s:
        with pytest.raises(ReviewError, match="the photo reads as the left eye"):
            move_photos(s, [right, left], "NEW7", date(2025, 3, 1), "R", "Ann Lee", "worklist")
        moved = move_photos(s, [right, left], "NEW7", date(2025, 3, 1), "R", "Ann Lee", "worklist", now=at(7200),
                            against_photo=True)
        assert [m.new_patient for m in moved] == [True, True]
        assert [m.emptied for m in moved] == [False, True] and len({m.to_exam for m in moved}) == 1
    with session_scope(factory) as s:
        assert s.scalars(select(Patient.code)).all() == ["P1", "NEW7"]
        assert tallies.check(s) == [] and s.get(Exam, exam_id).screened_at is None  # P1 is no screened visit now
        assert [e.id for e in repo.exams_needing_report(s)] == [exam_id, moved[0].to_exam]  # P1 has no photo, still due
        assert load_visit(s, moved[0].to_exam).exam_date == date(2025, 3, 1)
        assert [s.get(Image, i).eye for i in (right, left)] == ["R", "R"]
        moved_left = s.get(Image, left)
        assert moved_left.eye_source == "staff" and not stored_finding(moved_left, moved_left.result).eye_mismatch
        assert moved_left.eye_note.startswith("Eye set to the right eye by Ann Lee") and "filed as the left eye" in moved_left.eye_note
        assert s.get(Image, right).eye_note.startswith("Eye confirmed as the right eye")  # --eye R: checked too


def test_a_move_is_refused_with_a_reason_and_changes_nothing(factory):
    from datetime import date

    from screening.review.eyes import move_photos

    with session_scope(factory) as s:
        exam_id, right, left = _mislabelled_visit(s)
    cases = [
        (dict(image_ids=[right], patient="../P2"), "is not a patient id"),
        (dict(image_ids=[right], patient="P2", exam_date=date(2999, 1, 1)), "is in the future"),
        (dict(image_ids=[right], patient="p1"), f"image {right} is already in that visit"),
        (dict(image_ids=[right], patient="P1", eye="L"), "`dr-screen review eye` sets its eye"),
        (dict(image_ids=[right, right], patient="P2"), "given twice"),
        (dict(image_ids=[right, 999], patient="P2"), "there is no image 999"),
        (dict(image_ids=[], patient="P2"), "no photo given"),
        (dict(image_ids=[right], patient="P2", reason=""), "say what the label was checked against"),
    ]
    for kwargs, message in cases:
        call = dict(exam_date=None, eye=None, reviewer="Ann Lee", reason="worklist") | kwargs
        with session_scope(factory) as s, pytest.raises(ReviewError, match=message.replace("(", r"\(")):
            move_photos(s, **call)
    with session_scope(factory) as s:
        assert [s.get(Image, i).exam_id for i in (right, left)] == [exam_id, exam_id]
        assert s.scalars(select(Event).where(Event.kind == "moved")).all() == []


def test_a_refused_identity_conflict_is_a_caution_in_the_queue_until_a_person_refiles_the_photo(factory):
    """A copy of a stored photo named as the other eye was refused, and nothing in the review queue said so: the
    grader could sign the visit off under a label a staff member had reason to doubt."""
    from screening.review import review_queue
    from screening.review.text import format_queue, format_visit

    with session_scope(factory) as s:
        exam_id, right, _ = _mislabelled_visit(s)
        image = s.get(Image, right)
        repo.record_drop(s, sha256=image.sha256, source_name="P1_L_copy.jpg", outcome="rejected", image=image,
                         reason="the same bytes as this patient's right eye photo", reason_code="identity_conflict",
                         received_at=at(300))
    with session_scope(factory) as s:
        visit = load_visit(s, exam_id)
        assert visit.conflicts == (right,)
        (conflict,) = [c for c in visit.cautions if c.kind == "conflict"]
        assert f"(image {right})" in conflict.text and "`dr-screen review eye`" in conflict.text
        assert "identity conflict" in format_queue(review_queue(s))
        assert f"caution (identity conflict): A copy of a photo of this visit (image {right})" in format_visit(visit, [], [])
        # nor can it be signed off until a person answers: the grades may be another patient's
        with pytest.raises(ReviewError, match=rf"identity conflict is open: a copy of image {right} .*`dr-screen review move`"):
            sign_off(s, exam_id, reviewer="Dr Grey", source="cli")
        assert rrepo.current_review(s, exam_id) is None
        set_eyes(s, [(right, "R")], "Ann Lee", "worklist: the copy's name was wrong", now=at(400), against_photo=True)
    with session_scope(factory) as s:
        assert load_visit(s, exam_id).conflicts == ()  # answered: not shown again
        assert sign_off(s, exam_id, reviewer="Dr Grey", source="cli").reviewer == "Dr Grey"


def test_a_refiling_waits_for_a_workers_version_then_refuses_and_releases_its_claims(factory):
    """`review eye`, `review move` and the review page's eye form refile under the visits' report claims: while a
    worker holds one (it is writing a version) the refiling waits, then is refused with nothing changed; after a
    refiling the claims are free again for the worker's next version."""
    from screening.claims import Claimer
    from screening.db.models import ClaimKind
    from screening.review.eyes import under_visit_claims

    with session_scope(factory) as s:
        exam_id, right, _ = _mislabelled_visit(s)
    worker = Claimer(factory, "clinic", 60.0, "worker-1")
    desk = Claimer(factory, "clinic", 60.0, "desk-1")
    ran = []
    try:
        assert worker.take(ClaimKind.VISIT, str(exam_id))
        with pytest.raises(ReviewError, match=f"visit {exam_id}: a worker has been writing a version of its report for "
                                              "over 1 s; nothing was changed"):
            under_visit_claims(factory, desk, [exam_id], lambda s: ran.append(1), wait_s=0.6)
        assert ran == [] and not desk.holds(ClaimKind.VISIT, str(exam_id))
        worker.release(ClaimKind.VISIT, [str(exam_id)])
        done = under_visit_claims(factory, desk, [exam_id], lambda s: set_eyes(
            s, [(right, "R")], "Ann Lee", "worklist", against_photo=True))
        assert [d.after for d in done] == ["R"]
        assert worker.take(ClaimKind.VISIT, str(exam_id))  # released after the refiling
    finally:
        worker.close()
        desk.close()

"""A person refiles a photo after checking its label: sets its eye (:func:`set_eyes`), or moves it to another
patient's visit (:func:`move_photos`): the answers to a laterality mismatch or an identity conflict.

Why: the intake never changes a stated eye (a label the photo contradicts is flagged, "check the label"), and a copy
of the photo named with the other eye is refused as an identity conflict. Without this, the answer to "check the
label" had nowhere to go. :func:`set_eyes` records it: the photo is filed under the eye given, the report's note
says who set it, when, why, what was stated and what the photo showed (information, no longer a warning), and an
``eye_set`` event keeps the trail. The intake's own findings stay as they were, for the audit.

Several photos are set in one transaction, so that swapping a visit's two eyes never leaves a version with both
photos under one eye. The visit then gets a new report version from the worker; a sign-off made before is no longer
taken to cover the photo (:attr:`screening.review.visits.Visit.awaiting_review`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screening.claims import Claimer
from screening.db import repository as repo
from screening.db import tallies
from screening.db.models import ClaimKind, Image, ImageState, utcnow
from screening.db.session import session_scope
from screening.findings import shown_name
from screening.report import EYE_NAMES
from screening.review.visits import FUTURE_TOLERANCE, REVIEWER_MAX_CHARS, ReviewError, clean_text
from training.common import MAX_ID_LENGTH, is_safe_id

REASON_MAX_CHARS = 500
CLAIM_WAIT_S = 30.0  # a worker's version of a visit takes seconds; longer, and the refiling is refused: try again
# At or above this probability of the other eye, setting an eye takes ``against_photo``: the commonest cause is a
# mistyped image id, which would file two photos under one eye and leave the other "not received".
SURE = 0.9
_SOURCE_WORDS = {"name": "the file name", "sidecar": "the sidecar", "dicom": "the DICOM laterality tag",
                 "image": "the photo itself (no eye was stated)", "staff": "a person"}


@dataclass(frozen=True)
class EyeSet:
    """One photo's eye as set: the visit it belongs to, the eye before and after, and the report's note."""

    image_id: int
    exam_id: int
    before: str
    after: str
    note: str
    photo_reads: str | None = None  # the eye the laterality check read from the photo, where it read one
    photo_confidence: float | None = None

    @property
    def contradicted(self) -> bool:
        """The photo reads as the other eye than the one set (a mistyped image id, or a photo the check misread):
        the command says so, so that the person looks again."""
        return self.photo_reads is not None and self.photo_reads != self.after

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _photo_reading(image: Image) -> str:
    if image.predicted_eye not in EYE_NAMES or image.eye_confidence is None:
        return "the photo was not read for its eye"
    return (f"the photo reads as the {EYE_NAMES[image.predicted_eye].lower()} "
            f"({image.eye_confidence:.0%} sure)")


def _storable(image: Image | None, image_id: int) -> Image:
    """The image, if it is a photo stored in a visit; else why not, and what to do."""
    if image is None:
        raise ReviewError(f"there is no image {image_id}: `dr-screen review show VISIT` lists a visit's images")
    if image.state == ImageState.RECEIVED:
        raise ReviewError(f"image {image_id} is still being graded; refile it once its report is out")
    if image.state in (ImageState.REJECTED, ImageState.FAILED) or image.exam_id is None:
        raise ReviewError(f"image {image_id} is not in a visit (it was {image.state}: {image.error_code or 'no code'}); "
                          "drop the file into the inbox again, named with the right patient, eye and date")
    if image.result is None and image.gradable is not False:
        raise ReviewError(f"image {image_id} has no stored result or gradability verdict, so no report shows it")
    return image


def _check_photo(image: Image, eye: str, against_photo: bool) -> None:
    """Refuse an eye the photo reads as the other one with at least :data:`SURE`, unless ``against_photo``."""
    if (not against_photo and image.predicted_eye in EYE_NAMES and image.predicted_eye != eye
            and (image.eye_confidence or 0.0) >= SURE):
        raise ReviewError(f"image {image.id}: the photo reads as the {EYE_NAMES[image.predicted_eye].lower()} "
                          f"({image.eye_confidence:.0%} sure), not the {EYE_NAMES[eye].lower()}. Check the image id "
                          "(`dr-screen review show VISIT`); if the label you checked says so all the same (a camera that "
                          "mirrors photos), add --against-photo")


def set_eyes(session: Session, eyes: Sequence[tuple[int, str]], reviewer: str, reason: str,
             now: datetime | None = None, against_photo: bool = False) -> list[EyeSet]:
    """Set each ``(image id, eye)`` of ``eyes`` (eye ``R`` or ``L``) as checked by ``reviewer`` for ``reason``, in
    the caller's transaction (nothing is committed here). All or none: a problem with any photo raises
    :class:`ReviewError` naming it before anything changes. An eye equal to the filed one is a confirmation (the
    warning goes, the note says who confirmed it); one already set by a person to that eye is refused (nothing
    to do)."""
    name, why = _names(reviewer, reason)
    if not eyes:
        raise ReviewError("no photo given: write IMAGE=EYE, e.g. 12=L (`dr-screen review show VISIT` lists image ids)")
    seen: set[int] = set()
    images: list[tuple[Image, str]] = []
    for image_id, eye in eyes:
        if image_id in seen:
            raise ReviewError(f"image {image_id} is given twice; give each photo once")
        seen.add(image_id)
        if eye not in EYE_NAMES:
            raise ReviewError(f"image {image_id}: {eye!r} is not an eye; write R or L")
        image = _storable(session.get(Image, image_id), image_id)
        _check_photo(image, eye, against_photo)
        if image.eye == eye and image.eye_source == "staff":
            raise ReviewError(f"image {image_id} is already filed as the {EYE_NAMES[eye].lower()}, set by a person; "
                              "nothing to change")
        images.append((image, eye))
    at = now or utcnow()
    day = at.astimezone().strftime("%Y-%m-%d")
    out: list[EyeSet] = []
    for image, eye in images:
        out.append(_set_eye(session, image, eye, name, why, day, at))
    return out


def _set_eye(session: Session, image: Image, eye: str, name: str, why: str, day: str, at: datetime,
             before: str | None = None) -> EyeSet:
    """Record ``eye`` as set by ``name`` on one photo (``before``: the eye it was filed under, when the caller has
    already changed it)."""
    before = before or image.eye or "?"
    stated = f"{EYE_NAMES.get(before, 'no eye').lower()} from {_SOURCE_WORDS.get(image.eye_source or '', 'unknown')}"
    if before == eye:
        note = (f"Eye confirmed as the {EYE_NAMES[eye].lower()} by {name} on {day} ({why}); "
                f"{_photo_reading(image)}.")
        message = f"eye {eye} confirmed by {name}: {why}"
    else:
        note = (f"Eye set to the {EYE_NAMES[eye].lower()} by {name} on {day} ({why}); it was filed as the "
                f"{stated}, and {_photo_reading(image)}.")
        message = f"eye {before} -> {eye} by {name}: {why}"
    assert image.exam_id is not None
    repo.set_eye(session, image, eye, note, message, at)
    reads = image.predicted_eye if image.predicted_eye in EYE_NAMES and image.eye_confidence is not None else None
    return EyeSet(image.id, image.exam_id, before, eye, note, reads, image.eye_confidence if reads else None)


@dataclass(frozen=True)
class Moved:
    """One photo moved: from which visit to which, under which eye."""

    image_id: int
    from_exam: int
    to_exam: int
    eye: str
    emptied: bool  # the visit it left has no photo left (its next version says so)
    new_patient: bool = False  # the patient id was not in the database before (a typo makes a new patient)


def _names(reviewer: str, reason: str) -> tuple[str, str]:
    name = clean_text(reviewer, "the name of the person who checked the label", REVIEWER_MAX_CHARS, required=True,
                      hint="give the name it is recorded in")
    why = clean_text(reason, "the reason (what the label was checked against)", REASON_MAX_CHARS, required=True,
                     hint="say what the label was checked against, e.g. 'camera worklist'")
    assert name is not None and why is not None
    return name, why


def move_photos(session: Session, image_ids: Sequence[int], patient: str, exam_date: date | None, eye: str | None,
                reviewer: str, reason: str, now: datetime | None = None, against_photo: bool = False) -> list[Moved]:
    """File each photo of ``image_ids`` in ``patient``'s visit of ``exam_date`` (None: the date of the visit it is
    in now), under ``eye`` (None: the eye it is filed under now), as checked by ``reviewer`` for ``reason``: a photo
    stored under the wrong patient. In the caller's transaction; all or none (:class:`ReviewError` names the
    problem). The photo's section of its new visit's report says it was moved there, by whom, when and why, without
    naming the other patient; the reports of the visit it left say that a photo shown in earlier versions belonged to
    another patient and was moved (a visit left without photos gets a version saying so). The audit's tallies
    of the visits involved are recomputed (a visit may have lost its only photo)."""
    name, why = _names(reviewer, reason)
    code = (patient or "").strip()
    if not is_safe_id(code):
        raise ReviewError(f"{patient!r} is not a patient id: letters, digits, '-' and '_' only, at most {MAX_ID_LENGTH}, "
                          "as in the file names")
    if exam_date is not None and exam_date > (datetime.now(timezone.utc) + FUTURE_TOLERANCE).date():
        raise ReviewError(f"the exam date {exam_date.isoformat()} is in the future; give the visit's date")
    if eye is not None and eye not in EYE_NAMES:
        raise ReviewError(f"{eye!r} is not an eye; write R or L")
    if not image_ids:
        raise ReviewError("no photo given (`dr-screen review show VISIT` lists a visit's image ids)")
    if len(set(image_ids)) != len(image_ids):
        raise ReviewError("a photo is given twice; give each photo once")
    images = [_storable(session.get(Image, i), i) for i in image_ids]
    for image in images:
        if eye is not None:
            _check_photo(image, eye, against_photo)
    at = now or utcnow()
    day = at.astimezone().strftime("%Y-%m-%d")
    target_patient = repo.find_patient(session, code)
    for image in images:
        assert image.exam is not None
        when = exam_date or image.exam.exam_date
        if target_patient is not None and image.exam.patient_id == target_patient.id and image.exam.exam_date == when:
            raise ReviewError(f"image {image.id} is already in that visit"
                              + ("; `dr-screen review eye` sets its eye" if eye is not None else ""))
    patient_row = target_patient or repo.get_or_create_patient(session, code)
    out: list[Moved] = []
    for image in images:
        left = image.exam
        assert left is not None
        to = repo.get_or_create_exam(session, patient_row, exam_date or left.exam_date)
        new_eye = eye or image.eye or "?"
        note = f"Filed in this visit by {name} on {day} ({why}); it had been stored under another visit."
        left_note = (f"A photograph shown in earlier versions of this report ({shown_name(image)}) is not this "
                     f"visit's: {name} moved it to another visit on {day} ({why}). Do not act on those versions.")
        if left.filing_note and left.filing_note not in left_note:
            left_note = f"{left.filing_note} {left_note}"
        if to.filing_note:  # a photo moved (back) into a visit that said one of its photos was not its own
            joined = (f"Then {name} moved a photograph into this visit on {day} ({why}): the photographs shown in "
                      "this version are the ones filed in it now.")
            if joined not in to.filing_note:
                to.filing_note = f"{to.filing_note} {joined}"
        message = f"image moved from visit {left.id} to visit {to.id}" + (
            f", eye {image.eye} -> {new_eye}" if new_eye != image.eye else "") + f" by {name}: {why}"
        from_id, old_eye = left.id, image.eye
        repo.move_image(session, image, to, new_eye, note, left_note, message, at)
        if eye is not None:  # the eye was checked too: said as `review eye` says it, and no longer "in doubt"
            _set_eye(session, image, eye, name, why, day, at, before=old_eye)
        session.flush()
        emptied = session.scalar(select(Image.id).where(Image.exam_id == from_id).limit(1)) is None
        out.append(Moved(image.id, from_id, to.id, new_eye, emptied, target_patient is None))
    tallies.recount_exams(session, [m.from_exam for m in out] + [m.to_exam for m in out])
    return out


T = TypeVar("T")


def under_visit_claims(factory: sessionmaker[Session], claims: Claimer, exam_ids: Iterable[int],
                       work: Callable[[Session], T], wait_s: float = CLAIM_WAIT_S) -> T:
    """Run ``work`` (a refiling: :func:`set_eyes`, :func:`move_photos`) in one transaction under the report claims of
    the visits it touches, taken as a worker takes them: a worker making a version of one of them finishes first, and
    the change lands between two versions (the next one shows it). Raises :class:`ReviewError` when a worker has held
    a claim for over ``wait_s`` (nothing was changed); ``work``'s own refusals pass through. The command line and the
    review page both refile through here; the claims are released afterwards."""
    keys = [str(e) for e in sorted(set(exam_ids))]
    taken: list[str] = []
    try:
        deadline = time.monotonic() + wait_s
        for key in keys:
            while not claims.take(ClaimKind.VISIT, key):
                if time.monotonic() > deadline:
                    raise ReviewError(f"visit {key}: a worker has been writing a version of its report for over "
                                      f"{wait_s:.0f} s; nothing was changed. Try again in a minute")
                time.sleep(0.5)
            taken.append(key)
        with session_scope(factory) as session:
            for key in keys:
                claims.hold(session, ClaimKind.VISIT, key)
            return work(session)
    finally:
        claims.release(ClaimKind.VISIT, taken)


__all__ = ["CLAIM_WAIT_S", "REASON_MAX_CHARS", "EyeSet", "Moved", "move_photos", "set_eyes", "under_visit_claims"]

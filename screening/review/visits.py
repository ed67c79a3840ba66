"""The clinician's sign-off of a visit: what awaits review, what the model said, and recording a
confirmation or a correction beside (never over) the model's results.

A sign-off covers every eye the visit's report shows (each eye's result, chosen from its photos as the report
does). Each eye is either gradable, with the grader's DR grade and DME risk, or ungradable; the visit gets the
grader's referral outcome. A photo the worker found ungradable is shown too: the model's answer for it is
"ungradable" (no grade), and the model's referral follows ``[screening] ungradable_rule``. The command line, the CSV import and the review page all record through
:func:`sign_off`, so the same rules hold everywhere.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from screening.db import reviews as rrepo
from screening.db.models import Drop, Exam, Image, Patient, Review, ReviewOutcome, ReviewSource, ReviewUser
from screening.findings import shown_name, stored_finding
from screening.rejection import RejectReason
from screening.report import (
    EYE_NAMES,
    NO_GRADE_LEVELS,
    REFER_LEVELS,
    REFERRAL_LEVELS,
    Caution,
    EyeFinding,
    EyeResultRule,
    EyeReview,
    Referral,
    ReviewNote,
    UngradableRule,
    eye_result,
    referral_recommendation,
    visit_cautions,
)
from training.common import DME_GRADES, DR_GRADES

REVIEWER_MAX_CHARS = 120
COMMENT_MAX_CHARS = 2000
FUTURE_TOLERANCE = timedelta(minutes=5)  # clock skew between the grading centre and this machine
# What a grader may choose as the referral ('no_images' is for visits without photos, which are never reviewed).
GRADER_REFERRALS = tuple(k for k in REFERRAL_LEVELS if k != "no_images")


class ReviewError(ValueError):
    """A sign-off that cannot be recorded: the message says what was wrong and what to do. ``column``: the
    grading CSV's column the problem lies in, where it is one (an import names the line and column)."""

    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.column = column


# --------------------------------------------------------------------------------------------- visits


NOT_GRADED = "not graded"  # the model version of a visit whose photos were all ungradable (no grading model ran)


def changed_at(graded_at: datetime, refiled_at: datetime | None) -> datetime:
    """When a photo last changed as a sign-off sees it: graded, or its eye set by a person since (a sign-off before
    that answered for the eye it was filed under then)."""
    return graded_at if refiled_at is None else max(graded_at, refiled_at)


def graded_time(result_at: datetime | None, stored_at: datetime | None, updated_at: datetime) -> datetime:
    """When a shown photo joined its visit: its result was stored, or (ungradable, no result) its verdict was."""
    return result_at if result_at is not None else stored_at or updated_at


def covers(signed_at: datetime, answered: Collection[tuple[int, str]], shown: Collection[tuple[int, str, datetime]],
           refiled_at: datetime | None) -> bool:
    """Whether a sign-off recorded at ``signed_at`` that answered for ``answered`` (image id, eye) covers a visit that
    shows ``shown`` (image id, eye, :func:`changed_at`) and was last refiled at ``refiled_at``: the review queue's
    rule, one owner for :attr:`Visit.awaiting_review` and the audit's :class:`VisitOutline`. Not when an eye shown
    has no answer (or the reverse), a photo it answered for is no longer shown under that eye (set to the other eye,
    or moved), a photo it saw was moved out after it, or a shown photo was graded or refiled after it."""
    if {eye for _, eye in answered} != {eye for _, eye, _ in shown}:
        return False
    if not set(answered) <= {(image_id, eye) for image_id, eye, _ in shown}:
        return False
    if refiled_at is not None and refiled_at > signed_at:
        return False
    return not any(when > signed_at for _, _, when in shown)


@dataclass(frozen=True)
class VisitField:
    """One photograph (field) of an eye: the model's finding for it (graded, or ungradable with its reasons)."""

    image_id: int
    source_name: str
    finding: EyeFinding
    model_version: str | None  # None: ungradable, the grading model did not run on it
    checkpoint_sha256: str | None
    graded_at: datetime  # when its result (or its ungradable verdict) was stored: when it joined the visit
    received_at: datetime  # when the photo arrived (the audit's date basis)
    refiled_at: datetime | None = None  # when a person set its eye (`dr-screen review eye`)

    @property
    def changed_at(self) -> datetime:
        return changed_at(self.graded_at, self.refiled_at)

    @property
    def model_label(self) -> str:
        return self.model_version or "gradability check: ungradable"


@dataclass(frozen=True)
class VisitEye:
    """One eye of a visit as the report shows it: every graded field, and the one that gives the eye's result
    (``screening.report.eye_result``, by the ``[screening] eye_result`` rule). A sign-off answers for the eye."""

    eye: str
    fields: tuple[VisitField, ...]  # in arrival order
    result: VisitField

    @property
    def name(self) -> str:
        return EYE_NAMES[self.eye]

    @property
    def finding(self) -> EyeFinding:
        return self.result.finding

    @property
    def image_id(self) -> int:
        """The field whose result stands for the eye (what a sign-off records it reviewed)."""
        return self.result.image_id

    @property
    def model_answer(self) -> EyeReview:
        f = self.finding
        return EyeReview(f.eye, f.gradable, f.dr_grade, f.dme_grade)


@dataclass(frozen=True)
class Visit:
    exam_id: int
    patient_code: str
    exam_date: date
    eyes: tuple[VisitEye, ...]  # right eye first
    model_referral: Referral
    current_review: Review | None
    first_report_at: datetime | None
    eye_result_rule: EyeResultRule = "worst"
    ungradable_rule: UngradableRule = "recall"
    filing_note: str | None = None  # a person moved a photo out of this visit (exams.filing_note)
    conflicts: tuple[int, ...] = ()  # photos a copy of which was refused as an identity conflict, not refiled since
    refiled_at: datetime | None = None  # a person last moved a photo out of this visit (exams.refiled_at)

    def eye(self, code: str) -> VisitEye | None:
        return next((e for e in self.eyes if e.eye == code), None)

    @property
    def fields(self) -> tuple[VisitField, ...]:
        return tuple(f for e in self.eyes for f in e.fields)

    @property
    def cautions(self) -> list[Caution]:
        """What the model's recommendation rests on (an eye missing, an eye label in doubt), as the report says it."""
        cautions = visit_cautions([f.finding for f in self.fields], self.eye_result_rule)
        if self.conflicts:
            images = ", ".join(f"image {i}" for i in self.conflicts)
            cautions.append(Caution(
                "identity conflict",
                f"A copy of a photo of this visit ({images}) was dropped again named as another patient or the other "
                "eye, and refused: one of the two names is wrong. Check the label before acting on this visit; it cannot "
                "be signed off until staff record the answer with `dr-screen review eye` or `dr-screen review move` "
                "(README).", "conflict"))
        return cautions

    @property
    def image_ids(self) -> dict[str, int]:
        """Per eye, the field that gives the eye's result."""
        return {e.eye: e.image_id for e in self.eyes}

    @property
    def field_ids(self) -> frozenset[int]:
        """Every graded photograph of the visit (what a grader saw on the page)."""
        return frozenset(f.image_id for f in self.fields)

    @property
    def field_eyes(self) -> frozenset[tuple[int, str]]:
        """Every graded photograph with the eye it is filed under (a person may set a photo's eye while a grader
        has the visit open: :func:`check_unchanged`)."""
        return frozenset((f.image_id, e.eye) for e in self.eyes for f in e.fields)

    @property
    def field_eye_keys(self) -> str:
        """:attr:`field_eyes` as the review page's form sends them back: ``31R,32L``."""
        return ",".join(f"{i}{eye}" for i, eye in sorted(self.field_eyes))

    @property
    def awaiting_review(self) -> bool:
        """No sign-off yet, or one that does not cover the visit as it is now: an eye it did not answer for, or
        a photograph graded after it was recorded (a new field, a second eye) or whose eye a person set since."""
        r = self.current_review
        return r is None or not covers(r.created_at, [(e.image_id, e.eye) for e in r.eyes],
                                       [(f.image_id, e.eye, f.changed_at) for e in self.eyes for f in e.fields],
                                       self.refiled_at)

    @property
    def reopened(self) -> Review | None:
        """The sign-off a photograph graded after it reopened (the visit awaits review again), else None. Its
        answers and referral are where the next review starts: a new field must not silently undo them."""
        r = self.current_review
        return r if r is not None and self.awaiting_review else None

    @property
    def new_since_review(self) -> tuple[VisitField, ...]:
        """The photographs graded, or whose eye was set, after the current sign-off (none when there is none)."""
        r = self.current_review
        return () if r is None else tuple(f for f in self.fields if f.changed_at > r.created_at)

    @property
    def queue_level(self) -> str:
        """What the review queue sorts the visit by: the model's referral, or the reopened sign-off's when that was a
        referral to ophthalmology more urgent than the model's (a visit a grader referred urgently stays ahead of
        routine ones when a photo arrives after the sign-off)."""
        earlier = self.reopened
        model = self.model_referral.level
        if earlier is None or earlier.referral not in REFER_LEVELS or (
                REFERRAL_LEVELS[earlier.referral].rank <= REFERRAL_LEVELS[model].rank):
            return model  # an earlier 'ungradable: recall' is what a new photograph answers, not a referral to keep
        return earlier.referral

    @property
    def referable(self) -> bool:
        return self.model_referral.level in REFER_LEVELS

    @property
    def ready_at(self) -> datetime:
        """Since when the visit could be reviewed: its first report, else its first graded photo; a reopened visit
        since the first photograph graded after its sign-off (it waits from then, not from its first draft)."""
        if self.reopened is not None and (new := self.new_since_review):
            return min(f.changed_at for f in new)
        return self.first_report_at or min(f.graded_at for f in self.fields)

    @property
    def newest(self) -> VisitField:
        return max(self.fields, key=lambda f: (f.graded_at, f.image_id))

    @property
    def newest_graded(self) -> VisitField | None:
        """The newest field the grading model graded (None when every photo was ungradable)."""
        graded = [f for f in self.fields if f.model_version is not None]
        return max(graded, key=lambda f: (f.graded_at, f.image_id)) if graded else None

    @property
    def model_version(self) -> str:
        """The version that graded the visit's newest graded photo; :data:`NOT_GRADED` when none was graded."""
        graded = self.newest_graded
        return graded.model_version or NOT_GRADED if graded is not None else NOT_GRADED

    def report_findings(self) -> list[EyeFinding]:
        """Every field's finding as the report lists them (right eye first, arrival order within an eye)."""
        return [f.finding for f in self.fields]


# Exam ids per statement when visits are loaded by id: PostgreSQL takes at most 65,535 parameters a statement.
IN_LIST_CHUNK = 10_000


def _field(g: rrepo.GradedField) -> VisitField:
    finding = stored_finding(g.image, g.result)
    if finding is None:  # graded_fields selects only photos a report shows
        raise LookupError(f"image {g.image.id} is neither graded nor stored as ungradable")
    if g.result is not None:
        return VisitField(image_id=g.image.id, source_name=shown_name(g.image), finding=finding,
                          model_version=g.result.model_version, checkpoint_sha256=g.result.checkpoint_sha256,
                          graded_at=graded_time(g.result.created_at, g.image.stored_at, g.image.updated_at),
                          received_at=g.image.received_at, refiled_at=g.image.refiled_at)
    return VisitField(image_id=g.image.id, source_name=shown_name(g.image), finding=finding, model_version=None,
                      checkpoint_sha256=None, graded_at=graded_time(None, g.image.stored_at, g.image.updated_at),
                      received_at=g.image.received_at, refiled_at=g.image.refiled_at)


def _conflicts(session: Session, exam_ids: list[int] | None) -> dict[int, tuple[int, ...]]:
    """Per exam, its photos a copy of which was refused as an identity conflict after the photo was last refiled by
    a person (a conflict `review eye` or `review move` answered is not shown again)."""
    stmt = (select(Image.exam_id, Image.id).join(Drop, Drop.image_id == Image.id)
            .where(Drop.reason_code == RejectReason.IDENTITY_CONFLICT.value, Image.exam_id.is_not(None),
                   or_(Image.refiled_at.is_(None), Drop.received_at > Image.refiled_at))
            .distinct())
    if exam_ids is not None:
        stmt = stmt.where(Image.exam_id.in_(exam_ids))
    out: dict[int, list[int]] = {}
    for exam_id, image_id in session.execute(stmt).all():
        if exam_id is not None:
            out.setdefault(exam_id, []).append(image_id)
    return {e: tuple(sorted(i)) for e, i in out.items()}


def load_visits(session: Session, exam_ids: Iterable[int] | None = None, rule: EyeResultRule = "worst",
                ungradable_rule: UngradableRule = "recall") -> list[Visit]:
    """Visits with at least one photo the report shows (of ``exam_ids``, or all), ordered by exam id; each eye's
    result is chosen by ``rule`` (the worker's ``[screening] eye_result``), and the model's referral for an
    ungradable eye by ``ungradable_rule`` (``[screening] ungradable_rule``)."""
    ids = None if exam_ids is None else sorted(set(exam_ids))
    if ids is not None and len(ids) > IN_LIST_CHUNK:  # a server refuses statements with too many parameters
        return [v for k in range(0, len(ids), IN_LIST_CHUNK)
                for v in load_visits(session, ids[k:k + IN_LIST_CHUNK], rule, ungradable_rule)]
    graded = rrepo.graded_fields(session, ids)
    if not graded:
        return []
    reviews = rrepo.current_reviews(session, ids)  # all (None) or the few asked for: never one parameter per visit
    first_reports = rrepo.first_report_times(session, ids)
    conflicts = _conflicts(session, ids)
    stmt = (select(Exam.id, Exam.exam_date, Patient.code, Exam.filing_note, Exam.refiled_at)
            .join(Patient, Patient.id == Exam.patient_id))
    if ids is not None:
        stmt = stmt.where(Exam.id.in_(ids))
    rows = [row for row in session.execute(stmt).all() if row[0] in graded]
    visits = []
    for exam_id, exam_date, code, filing_note, refiled_at in sorted(rows, key=lambda row: row[0]):
        eyes = []
        for eye, graded_fields in graded[exam_id].items():
            fields = tuple(_field(g) for g in graded_fields)
            chosen = eye_result([f.finding for f in fields], rule)
            eyes.append(VisitEye(eye, fields, next(f for f in fields if f.finding is chosen)))
        visits.append(Visit(
            exam_id=exam_id, patient_code=code, exam_date=exam_date, eyes=tuple(eyes),
            model_referral=referral_recommendation([e.finding for e in eyes], ungradable_rule),
            current_review=reviews.get(exam_id), first_report_at=first_reports.get(exam_id), eye_result_rule=rule,
            ungradable_rule=ungradable_rule, filing_note=filing_note, conflicts=conflicts.get(exam_id, ()),
            refiled_at=refiled_at,
        ))
    return visits


def load_visit(session: Session, exam_id: int, rule: EyeResultRule = "worst",
               ungradable_rule: UngradableRule = "recall") -> Visit:
    found = load_visits(session, [exam_id], rule, ungradable_rule)
    if found:
        return found[0]
    exam = session.get(Exam, exam_id)
    if exam is None:
        raise ReviewError(f"there is no visit {exam_id}; `dr-screen review list` shows the visits and their numbers")
    if exam.filing_note:  # every photo was moved to other visits: nothing to review, and the reason is recorded
        raise ReviewError(f"visit {exam_id} has no photo to review: {exam.filing_note}")
    raise ReviewError(f"visit {exam_id} has no graded photo yet: there is nothing to review")


@dataclass(frozen=True)
class VisitOutline:
    """A visit reduced to what decides whether a sign-off covers it now (:func:`covers`, as
    :attr:`Visit.awaiting_review` asks it), plus the model versions that graded its photos, when they arrived and its
    first report. Read as columns (:func:`load_outlines`): the audit's agreement asks it of the signed-off visits
    the review queue's SQL prefilter cannot settle, where building each :class:`Visit` (findings, referral,
    cautions) cost 30 s per 50,000 visits."""

    exam_id: int
    photos: tuple[rrepo.ShownPhotoRow, ...]
    refiled_at: datetime | None
    first_report_at: datetime | None

    def covered_by(self, signed_at: datetime, answered: Iterable[tuple[int, str]]) -> bool:
        return covers(signed_at, list(answered),
                      [(p.image_id, p.eye, changed_at(graded_time(p.result_at, p.stored_at, p.updated_at), p.refiled_at))
                       for p in self.photos], self.refiled_at)


def load_outlines(session: Session, exam_ids: Iterable[int]) -> list[VisitOutline]:
    """:class:`VisitOutline` of the visits of ``exam_ids`` with a photo the report shows (those :func:`load_visits`
    gives), ordered by exam id, :data:`IN_LIST_CHUNK` ids a statement."""
    ids = sorted(set(exam_ids))
    out: list[VisitOutline] = []
    for k in range(0, len(ids), IN_LIST_CHUNK):
        chunk = ids[k:k + IN_LIST_CHUNK]
        photos: dict[int, list[rrepo.ShownPhotoRow]] = {}
        for p in rrepo.shown_photo_rows(session, chunk):
            photos.setdefault(p.exam_id, []).append(p)
        if not photos:
            continue
        first_reports = rrepo.first_report_times(session, chunk)
        refiled = {i: at for i, at in session.execute(select(Exam.id, Exam.refiled_at).where(Exam.id.in_(chunk))).all()}
        out += [VisitOutline(exam_id, tuple(photos[exam_id]), refiled.get(exam_id), first_reports.get(exam_id))
                for exam_id in sorted(photos)]
    return out


def review_queue(session: Session, rule: EyeResultRule = "worst", ungradable_rule: UngradableRule = "recall") -> list[Visit]:
    """Visits awaiting review, the most urgent first (urgent, then within weeks, routine, ungradable...) by
    :attr:`Visit.queue_level` (the model's referral, or a reopened sign-off's when more urgent), each level oldest
    first (by :attr:`Visit.ready_at`): a proliferative eye to be seen within 2 weeks waited behind every older
    routine referral."""
    candidates = rrepo.exams_maybe_awaiting_review(session)
    waiting = [v for v in load_visits(session, candidates, rule, ungradable_rule) if v.awaiting_review]
    return sorted(waiting, key=lambda v: (-REFERRAL_LEVELS[v.queue_level].rank, v.ready_at, v.exam_id))


def recently_reviewed(session: Session, limit: int = 50, rule: EyeResultRule = "worst",
                      ungradable_rule: UngradableRule = "recall") -> list[Visit]:
    """Visits whose current sign-off covers their photos, most recently signed off first (``limit`` of them): read a
    page of the most recently signed-off visits at a time, not every visit."""
    done: list[Visit] = []
    page = max(2 * limit, 50)
    offset = 0
    while len(done) < limit:
        ids = rrepo.exams_by_latest_review(session, offset, page)
        if not ids:
            break
        done += [v for v in load_visits(session, ids, rule, ungradable_rule) if not v.awaiting_review]
        offset += page
    return sorted(done, key=lambda v: -(v.current_review.id if v.current_review else 0))[:limit]


# ------------------------------------------------------------------------------------------- sign-off


def referral_from_answers(answers: Iterable[EyeReview]) -> str:
    """The referral the grader's own answers imply: the report's worse-eye rule over the gradable eyes, and at
    least a recall when an eye could not be graded."""
    answers = list(answers)
    gradable = [a for a in answers if a.gradable]
    if not gradable:
        return "ungradable"
    findings = []
    for a in gradable:
        assert a.dr_grade is not None and a.dme_grade is not None
        findings.append(EyeFinding(
            eye=a.eye, source_name="", photo_path=None, overlay_path=None, dr_cam_path=None, dme_cam_path=None,
            dr_grade=a.dr_grade, dr_probs=[float(i == a.dr_grade) for i in range(len(DR_GRADES))],
            dme_grade=a.dme_grade, dme_probs=[float(i == a.dme_grade) for i in range(len(DME_GRADES))],
            referable_score=0.0, referable=False,  # the grader's grades alone decide
        ))
    level = referral_recommendation(findings).level
    if len(gradable) < len(answers) and REFERRAL_LEVELS[level].rank < REFERRAL_LEVELS["ungradable"].rank:
        return "ungradable"
    return level


def clean_text(value: str | None, what: str, max_chars: int, *, required: bool, multiline: bool = False,
               column: str | None = None, hint: str = "give the name the sign-off is made in") -> str | None:
    """Strip a free-text field and refuse control characters (they would corrupt exports and logs). ``hint``: what
    to do about an empty required field."""
    text = (value or "").strip()
    if not text:
        if required:
            raise ReviewError(f"{what} is empty: {hint}", column)
        return None
    allowed = {"\n", "\r", "\t"} if multiline else set()
    if any(unicodedata.category(c) == "Cc" and c not in allowed for c in text):
        raise ReviewError(f"{what} contains control characters; type it as plain text", column)
    if len(text) > max_chars:
        raise ReviewError(f"{what} is {len(text)} characters long; at most {max_chars} are kept", column)
    return text


_UNSET: object = object()


def check_unchanged(visit: Visit, seen_fields: Collection[int] | None,
                    seen_eyes: Collection[tuple[int, str]] | None = None) -> None:
    """Refuse a sign-off of ``visit`` made from a page that showed other photographs (``seen_fields``; None: not
    known) than the visit has now: a new photo was graded while it was open; or the same photographs under other
    eyes (``seen_eyes``, image id and eye; None: not known): a person set a photo's eye while it was open, and the
    grader's answer for one eye would land on another photo."""
    if seen_fields is not None and frozenset(seen_fields) != visit.field_ids:
        raise ReviewError(f"visit {visit.exam_id} changed while it was open: a new photo was graded, or one was moved "
                          "to another visit. Look at it, then sign off again")
    if seen_eyes is not None and frozenset(seen_eyes) != visit.field_eyes:
        raise ReviewError(f"visit {visit.exam_id} changed while it was open: a photo's eye was set. Look at it, then "
                          "sign off again")


def sign_off(
    session: Session,
    exam_id: int,
    *,
    reviewer: str,
    source: str,
    answers: Sequence[EyeReview] | None = None,
    referral: str | None = None,
    comment: str | None = None,
    user: ReviewUser | None = None,
    reviewed_at: datetime | None = None,
    seen_fields: Collection[int] | None = None,
    seen_eyes: Collection[tuple[int, str]] | None = None,
    seen_review_id: int | None | object = _UNSET,
    rule: EyeResultRule = "worst",
    ungradable_rule: UngradableRule = "recall",
) -> Review:
    """Record a confirmation (``answers=None``: the model's grades and its referral) or a correction.

    ``answers``: one :class:`EyeReview` per eye the visit's report shows (for the eye, whatever its number of
    fields; ``rule`` decides which field's result is the model's answer, as on the report; an eye the worker found
    ungradable has "ungradable" as the model's answer, and ``ungradable_rule`` its referral). ``referral``: a key of
    :data:`GRADER_REFERRALS`, or None for the one the answers imply (:func:`referral_from_answers`); a
    referral less urgent than the grader's own grades imply is refused, and so is one less urgent than the referral to
    ophthalmology of the sign-off a new photograph reopened (:attr:`Visit.reopened`) unless the referral is chosen
    and a comment says why (a sign-off's "ungradable: recall" is what the new photograph answers: not kept). ``seen_fields``, ``seen_eyes`` and
    ``seen_review_id`` (the review page sends them) refuse a sign-off of a visit that changed since the grader
    opened it: a new photo, a photo's eye set, or someone else's sign-off. A visit with an open identity conflict
    (:attr:`Visit.conflicts`) is refused too: a copy of one of its photos came named as another patient or eye, and
    a sign-off would put a grader's name to grades that may be someone else's. Flushes, never commits.
    """
    visit = load_visit(session, exam_id, rule, ungradable_rule)
    name = clean_text(reviewer, "the reviewer's name", REVIEWER_MAX_CHARS, required=True, column="reviewer")
    assert name is not None
    note = clean_text(comment, "the comment", COMMENT_MAX_CHARS, required=False, multiline=True, column="comment")
    try:
        source = ReviewSource(source).value
    except ValueError:
        raise ReviewError(f"unknown review source {source!r}; expected one of {[s.value for s in ReviewSource]}") from None
    check_unchanged(visit, seen_fields, seen_eyes)
    if visit.conflicts:
        images = ", ".join(f"image {i}" for i in visit.conflicts)
        raise ReviewError(
            f"visit {exam_id} cannot be signed off while its identity conflict is open: a copy of {images} was dropped "
            "again named as another patient or the other eye, so one of the two names is wrong and these grades may "
            "not be this patient's. Staff answer it first (`dr-screen review eye` confirms or sets the eye, "
            "`dr-screen review move` files the photo under the right patient; README), then sign off")
    current = visit.current_review
    if seen_review_id is not _UNSET and seen_review_id != (current.id if current else None):
        who = f"{current.reviewer} ({current.reviewed_at:%Y-%m-%d %H:%M} UTC)" if current else "nobody"
        raise ReviewError(f"visit {exam_id} was signed off by {who} while it was open; reload it to see that sign-off, "
                          "then confirm or correct again")
    model = {e.eye: e.model_answer for e in visit.eyes}
    if answers is None:
        given = dict(model)
        level = referral or visit.model_referral.level
    else:
        given = {}
        for a in answers:
            if a.eye in given:
                raise ReviewError(f"the {EYE_NAMES[a.eye].lower()} is given twice")
            given[a.eye] = a
        level = referral or referral_from_answers(given.values())
    if missing := [EYE_NAMES[e].lower() for e in model if e not in given]:
        raise ReviewError(f"visit {exam_id}: the review leaves out the {' and '.join(missing)}; give an answer for "
                          "every eye the report shows (mark an eye ungradable if it could not be graded)")
    if extra := [EYE_NAMES[e].lower() for e in given if e not in model]:
        raise ReviewError(f"visit {exam_id} has no graded photo of the {' and '.join(extra)}")
    if level not in GRADER_REFERRALS:
        raise ReviewError(f"unknown referral {level!r}; choose one of {', '.join(GRADER_REFERRALS)}", "referral")
    implied = referral_from_answers(given.values())
    if answers is not None and REFERRAL_LEVELS[level].rank < REFERRAL_LEVELS[implied].rank:
        raise ReviewError(f"the referral '{REFERRAL_LEVELS[level].text}' is less urgent than the grades given imply "
                          f"('{REFERRAL_LEVELS[implied].text}'); choose the referral again, or let it follow the grades",
                          "referral")
    earlier = visit.reopened
    if earlier is not None and earlier.referral in REFER_LEVELS and (
            REFERRAL_LEVELS[level].rank < REFERRAL_LEVELS[earlier.referral].rank) and (referral is None or note is None):
        raise ReviewError(
            f"the sign-off by {earlier.reviewer} ({earlier.reviewed_at:%Y-%m-%d}) recommended "
            f"'{REFERRAL_LEVELS[earlier.referral].text}', and this one would recommend the less urgent "
            f"'{REFERRAL_LEVELS[level].text}' after a photograph was added; to lower it, choose the referral "
            "yourself (not 'follow the grades', nor `review confirm`: `review correct --referral ... --comment ...`, "
            "or the page's referral and comment) and say why in the comment", "referral")
    when = reviewed_at or datetime.now(timezone.utc)
    if when.tzinfo is None:
        raise ReviewError("the review time has no time zone", "reviewed_at")
    if when > datetime.now(timezone.utc) + FUTURE_TOLERANCE:
        raise ReviewError(f"the review time {when:%Y-%m-%d %H:%M} UTC is in the future", "reviewed_at")
    ordered = [given[e.eye] for e in visit.eyes]
    same = all(given[e] == model[e] for e in model) and level == visit.model_referral.level
    exam = session.get(Exam, exam_id)
    assert exam is not None
    return rrepo.add_review(
        session, exam, reviewer=name, source=source,
        outcome=(ReviewOutcome.CONFIRMED if same else ReviewOutcome.CORRECTED).value,
        referral=level, model_referral=visit.model_referral.level, comment=note, user=user, reviewed_at=when,
        eyes=[rrepo.EyeGrades(image_id=visit.image_ids[a.eye], eye=a.eye, gradable=a.gradable, dr_grade=a.dr_grade,
                              dme_grade=a.dme_grade) for a in ordered],
    )


def starting_answers(visit: Visit) -> tuple[dict[str, EyeReview], str | None]:
    """Where a new sign-off of ``visit`` starts (the review page's form, ``review correct``): the current sign-off's
    answers for the eyes it answered, reopened or not (a new photograph must not quietly put the model's back), the
    model's for the others; and the sign-off's referral when the grader chose it (it differs from what its answers
    imply), else None (follow the grades)."""
    answers = {e.eye: e.model_answer for e in visit.eyes}
    current = visit.current_review
    if current is None:
        return answers, None
    earlier = {a.eye: a for a in answers_of(current)}
    # an answer is carried only while the photo it was given for is still filed under its eye: after a person set
    # the eyes of a swapped pair, the right eye's answer belongs to the photo now filed as the left one
    still = {e.eye for e in current.eyes if (e.image_id, e.eye) in visit.field_eyes}
    answers.update({eye: earlier[eye] for eye in answers if eye in earlier and eye in still})
    return answers, (current.referral if current.referral != referral_from_answers(earlier.values()) else None)


def answers_of(review: Review) -> tuple[EyeReview, ...]:
    return tuple(EyeReview(e.eye, e.gradable, e.dr_grade, e.dme_grade) for e in review.eyes)  # type: ignore[arg-type]


def review_note(review: Review) -> ReviewNote:
    """The sign-off as the reviewed report prints it (local time of this machine, like the report's own date)."""
    return ReviewNote(
        reviewer=review.reviewer, reviewed_at=review.reviewed_at.astimezone(), outcome=review.outcome,  # type: ignore[arg-type]
        referral=review.referral, eyes=answers_of(review), comment=review.comment,
        implied=referral_from_answers(answers_of(review)),
    )


__all__ = [
    "COMMENT_MAX_CHARS",
    "GRADER_REFERRALS",
    "NOT_GRADED",
    "NO_GRADE_LEVELS",
    "REVIEWER_MAX_CHARS",
    "ReviewError",
    "Visit",
    "VisitEye",
    "VisitField",
    "VisitOutline",
    "answers_of",
    "clean_text",
    "load_visit",
    "load_outlines",
    "load_visits",
    "recently_reviewed",
    "referral_from_answers",
    "review_note",
    "review_queue",
    "sign_off",
]

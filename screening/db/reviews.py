"""Data access for clinicians' sign-offs (reviews) and the review page's logins.

Like :mod:`screening.db.repository`, every function takes the caller's session and at most flushes; the
caller commits. Reviews are append-only (the database refuses UPDATE and DELETE on them): a visit's
*current* review is simply its row with the highest id, and every earlier one stays as history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, aliased, selectinload
from sqlalchemy.sql.elements import ColumnElement

from screening.db.models import (
    Exam,
    Eye,
    Image,
    ImageState,
    Report,
    Result,
    Review,
    ReviewEye,
    ReviewOutcome,
    ReviewSource,
    ReviewUser,
    utcnow,
)
from screening.db.repository import add_event

EYES = (Eye.RIGHT.value, Eye.LEFT.value)

# Which exams a query is about: their ids, or a query that selects them (the audit's signed-off visits of a period:
# a subquery has no parameter limit and nothing to send, where a year's ids are hundreds of thousands of parameters).
Exams = Sequence[int] | Select[Any]


def _among(exams: Exams) -> Sequence[int] | Select[Any]:
    return exams if isinstance(exams, Select) else list(exams)


@dataclass(frozen=True)
class GradedField:
    """One photograph (field) of an eye as the worker stored it: the image and the model's result for it, or
    ``result`` None for a photo the intake checks found ungradable (its verdict is on the image)."""

    image: Image
    result: Result | None


@dataclass(frozen=True)
class EyeGrades:
    """What the grader said about one photo (the values stored in ``review_eyes``)."""

    image_id: int
    eye: str
    gradable: bool
    dr_grade: int | None
    dme_grade: int | None


# --- the visit's current photos ------------------------------------------------------------------


def graded_fields(session: Session, exam_ids: Iterable[int] | None = None) -> dict[int, dict[str, list[GradedField]]]:
    """Per exam, per eye (``R`` then ``L``), every photo the worker's report shows, in arrival order: each image
    with a result, and each image stored as ungradable (no result; ``images.gradable`` = 0). The eye's result
    is chosen from them by ``screening.report.eye_result``. Exams without any such photo are absent."""
    stmt = (
        select(Image, Result)
        .outerjoin(Result, Result.image_id == Image.id)
        .where(_shown())
        .order_by(Image.exam_id, Image.id)
    )
    if exam_ids is not None:
        stmt = stmt.where(Image.exam_id.in_(list(exam_ids)))
    out: dict[int, dict[str, list[GradedField]]] = {}
    for image, result in session.execute(stmt).all():
        assert image.exam_id is not None and image.eye is not None
        out.setdefault(image.exam_id, {}).setdefault(image.eye, []).append(GradedField(image, result))
    return {exam_id: {e: eyes[e] for e in EYES if e in eyes} for exam_id, eyes in out.items()}


@dataclass(frozen=True)
class ShownPhotoRow:
    """A photo a visit's report shows, reduced to what decides whether a sign-off covers it and which model version
    graded it (the audit's agreement reads these for every signed-off visit; building the visits themselves there
    cost minutes on a year's database)."""

    exam_id: int
    image_id: int
    eye: str
    model_version: str | None  # None: stored ungradable, no grading model ran
    result_at: datetime | None  # when its result was stored (None for an ungradable photo)
    stored_at: datetime | None  # when its ungradable verdict was stored (None: see updated_at)
    updated_at: datetime
    received_at: datetime
    refiled_at: datetime | None


def shown_photo_rows(session: Session, exam_ids: Exams) -> list[ShownPhotoRow]:
    """:class:`ShownPhotoRow` of every photo of ``exam_ids`` that :func:`graded_fields` gives (the same rule), as
    columns rather than objects, in arrival order per exam."""
    stmt = (
        select(Image.exam_id, Image.id, Image.eye, Result.model_version, Result.created_at, Image.stored_at,
               Image.updated_at, Image.received_at, Image.refiled_at)
        .outerjoin(Result, Result.image_id == Image.id)
        .where(_shown(), Image.exam_id.in_(_among(exam_ids)))
        .order_by(Image.exam_id, Image.id)
    )
    out = []
    for exam_id, image_id, eye, version, result_at, stored_at, updated_at, received_at, refiled_at in session.execute(stmt).all():
        assert exam_id is not None and eye is not None  # _shown(): filed under a visit and an eye
        out.append(ShownPhotoRow(exam_id, image_id, eye, version, result_at, stored_at, updated_at, received_at, refiled_at))
    return out


def _shown() -> ColumnElement[bool]:
    """The photos a visit's report shows (as :func:`graded_fields` selects them), given ``Image`` outer-joined with
    ``Result``."""
    ungradable = and_(Image.gradable.is_(False), Image.state.in_([ImageState.DONE.value, ImageState.REPORTED.value]))
    return and_(Image.exam_id.is_not(None), Image.eye.in_(EYES), or_(Result.id.is_not(None), ungradable))


def exams_maybe_awaiting_review(session: Session, exam_ids: Exams | None = None) -> list[int]:
    """The exams that may await review, found in SQL: a photo a report shows and no sign-off; or a current sign-off
    that does not answer for a shown photo's eye, or answered for a photo no longer shown under that eye; or one older
    than a shown photo's result or verdict, a photo's refiling (its eye set, or moved in) or the visit's own refiling
    (a photo moved out). Every visit :attr:`screening.review.visits.Visit.awaiting_review` holds for is among them
    (each of its tests has its counterpart here); the caller applies that rule to these alone. Without this the
    review queue built every visit ever graded each time it was shown: on a year's database (500,000 visits) that
    is minutes and gigabytes for a page staff reload all day. ``exam_ids``: only among these (the audit's
    agreement asks it of the visits signed off in its period)."""
    latest_q = select(Review.exam_id.label("exam_id"), func.max(Review.id).label("review_id")).group_by(Review.exam_id)
    if exam_ids is not None:  # not every visit's latest sign-off: a year's are hundreds of thousands
        latest_q = latest_q.where(Review.exam_id.in_(_among(exam_ids)))
    latest = latest_q.subquery()
    current = aliased(Review)
    signed = current.created_at
    answered_eye = select(ReviewEye.id).where(ReviewEye.review_id == current.id, ReviewEye.eye == Image.eye).exists()
    photos = (
        select(Image.exam_id)
        .outerjoin(Result, Result.image_id == Image.id)
        .join(Exam, Exam.id == Image.exam_id)
        .outerjoin(latest, latest.c.exam_id == Image.exam_id)
        .outerjoin(current, current.id == latest.c.review_id)
        .where(_shown(), or_(
            current.id.is_(None),
            ~answered_eye,
            Result.created_at > signed,
            func.coalesce(Image.stored_at, Image.updated_at) > signed,
            Image.refiled_at > signed,
            Exam.refiled_at > signed,
        ))
    )
    shown = aliased(Image)
    shown_result = aliased(Result)
    still_shown = (
        select(shown.id).outerjoin(shown_result, shown_result.image_id == shown.id)
        .where(shown.id == ReviewEye.image_id, shown.eye == ReviewEye.eye, shown.exam_id == current.exam_id,
               or_(shown_result.id.is_not(None), and_(shown.gradable.is_(False),
                                                     shown.state.in_([ImageState.DONE.value, ImageState.REPORTED.value]))))
        .exists()
    )
    answers = (
        select(current.exam_id)
        .join(latest, latest.c.review_id == current.id)
        .join(ReviewEye, ReviewEye.review_id == current.id)
        .where(~still_shown)
    )
    if exam_ids is not None:
        photos = photos.where(Image.exam_id.in_(_among(exam_ids)))
        answers = answers.where(current.exam_id.in_(_among(exam_ids)))
    found = set(session.scalars(photos)) | set(session.scalars(answers))
    return sorted(exam_id for exam_id in found if exam_id is not None)


def graded_versions(session: Session, exam_ids: Exams, where: Sequence[ColumnElement[bool]] = ()) -> list[tuple[int, str]]:
    """(exam id, model version) for each version that graded a photo of ``exam_ids`` a report shows, with the
    further conditions ``where`` on ``Image`` and ``Result`` (the audit's period and model version)."""
    stmt = (select(Image.exam_id, Result.model_version).join(Result, Result.image_id == Image.id)
            .where(_shown(), Image.exam_id.in_(_among(exam_ids)), *where).distinct())
    return [(exam_id, version) for exam_id, version in session.execute(stmt).all() if exam_id is not None]


def exams_by_latest_review(session: Session, offset: int, limit: int) -> list[int]:
    """Exams with a sign-off, the most recently signed off first (by their current review's id): a page of them."""
    stmt = (select(Review.exam_id).group_by(Review.exam_id).order_by(func.max(Review.id).desc())
            .offset(offset).limit(limit))
    return list(session.scalars(stmt))


def first_report_times(session: Session, exam_ids: Exams | None = None) -> dict[int, datetime]:
    """When each exam's first report (its draft) was made."""
    stmt = select(Report.exam_id, func.min(Report.created_at)).group_by(Report.exam_id)
    if exam_ids is not None:
        stmt = stmt.where(Report.exam_id.in_(_among(exam_ids)))
    return {exam_id: at for exam_id, at in session.execute(stmt).all()}  # min() keeps the column's UTC type


# --- reviews -------------------------------------------------------------------------------------


def add_review(
    session: Session,
    exam: Exam,
    *,
    reviewer: str,
    source: str,
    outcome: str,
    referral: str,
    model_referral: str,
    eyes: Sequence[EyeGrades],
    comment: str | None = None,
    user: ReviewUser | None = None,
    reviewed_at: datetime | None = None,
    created_at: datetime | None = None,
) -> Review:
    """Append a sign-off of ``exam`` with one :class:`EyeGrades` per reviewed eye. Values are checked by
    the caller (:mod:`screening.review`); the database's constraints are the last line of defence."""
    now = created_at or utcnow()
    review = Review(
        exam_id=exam.id,
        reviewer=reviewer,
        user_id=None if user is None else user.id,
        source=ReviewSource(source).value,
        outcome=ReviewOutcome(outcome).value,
        referral=referral,
        model_referral=model_referral,
        comment=comment,
        reviewed_at=reviewed_at or now,
        created_at=now,
    )
    review.eyes = [
        ReviewEye(image_id=e.image_id, eye=Eye(e.eye).value, gradable=e.gradable, dr_grade=e.dr_grade, dme_grade=e.dme_grade)
        for e in eyes
    ]
    session.add(review)
    session.flush()
    add_event(session, "review", f"exam {exam.id}: review {review.id} {review.outcome} ({review.source}), referral {referral}")
    return review


def current_reviews(session: Session, exam_ids: Iterable[int] | None = None) -> dict[int, Review]:
    """Each exam's current review (highest id), eyes loaded."""
    latest = select(func.max(Review.id)).group_by(Review.exam_id)
    if exam_ids is not None:
        latest = latest.where(Review.exam_id.in_(list(exam_ids)))
    stmt = select(Review).where(Review.id.in_(latest)).options(selectinload(Review.eyes))
    return {r.exam_id: r for r in session.scalars(stmt)}


def current_review(session: Session, exam_id: int) -> Review | None:
    return current_reviews(session, [exam_id]).get(exam_id)


def review_history(session: Session, exam_id: int) -> list[Review]:
    """Every sign-off of the exam, newest first (the first is the current one)."""
    stmt = select(Review).where(Review.exam_id == exam_id).order_by(Review.id.desc()).options(selectinload(Review.eyes))
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class SignOffRow:
    """A sign-off as the audit compares it, read as columns: what :class:`Review` holds but its comment and user."""

    id: int
    exam_id: int
    reviewer: str
    outcome: str
    referral: str
    model_referral: str
    reviewed_at: datetime
    created_at: datetime
    eyes: tuple[EyeGrades, ...]


def sign_off_rows(session: Session, exam_ids: Exams) -> list[SignOffRow]:
    """Every sign-off of ``exam_ids``, oldest first, with its eyes: as columns, not an ORM object per review
    and per eye (a year's sign-offs are hundreds of thousands)."""
    ids = _among(exam_ids)
    eyes: dict[int, list[EyeGrades]] = {}
    for review_id, image_id, eye, gradable, dr, dme in session.execute(
            select(ReviewEye.review_id, ReviewEye.image_id, ReviewEye.eye, ReviewEye.gradable, ReviewEye.dr_grade,
                   ReviewEye.dme_grade)
            .join(Review, Review.id == ReviewEye.review_id).where(Review.exam_id.in_(ids))
            .order_by(ReviewEye.review_id, ReviewEye.eye.desc())).all():
        eyes.setdefault(review_id, []).append(EyeGrades(image_id, eye, gradable, dr, dme))
    stmt = (select(Review.id, Review.exam_id, Review.reviewer, Review.outcome, Review.referral, Review.model_referral,
                   Review.reviewed_at, Review.created_at).where(Review.exam_id.in_(ids)).order_by(Review.id))
    return [SignOffRow(*row, eyes=tuple(eyes.get(row[0], ()))) for row in session.execute(stmt).all()]


def exam_reports(session: Session, exam_id: int) -> list[Report]:
    """The exam's rendered versions, newest first."""
    return list(session.scalars(select(Report).where(Report.exam_id == exam_id).order_by(Report.version.desc())))


def report_of_review(session: Session, review_id: int) -> Report | None:
    """The newest version rendered for this sign-off, if any."""
    stmt = select(Report).where(Report.review_id == review_id).order_by(Report.version.desc()).limit(1)
    return session.scalars(stmt).first()


def exams_with_unrendered_review(session: Session) -> list[int]:
    """Exams whose current sign-off has no rendered version (``dr-screen review render``'s candidates: a reviewed
    PDF that failed to render, or a sign-off recorded while the worker was down), in SQL, not one query per visit."""
    latest = select(func.max(Review.id)).group_by(Review.exam_id)
    rendered = select(Report.id).where(Report.review_id == Review.id).exists()
    stmt = select(Review.exam_id).where(Review.id.in_(latest), ~rendered).order_by(Review.exam_id)
    return list(session.scalars(stmt))


# --- review-page logins --------------------------------------------------------------------------


def add_user(session: Session, username: str, display_name: str, password_hash: str) -> ReviewUser:
    """A new login; an existing ``username`` raises IntegrityError on flush."""
    user = ReviewUser(username=username, display_name=display_name, password_hash=password_hash, active=True)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, username: str) -> ReviewUser | None:
    return session.scalars(select(ReviewUser).where(ReviewUser.username == username)).one_or_none()


def list_users(session: Session) -> list[ReviewUser]:
    return list(session.scalars(select(ReviewUser).order_by(ReviewUser.username)))


def count_active_users(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ReviewUser).where(ReviewUser.active.is_(True))) or 0)


__all__ = [
    "EyeGrades",
    "Exams",
    "GradedField",
    "ShownPhotoRow",
    "SignOffRow",
    "add_review",
    "add_user",
    "count_active_users",
    "current_review",
    "current_reviews",
    "exam_reports",
    "first_report_times",
    "get_user",
    "graded_fields",
    "graded_versions",
    "list_users",
    "report_of_review",
    "review_history",
    "shown_photo_rows",
    "sign_off_rows",
]

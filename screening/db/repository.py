"""Data access for the worker, report renderer and recovery.

Every function takes the caller's :class:`Session` and at most *flushes*: committing (or rolling back)
is the caller's unit of work (see :func:`screening.db.session.session_scope`). Timestamps passed in
must be timezone-aware; they are stored as UTC.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from os import PathLike
from typing import Any

from sqlalchemy import case, func, or_, select, union_all
from sqlalchemy.orm import Session

from screening.db import tallies
from screening.db.dialect import insert_on_conflict
from screening.db.models import (
    LESION_COLUMNS,
    DatabaseIdentity,
    Drop,
    DropOutcome,
    Event,
    Exam,
    Eye,
    EyeSource,
    Image,
    ImageState,
    Patient,
    Report,
    Result,
    utcnow,
)

PathStr = str | PathLike[str]
# the level keys of screening.report.REFERRAL_LEVELS, most urgent first (reports.referral_level); kept here so the
# database layer does not import the report renderer's module (tests/screening/db/test_repository.py checks they agree)
REFERRAL_LEVEL_KEYS = ("urgent", "soon", "routine", "refer_ungradable", "ungradable", "rescreen_12", "rescreen_24",
                       "no_images")


def _path(p: PathStr | None) -> str | None:
    return None if p is None else str(p)


def _check(value: str, allowed: type[ImageState] | type[DropOutcome] | type[Eye] | type[EyeSource], what: str) -> str:
    try:
        return allowed(value).value
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; expected one of {[v.value for v in allowed]}") from None


def _insert_if_absent(session: Session, model: type[Patient] | type[Exam] | type[DatabaseIdentity], values: dict[str, Any],
                      key: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING where the dialect has it, so two workers racing to create the
    same patient/exam both succeed without a savepoint; elsewhere the caller's select-then-add decides."""
    if session.get_bind().dialect.name in ("sqlite", "postgresql"):
        stmt = insert_on_conflict(session, model).values(**values)
        session.execute(stmt.on_conflict_do_nothing(index_elements=list(key)))
    else:
        session.add(model(**values))
        session.flush()


# --- the database itself --------------------------------------------------------------------------


def database_token(session: Session) -> str | None:
    """The database's identity (:class:`~screening.db.models.DatabaseIdentity`); None when it has none yet."""
    return session.scalars(select(DatabaseIdentity.token).order_by(DatabaseIdentity.id).limit(1)).first()


def ensure_database_token(session: Session) -> str:
    """The database's identity, made now (a random id) when it has none: a database created before revision
    0010_db_identity gets one from that migration, a new one from ``init_db``, one made otherwise here."""
    token = database_token(session)
    if token is None:  # row 1, inserted only if absent: workers starting together on one database agree on it
        _insert_if_absent(session, DatabaseIdentity, {"id": 1, "token": secrets.token_hex(16), "created_at": utcnow()}, ["id"])
        token = database_token(session)
        assert token is not None  # this insert's, or the one a concurrent worker committed first
    return token


# --- patients and exams -------------------------------------------------------------------------


def find_patient(session: Session, code: str) -> Patient | None:
    """The patient whose code is ``code`` ignoring case (``patient143`` is ``Patient143``); the oldest when a
    database from before case-folding holds several spellings."""
    stmt = select(Patient).where(func.lower(Patient.code) == code.strip().lower()).order_by(Patient.id).limit(1)
    return session.scalars(stmt).first()


def get_or_create_patient(session: Session, code: str) -> Patient:
    """The patient with ``code``, ignoring case (:func:`find_patient`), created with this spelling when new.
    Patient ids are ASCII (``training.common.is_safe_id``), so SQL ``lower()`` folds them fully."""
    code = code.strip()
    if not code:
        raise ValueError("patient code is empty")
    patient = find_patient(session, code)
    if patient is None:
        _insert_if_absent(session, Patient, {"code": code, "created_at": utcnow()}, ["code"])
        patient = session.scalars(select(Patient).where(Patient.code == code)).one()
    return patient


def get_or_create_exam(session: Session, patient: Patient, exam_date: date) -> Exam:
    if patient.id is None:
        session.flush()
    stmt = select(Exam).where(Exam.patient_id == patient.id, Exam.exam_date == exam_date)
    exam = session.scalars(stmt).one_or_none()
    if exam is None:
        _insert_if_absent(
            session,
            Exam,
            {"patient_id": patient.id, "exam_date": exam_date, "created_at": utcnow()},
            ["patient_id", "exam_date"],
        )
        exam = session.scalars(stmt).one()
    return exam


# --- images and drops ---------------------------------------------------------------------------


def get_image_by_sha(session: Session, sha256: str) -> Image | None:
    return session.scalars(select(Image).where(Image.sha256 == sha256.lower())).one_or_none()


def pages_of_file(session: Session, file_sha256: str) -> list[Image]:
    """The images made from the pages of the multi-page file whose bytes hash to ``file_sha256``, by page."""
    stmt = select(Image).where(Image.file_sha256 == file_sha256.lower()).order_by(Image.page, Image.id)
    return list(session.scalars(stmt))


def add_image(
    session: Session,
    *,
    sha256: str,
    source_name: str,
    exam: Exam | None = None,
    eye: str | None = None,
    stored_path: PathStr | None = None,
    state: str = ImageState.RECEIVED,
    error: str | None = None,
    error_code: str | None = None,
    width: int | None = None,
    height: int | None = None,
    device: str | None = None,
    page: int | None = None,
    file_sha256: str | None = None,
    received_at: datetime | None = None,
) -> Image:
    """A new distinct file content (or a page of a multi-page file: ``page`` and ``file_sha256``). Raises
    IntegrityError on flush if ``sha256`` is already known: check :func:`get_image_by_sha` first and
    :func:`record_drop` a duplicate instead. A photo is graded or stored ungradable through :func:`set_state`
    (``done``), which also marks its visit screened (``exams.screened_at``); created here in that state, it is not
    (until ``tallies rebuild``)."""
    now = received_at or utcnow()
    image = Image(
        sha256=sha256.lower(),
        source_name=source_name,
        exam=exam,
        eye=None if eye is None else _check(eye, Eye, "eye"),
        stored_path=_path(stored_path),
        state=_check(state, ImageState, "state"),
        error=error,
        error_code=error_code,
        width=width,
        height=height,
        device=device,
        page=page,
        file_sha256=None if file_sha256 is None else file_sha256.lower(),
        received_at=now,
        updated_at=now,
    )
    session.add(image)
    session.flush()
    return image


def record_drop(
    session: Session,
    *,
    sha256: str,
    source_name: str,
    outcome: str,
    image: Image | None = None,
    reason: str | None = None,
    reason_code: str | None = None,
    received_at: datetime | None = None,
) -> Drop:
    """Log one arrival of a file (every arrival, duplicates and rejects included); ``reason_code`` is the stable
    code of ``reason`` (``screening.rejection.RejectReason``)."""
    drop = Drop(
        sha256=sha256.lower(),
        source_name=source_name,
        outcome=_check(outcome, DropOutcome, "drop outcome"),
        image=image,
        reason=reason,
        reason_code=reason_code,
        received_at=received_at or utcnow(),
    )
    session.add(drop)
    session.flush()
    tallies.count_drop(session, drop)
    return drop


def unfiled_drops(session: Session, *, sha256: str | None = None, source_name: str | None = None) -> list[Drop]:
    """Duplicate and rejected drops whose file has not been moved out of the inbox yet, oldest first.

    The worker records such a drop and commits, then moves the file, then logs an event of the drop's outcome
    kind (``duplicate`` / ``rejected``) with the drop's id (``screening.stages.filing``). A drop without that
    event was interrupted between its commit and its move. A drop without an image (an entry that is not a
    file: a link, a folder) is tracked the same way when it has a reason code (revision 0006); older ones
    count as filed. ``sha256`` / ``source_name`` narrow the search to one file.
    """
    closing = select(Event.id).where(Event.drop_id == Drop.id, Event.kind == Drop.outcome).exists()
    stmt = select(Drop).where(
        Drop.outcome.in_([DropOutcome.DUPLICATE.value, DropOutcome.REJECTED.value]),
        or_(Drop.image_id.is_not(None), Drop.reason_code.is_not(None)), ~closing,
    )
    if sha256 is not None:
        stmt = stmt.where(Drop.sha256 == sha256.lower())
    if source_name is not None:
        stmt = stmt.where(Drop.source_name == source_name)
    return list(session.scalars(stmt.order_by(Drop.id)))


def has_event(session: Session, code: str, message: str) -> bool:
    """Whether the event log holds an event with this ``code`` and ``message`` (an incident told once)."""
    return session.scalar(select(Event.id).where(Event.code == code, Event.message == message).limit(1)) is not None


def add_event(
    session: Session,
    kind: str,
    message: str = "",
    *,
    image: Image | None = None,
    drop: Drop | None = None,
    code: str | None = None,
    created_at: datetime | None = None,
) -> Event:
    """Append to the event log (never updated or deleted); ``code`` is a reason or incident code
    (``screening.rejection``) the audit counts by."""
    if (image is not None and image.id is None) or (drop is not None and drop.id is None):
        session.flush()
    event = Event(
        kind=kind,
        message=message,
        image_id=None if image is None else image.id,
        drop_id=None if drop is None else drop.id,
        code=code,
        created_at=created_at or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def set_state(session: Session, image: Image, state: str, error: str | None = None, code: str | None = None) -> Event:
    """Move ``image`` to ``state`` (``error`` and its stable ``code`` are kept for rejected/failed, cleared
    otherwise) and log it as an Event of kind ``"state"`` with message ``"old -> new[: error]"``."""
    new = _check(state, ImageState, "state")
    old = image.state
    keep = new in (ImageState.REJECTED, ImageState.FAILED)
    image.state = new
    image.error = error if keep else None
    image.error_code = code if keep else None
    image.updated_at = utcnow()
    if new == ImageState.DONE:  # graded or stored ungradable: its visit is screened (the audit's visit counts)
        session.flush()
        tallies.screen_exam(session, image)
    message = f"{old} -> {new}" + (f": {error}" if error else "")
    return add_event(session, "state", message, image=image, code=code if keep else None)


def set_device(session: Session, image: Image, device: str | None) -> None:
    """Record the camera ``image`` came from (a file admitted again may name it anew); the audit's per-device
    counts of its stored verdict move with it."""
    if image.device == device:
        return
    before, not_confirmed = tallies.current_checks(session, image)
    image.device = device
    tallies.count_checks(session, before, tallies.checks_contribution(image, not_confirmed))


def set_eye(session: Session, image: Image, eye: str, note: str, message: str, at: datetime) -> None:
    """A person who checked the label set (or confirmed) ``image``'s eye: filed under ``eye`` from now on, with
    ``note`` for the report, the time in ``refiled_at`` and an ``eye_set`` event (``message``: what changed, by whom
    and why). The intake's own checks stay as they were (``predicted_eye``, ``eye_confidence``, ``eye_mismatch``:
    the audit counts the stated label the photo contradicted). A photo already in a report goes back to ``done``,
    so its visit gets a new version (:func:`exams_needing_report` compares ``refiled_at`` with the newest report)."""
    image.eye = _check(eye, Eye, "eye")
    image.eye_source = EyeSource.STAFF.value
    image.eye_note = note
    _refiled(session, image, at, "eye_set", message)


def _refiled(session: Session, image: Image, at: datetime, kind: str, message: str) -> None:
    """What every refiling by a person records: when (``images.refiled_at``), the photo back to ``done`` if it was
    in a report (its visit gets a new version), and the event that keeps the trail."""
    image.refiled_at = at
    if image.state == ImageState.REPORTED:
        set_state(session, image, ImageState.DONE)
    add_event(session, kind, message, image=image, created_at=at)


def move_image(session: Session, image: Image, to: Exam, eye: str, note: str, left_note: str, message: str,
               at: datetime) -> None:
    """A person who checked the label filed ``image`` in visit ``to`` under ``eye`` (another patient's, or another
    date's). ``note``: what the photo's report section says from now on (``images.filing_note``); ``left_note``:
    what the reports of the visit it left say (``exams.filing_note``, with ``exams.refiled_at``), so that a later
    version of that visit never shows the photo and says why. Both visits get a new version (a photo already in a
    report goes back to ``done``; :func:`exams_needing_report` compares both times with the newest report) and a
    ``moved`` event keeps the trail. The audit's tallies of the two visits are the caller's to recompute
    (:func:`screening.db.tallies.recount_exams`): a visit may have lost its only photo."""
    left = image.exam
    if left is None:
        raise ValueError(f"image {image.id} is in no visit; only a stored photo is moved")
    image.exam_id = to.id
    image.exam = to
    if image.result is not None:  # results.exam_id copies the image's visit (the audit's visit counts read it)
        image.result.exam_id = to.id
    image.eye = _check(eye, Eye, "eye")
    image.filing_note = note
    left.refiled_at = at
    left.filing_note = left_note
    _refiled(session, image, at, "moved", message)


def record_checks(
    session: Session,
    image: Image,
    *,
    gradable: bool,
    reasons: Sequence[str],
    scores: Mapping[str, float],
    eye_source: str,
    predicted_eye: str,
    eye_confidence: float,
    eye_mismatch: bool,
    eye_note: str | None = None,
    eye_confirmed: bool | None = None,
    check_models: Mapping[str, str] | None = None,
) -> None:
    """Store the intake checks of ``image`` (screening.checks): the gradability verdict and the eye read from the
    photo, and ``check_models``: which models made them (:attr:`screening.checks.IntakeChecks.identities`). An
    ungradable verdict, a laterality mismatch and a stated eye the photo could not confirm (the model
    abstained: ``eye_confirmed`` False without a mismatch) are also logged as events (``ungradable``,
    ``eye_mismatch``, ``eye_not_confirmed``), so that the history of a file shows them and the audit counts them."""
    if gradable and reasons:
        raise ValueError(f"a gradable photo has no ungradable reasons, got {list(reasons)}")
    if not gradable and not reasons:
        raise ValueError("an ungradable photo needs at least one reason")
    if not 0.0 <= float(eye_confidence) <= 1.0:
        raise ValueError(f"eye_confidence must be a probability, got {eye_confidence!r}")
    # checks stored again (re-run after a crash) replace the photo's old counts in the audit tallies
    before, not_confirmed = tallies.current_checks(session, image)
    image.gradable = bool(gradable)
    image.quality_reasons = [str(r) for r in reasons]
    image.quality_scores = {str(k): float(v) for k, v in scores.items()}
    image.eye_source = _check(eye_source, EyeSource, "eye source")
    image.predicted_eye = _check(predicted_eye, Eye, "eye")
    image.eye_confidence = float(eye_confidence)
    image.eye_mismatch = bool(eye_mismatch)
    image.eye_note = eye_note
    image.check_models = {str(k): str(v) for k, v in check_models.items()} if check_models else None
    if not gradable:
        add_event(session, "ungradable", ", ".join(reasons), image=image)
    if eye_mismatch:
        add_event(session, "eye_mismatch", f"stated {image.eye}, photo shows {predicted_eye} ({float(eye_confidence):.2f})",
                  image=image)
    elif eye_confirmed is False:
        add_event(session, "eye_not_confirmed", f"stated {image.eye}, photo unclear ({predicted_eye} {float(eye_confidence):.2f})",
                  image=image)
        not_confirmed = True
    session.flush()
    tallies.count_checks(session, before, tallies.checks_contribution(image, not_confirmed))


# --- results and reports ------------------------------------------------------------------------


def add_result(
    session: Session,
    image: Image,
    *,
    model_version: str,
    checkpoint_sha256: str,
    dr_grade: int,
    dr_probs: Sequence[float],
    dme_grade: int,
    dme_probs: Sequence[float],
    referable_score: float,
    referable: bool,
    lesion_areas: Mapping[str, float] | None = None,
    mask_dir: PathStr | None = None,
    overlay_path: PathStr | None = None,
    dr_cam_path: PathStr | None = None,
    dme_cam_path: PathStr | None = None,
    original_masks: Mapping[str, PathStr] | None = None,
    device: str | None = None,
    inference_ms: float | None = None,
    created_at: datetime | None = None,
    site: str | None = None,
) -> Result:
    """Store the model output for ``image`` (one per image; a second raises IntegrityError on flush).
    ``lesion_areas`` is keyed by lesion code (``MA`` ... ``OD``; a missing code stores 0), and so is
    ``original_masks`` (the TIFF of each lesion at the original photo's size).
    Does not change the image state: call :func:`set_state` (``done``) in the same unit of work.
    The image's exam and arrival time are copied onto the result for the audit (see models.Result); ``site`` is
    the grading worker's ``[screening] site``."""
    areas = dict(lesion_areas or {})
    unknown = (set(areas) | set(original_masks or {})) - set(LESION_COLUMNS)
    if unknown:
        raise ValueError(f"unknown lesion codes {sorted(unknown)}; expected some of {list(LESION_COLUMNS)}")
    created_at = created_at or utcnow()
    session.flush()  # the image's id and exam_id, however it was attached
    first_report_at = None  # a report already made at or after this result covers it (replays, imports)
    if image.exam_id is not None:
        first_report_at = session.scalar(
            select(func.min(Report.created_at)).where(Report.exam_id == image.exam_id, Report.created_at >= created_at)
        )
    result = Result(
        image=image,
        model_version=model_version,
        checkpoint_sha256=checkpoint_sha256,
        dr_grade=int(dr_grade),
        dr_probs=[float(p) for p in dr_probs],
        dme_grade=int(dme_grade),
        dme_probs=[float(p) for p in dme_probs],
        referable_score=float(referable_score),
        referable=bool(referable),
        **{column: float(areas.get(code, 0.0)) for code, column in LESION_COLUMNS.items()},
        mask_dir=_path(mask_dir),
        overlay_path=_path(overlay_path),
        dr_cam_path=_path(dr_cam_path),
        dme_cam_path=_path(dme_cam_path),
        original_masks=None if original_masks is None else {code: str(p) for code, p in original_masks.items()},
        device=device,
        inference_ms=None if inference_ms is None else float(inference_ms),
        created_at=created_at,
        exam_id=image.exam_id,
        received_at=image.received_at,
        turnaround_s=None if first_report_at is None else (first_report_at - image.received_at).total_seconds(),
        site=site,
    )
    session.add(result)
    session.flush()
    tallies.count_result(session, result)
    add_event(session, "result", f"{model_version}: DR {dr_grade}, DME {dme_grade}, referable={bool(referable)}", image=image)
    return result


def exam_images_with_results(
    session: Session, exam_id: int, *, include_pending: bool = False
) -> list[tuple[Image, Result | None]]:
    """The exam's images with their results, right eye first then left (then unknown eye), oldest first.
    By default only images that have a Result; ``include_pending=True`` adds the others with ``None``."""
    eye_order = case((Image.eye == Eye.RIGHT.value, 0), (Image.eye == Eye.LEFT.value, 1), else_=2)
    stmt = (
        select(Image, Result)
        .join(Result, Result.image_id == Image.id, isouter=include_pending)
        .where(Image.exam_id == exam_id)
        .order_by(eye_order, Image.id)
    )
    return [(img, res) for img, res in session.execute(stmt).all()]


def refused_pages(session: Session, exam_id: int) -> list[Image]:
    """Pages refused inside a multi-page file of the exam whose other pages were admitted (not a fundus photo,
    too small, an eye neither stated nor visible): the report says they were not graded, by page."""
    stmt = (select(Image).where(Image.exam_id == exam_id, Image.state == ImageState.REJECTED.value, Image.page.is_not(None))
            .order_by(Image.id))
    return list(session.scalars(stmt))


def next_report_version(session: Session, exam_id: int) -> int:
    current = session.scalar(select(func.max(Report.version)).where(Report.exam_id == exam_id))
    return 1 if current is None else current + 1


def add_report(
    session: Session,
    exam: Exam,
    path: PathStr,
    model_version: str,
    *,
    version: int | None = None,
    created_at: datetime | None = None,
    review_id: int | None = None,
    referral_level: str | None = None,
) -> Report:
    """Record a rendered report; ``version`` defaults to :func:`next_report_version`. Two writers racing
    for the same version get an IntegrityError on flush (unique exam_id, version). ``review_id``: the
    sign-off the version shows (reviewed versions only). ``referral_level``: the recommendation the PDF printed
    (:func:`screening.report.printed_referral`, a key of ``REFERRAL_LEVELS``), which the audit counts visits by;
    every caller that renders a report passes it (None only for rows loaded by other means)."""
    if referral_level is not None and referral_level not in REFERRAL_LEVEL_KEYS:
        raise ValueError(f"unknown referral level {referral_level!r}; expected one of {list(REFERRAL_LEVEL_KEYS)}")
    if exam.id is None:
        session.flush()
    report = Report(
        exam=exam,
        version=version if version is not None else next_report_version(session, exam.id),
        path=str(path),
        model_version=model_version,
        created_at=created_at or utcnow(),
        review_id=review_id,
        referral_level=referral_level,
    )
    session.add(report)
    session.flush()
    tallies.stand_exam(session, exam.id, report.version, referral_level, review_id is not None)  # the audit's visits
    _record_turnaround(session, exam.id, report.created_at)
    add_event(session, "report", f"exam {exam.id} v{report.version}: {report.path}")
    return report


def _record_turnaround(session: Session, exam_id: int, report_at: datetime) -> None:
    """A report made at ``report_at`` covers the exam's results created at or before it: their turnaround is
    the time from arrival to the first such report (a smaller value wins, whatever order reports arrive in)."""
    covered = session.scalars(select(Result).where(Result.exam_id == exam_id, Result.created_at <= report_at))
    for result in covered:
        seconds = (report_at - result.received_at).total_seconds()
        if result.turnaround_s is None or seconds < result.turnaround_s:
            result.turnaround_s = seconds
    session.flush()


# --- recovery -----------------------------------------------------------------------------------


def images_in_state(session: Session, states: str | Iterable[str]) -> list[Image]:
    """Images in any of ``states``, oldest first (e.g. ``received`` after a restart: re-run them)."""
    wanted = [states] if isinstance(states, str) else list(states)
    wanted = [_check(s, ImageState, "state") for s in wanted]
    return list(session.scalars(select(Image).where(Image.state.in_(wanted)).order_by(Image.received_at, Image.id)))


def exams_needing_report(session: Session) -> list[Exam]:
    """Exams with at least one ``done`` image whose newest result is not covered by a report, i.e.
    there is no report created at or after the exam's latest result. An image judged ungradable has no result:
    the time the store stage committed it (``stored_at``; ``updated_at`` for a row without one) stands for one, and a
    photo a person refiled (``images.refiled_at``: its eye set, or moved here) counts from then, and so does the
    visit a photo was moved out of (``exams.refiled_at``: its report must not show that photo; it may have no photo
    left, and then gets a version saying so). Ordered by exam id."""
    results = (
        select(Image.exam_id.label("exam_id"), Result.created_at.label("at"))
        .join(Result, Result.image_id == Image.id)
        .where(Image.exam_id.is_not(None))
    )
    ungradable = select(Image.exam_id.label("exam_id"), func.coalesce(Image.stored_at, Image.updated_at).label("at")).where(
        Image.exam_id.is_not(None), Image.state == ImageState.DONE.value, Image.gradable.is_(False)
    )
    relabelled = select(Image.exam_id.label("exam_id"), Image.refiled_at.label("at")).where(
        Image.exam_id.is_not(None), Image.state == ImageState.DONE.value, Image.refiled_at.is_not(None)
    )
    left = select(Exam.id.label("exam_id"), Exam.refiled_at.label("at")).where(Exam.refiled_at.is_not(None))
    stored = union_all(results, ungradable, relabelled, left).subquery()
    latest_result = (
        select(stored.c.exam_id.label("exam_id"), func.max(stored.c.at).label("at")).group_by(stored.c.exam_id).subquery()
    )
    latest_report = (
        select(Report.exam_id.label("exam_id"), func.max(Report.created_at).label("at"))
        .group_by(Report.exam_id)
        .subquery()
    )
    has_done = (
        select(Image.id)
        .where(Image.exam_id == Exam.id, Image.state == ImageState.DONE.value)
        .exists()
    )
    stmt = (
        select(Exam)
        .join(latest_result, latest_result.c.exam_id == Exam.id)
        .outerjoin(latest_report, latest_report.c.exam_id == Exam.id)
        .where(or_(has_done, Exam.refiled_at.is_not(None)),  # a visit a photo left may have none left
               or_(latest_report.c.at.is_(None), latest_report.c.at < latest_result.c.at))
        .order_by(Exam.id)
    )
    return list(session.scalars(stmt))


__all__ = [
    "REFERRAL_LEVEL_KEYS",
    "add_event",
    "add_image",
    "add_report",
    "add_result",
    "exam_images_with_results",
    "exams_needing_report",
    "find_patient",
    "get_image_by_sha",
    "get_or_create_exam",
    "get_or_create_patient",
    "has_event",
    "images_in_state",
    "move_image",
    "next_report_version",
    "record_checks",
    "record_drop",
    "refused_pages",
    "set_device",
    "set_eye",
    "set_state",
    "unfiled_drops",
]

"""Intake stage: an inbox entry -> an identified, de-duplicated, decoded :class:`Job`, or a recorded
duplicate, conflict or refusal, or (for a file that may still be arriving) nothing yet.

Per entry, in this order:

1. anything but a regular file with an ordinary name (a link, a folder, a pipe; a hidden or temporary name
   left behind) is refused with its reason, never opened or followed;
2. the file is read once, whole (:func:`screening.intake.read_content`), and the SHA-256 of exactly those
   bytes is its identity; the same bytes are decoded in step 6. A file (or its sidecar) the worker may not or
   cannot read (permissions, an I/O error) is :class:`Unreadable`: a ``file_unreadable`` incident names it once,
   and it stays in the inbox, read again on every pass;
3. a move interrupted by a crash (a committed record whose file is still here) is finished: :class:`Resumed`;
   so is an image whose result is stored but whose state says otherwise (repaired first);
4. content already graded, or being graded from another file still in the inbox: a :class:`Duplicate`,
   unless the name says another patient or the other eye: then an ``identity_conflict`` refusal for staff (a DICOM
   file's bare name, ``IM000101``, says nothing: :func:`~screening.dicom.named_identity`);
5. the checks, each raising :class:`~screening.rejection.Rejection`: size limit; a DICOM file (by content,
   :mod:`screening.dicom`) gives its patient / eye / date / camera from its tags and its picture from its pixel
   data; any other file needs a supported suffix, patient / eye / date from the name or sidecar and a complete,
   decodable image within the limits; then the intake checks of :mod:`screening.checks` on the decoded photo:
   a colour fundus photo (the learned gradability verdict), and an eye that is stated (name, sidecar or DICOM
   tag) or clearly visible; a file whose data stops short and that changed within ``incomplete_grace`` seconds is
   :class:`Deferred` (left in the inbox, read again later) instead: it may still be being copied;
6. otherwise the patient, exam, image (``received``, with its gradability verdict and eye check) and drop rows
   are committed: :class:`Admitted`. An ungradable photo is admitted too (its job says so): the store stage
   keeps it with its reasons instead of it being graded.

A TIFF holding several photos takes its own path after step 2 (:mod:`screening.stages.pages`): one image per
page, one drop for the file; each page goes through the intake checks of step 5 exactly as a single photo does
(refused, admitted as ungradable, or admitted to grade; its own eye).

The database is written before any file moves (:mod:`screening.stages.filing`); every unit of work waits
out a locked database (:func:`screening.db.session.transaction`). Nothing here runs the grading model; the
intake checks' small models run here, on the decoded photo.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..checks import IntakeChecks, IntakeVerdict
from ..claims import Claimer
from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import ClaimKind, DropOutcome, Image, ImageState
from ..db.session import transaction
from ..dicom import DICOM_SUFFIXES, dicom_identity, is_dicom, named_identity, read_dicom
from ..imaging import DecodedImage, DecodeLimits, decode_bytes, preprocess, refuse_empty, several_pictures
from ..intake import (
    Content,
    Identity,
    StillChanging,
    check_supported,
    entry_sha256,
    parse_identity,
    read_content,
    stray_rejection,
)
from ..logs import exception_kind
from ..rejection import FailReason, Incident, Rejection, RejectReason
from .filing import Filing
from .outcomes import Admitted, Deferred, Duplicate, IntakeOutcome, Job, Rejected, Resumed, Unreadable, Vanished
from .pages import PageIntake

log = logging.getLogger("screening")

_GRADED = (ImageState.DONE, ImageState.REPORTED)
_EYE_NAMES = {"L": "left", "R": "right"}


@dataclass(frozen=True)
class _Known:
    """What the database knows of a file's content, read in one transaction."""

    image_id: int
    state: str
    has_result: bool
    same_drop: bool  # the image's own file is this very path (its drop was recorded, its move is pending)
    in_flight_elsewhere: bool  # received from another file that is still in the inbox

    @classmethod
    def of(cls, image: Image, path: Path) -> _Known:
        stored = image.stored_path
        return cls(
            image_id=image.id, state=image.state, has_result=image.result is not None, same_drop=stored == str(path),
            in_flight_elsewhere=(image.state == ImageState.RECEIVED and bool(stored) and stored != str(path)
                                 and Path(stored or "").is_file()),
        )

    @property
    def graded(self) -> bool:
        """Graded: its result is stored (whatever its state says: see :meth:`IntakeStage._repair`)."""
        return self.state in _GRADED or self.has_result

    @property
    def duplicate(self) -> bool:
        return (self.graded and not self.same_drop) or self.in_flight_elsewhere


def conflict_with(image: Image, identity: Identity | None) -> str | None:
    """Why a drop with the same bytes as ``image`` cannot be a plain duplicate: its name says another patient
    (compared ignoring case) or the other eye. None when it agrees, or says nothing (no parseable name)."""
    if identity is None or image.exam is None:
        return None
    if image.exam.patient.code.lower() != identity.patient_id.lower():
        return (f"the same bytes as a photo already recorded for another patient (image {image.id}); one of the two "
                "names is wrong. This copy was not graded: check which patient the photo belongs to; if the recorded one is "
                f"wrong, `dr-screen review move {image.id} --patient ID --reviewer NAME --reason TEXT` files it in the "
                "right visit" + _refiled_already(image))
    if image.eye is not None and identity.eye is not None and image.eye != identity.eye:
        return (f"the same bytes as this patient's {_EYE_NAMES.get(image.eye, image.eye)} eye photo (image {image.id}), "
                f"but named as the {_EYE_NAMES[identity.eye]} eye. This copy was not graded: check which eye it is; if the "
                f"recorded one is wrong, `dr-screen review eye {image.id}={identity.eye} --reviewer NAME --reason TEXT` "
                "sets it" + _refiled_already(image))
    return None


def _refiled_already(image: Image) -> str:
    """For a photo a person has already refiled (its eye set or confirmed, or moved: ``images.refiled_at``): a copy
    under its old name is most likely the same export again, and the message without this read as if nobody had
    looked. Its visit shows the conflict again until someone confirms the filing."""
    if image.refiled_at is None or image.eye is None:
        return ""
    return (f". A person already checked and refiled the recorded photo ({image.refiled_at:%Y-%m-%d %H:%M} UTC; "
            f"`dr-screen review show {image.exam_id}` says who and why): if this copy carries the name they corrected, "
            f"`dr-screen review eye {image.id}={image.eye} --reviewer NAME --reason TEXT` confirms that the filing stands")


def record_verdict(session: Session, image: Image, verdict: IntakeVerdict) -> None:
    """Store an admitted photo's intake checks on its image (a single photo's, or one page's of a multi-page file:
    :mod:`screening.stages.pages` records each page through this too)."""
    prediction = verdict.eye.prediction
    repo.record_checks(
        session, image, gradable=verdict.gradable, reasons=verdict.quality.reasons, scores=verdict.quality.scores,
        eye_source=verdict.eye.source, predicted_eye=prediction.eye, eye_confidence=prediction.confidence,
        eye_mismatch=verdict.eye.mismatch, eye_note=verdict.eye.note(), eye_confirmed=verdict.eye.confirmed,
        check_models=verdict.models,
    )


class IntakeStage:
    def __init__(
        self, settings: ScreeningSettings, factory: sessionmaker[Session], filing: Filing, image_size: int,
        today: Callable[[], date] = date.today, checks: IntakeChecks | None = None, claims: Claimer | None = None,
    ) -> None:
        """``checks``: the intake checks' models, loaded once by the worker; None loads them from ``settings``
        (raising :class:`training.api.CheckpointError` with what to do when a model file is missing)."""
        self.settings = settings
        self.factory = factory
        self.filing = filing
        self.image_size = image_size  # the model's input size: images are decoded no larger than needed
        self.today = today
        self.limits = DecodeLimits(max_pixels=settings.max_pixels, max_pages=settings.max_pages)
        self.checks = checks if checks is not None else IntakeChecks.from_settings(settings)
        # Several workers: the caller claimed each file (screening.claims); every transaction that records it
        # renews the claim first and raises ClaimLost if another worker took it over. None: one worker, no claims.
        self.claims = claims
        self.pages = PageIntake(self)
        self._told_unreadable: set[str] = set()  # file_unreadable messages known to be recorded (skips the look-up)

    def hold(self, session: Session, path: Path) -> None:
        """Fence work this worker claimed (screening.claims): renewed, or ClaimLost if another worker took it over.
        First in every transaction that records something of the file, a multi-page file's pages included."""
        if self.claims is not None and self.claims.holds(ClaimKind.FILE, path.name):
            self.claims.hold(session, ClaimKind.FILE, path.name)

    def admit(self, path: Path) -> IntakeOutcome:
        """One inbox entry through the steps of the module docstring. Another worker recording the same content
        from another file at the same moment makes this one's new image a unique-key clash: the entry is then
        looked at once more, and is that image's duplicate."""
        try:
            return self._admit_entry(path)
        except IntegrityError:
            log.info("the same photo was recorded by another worker at the same moment; looking at the file again")
            return self._admit_entry(path)

    def _admit_entry(self, path: Path) -> IntakeOutcome:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Vanished(path)
        stray = stray_rejection(path, st, self.settings.abandoned_after)
        if stray is not None:
            return self._refuse_entry(path, stray)
        try:
            content = read_content(path, self.settings.max_file_bytes)
        except FileNotFoundError:
            return Vanished(path)
        except StillChanging:
            return Deferred(path, RejectReason.INCOMPLETE, "the file changed while it was read")
        except Rejection as rejection:  # another kind of entry took the name since it was listed
            return self._refuse_entry(path, rejection)
        except OSError as exc:  # no permission to read it, an I/O error: told once, left in the inbox
            return self._unreadable(path, exc)
        sha = content.sha256
        identity: Identity | None = None
        unidentified: Rejection | None = None
        try:
            if content.data is not None and is_dicom(content.data):  # whose photo it is comes from its tags
                identity = named_identity(path, self.settings.filename_patterns)
            else:
                identity = parse_identity(path, self.settings.filename_patterns, self.today())
        except Rejection as rejection:
            unidentified = rejection
        except OSError as exc:  # its sidecar cannot be read: as for the photo, told once and left in the inbox
            return self._unreadable(path, exc)
        if content.data is not None and several_pictures(content.data, self.limits):  # graded page by page
            return self.pages.admit(path, content, identity, unidentified)

        def look(session: Session) -> tuple[list[tuple[int, int | None]], _Known | None, int | None, str | None]:
            self.hold(session, path)
            unfiled = [(d.id, d.image_id) for d in repo.unfiled_drops(session, sha256=sha, source_name=path.name)]
            image = repo.get_image_by_sha(session, sha)
            known = _Known.of(image, path) if image is not None else None
            if unfiled or image is None or known is None or not known.duplicate:
                return unfiled, known, None, None
            return unfiled, known, *self.record_repeat(session, path, sha, image, identity, f"image {image.id}")

        unfiled, known, drop_id, conflict = transaction(self.factory, look, what="intake")
        # committed: from here on files may move
        if unfiled:
            return self.resume_drop(path, sha, *unfiled[0])
        if known is not None and known.graded and known.same_drop:  # graded, committed, archive interrupted
            self._repair(known)
            log.info("image %s was graded before an interruption; archiving its file now", known.image_id)
            return Resumed(known.image_id, self.filing.archive_image(known.image_id, path, sha))
        if known is not None and drop_id is not None:
            return self.file_repeat(path, sha, drop_id, conflict, known.image_id, f"image {known.image_id}")
        try:
            identity, decoded = self.read(path, content, identity, unidentified)
            verdict = self.checks.check(decoded, identity, path.name)
        except Rejection as rejection:
            return self._deferred(path, content, rejection) or self._reject(path, sha, known, rejection)
        decoded = replace(decoded, whole=None)  # the whole photo was for the checks; jobs wait in memory without it
        return Admitted(self._admit(path, sha, known, identity, decoded, verdict))

    def refuse_undecodable(self, path: Path, shown: str) -> IntakeOutcome:
        """An inbox file whose name is not UTF-8 text (:func:`screening.intake.text_name` gave ``shown``): nothing
        can record or claim that name, so the file is first renamed in the inbox to ``shown`` (its bytes unchanged),
        then refused like any entry, saying how to name it. The new name is claimed before it exists, so another
        worker that lists it leaves it alone, and a file already of that name is never replaced."""
        target = path.with_name(shown)
        taken = Deferred(path, RejectReason.IDENTITY, f"'{shown}' is taken in the inbox; renamed later")
        if self.claims is not None and not self.claims.take(ClaimKind.FILE, shown):  # the new name, before it exists
            return Deferred(path, RejectReason.IDENTITY, f"'{shown}' is claimed by another worker; renamed later")
        try:
            try:
                os.link(path, target)  # never over another file of that name
                os.unlink(path)
            except FileExistsError:
                return taken
            except FileNotFoundError:
                return Vanished(path)
            except OSError:  # a share without hard links: a plain rename, the name checked just before
                if target.exists():
                    return taken
                os.rename(path, target)
            log.warning("an inbox file whose name is not UTF-8 text was renamed to show its bytes as \\xNN, and is refused")
            return self._refuse_renamed(target, shown)
        finally:
            if self.claims is not None:
                self.claims.release(ClaimKind.FILE, [shown])

    def _refuse_renamed(self, target: Path, shown: str) -> IntakeOutcome:
        return self._refuse_entry(target, Rejection(
            RejectReason.IDENTITY,
            f"the file name is not UTF-8 text (a share or camera with another character set wrote it); it was renamed "
            f"'{shown}', each byte that is not text shown as \\xNN, to be filed here. Name the photo with letters, "
            "digits, '_' and '-' (e.g. Patient001_L.jpg) and copy it into the inbox again"))

    def _unreadable(self, path: Path, exc: OSError) -> Unreadable:
        """An entry that cannot be read (the photo, or its sidecar: ``exc.filename`` says which): an
        :class:`Unreadable`, and a ``file_unreadable`` incident naming the file and saying what to do. The
        incident is recorded once per file name and cause, whichever worker or run meets it first (the file is
        tried again on every pass; ``run --once`` from cron is a new process each time)."""
        name = Path(exc.filename).name if isinstance(exc.filename, str) and exc.filename else path.name
        fix = ("give the worker's user permission to read it" if isinstance(exc, PermissionError)
               else "check the disk the inbox is on, then copy the photo into the inbox again")
        message = (f"'{name}' could not be read ({exc.strerror or type(exc).__name__}); it stays in the inbox "
                   f"and is read again on every pass: {fix}")
        if message not in self._told_unreadable:  # the database is asked once per message, not on every pass

            def record(session: Session) -> bool:
                if repo.has_event(session, Incident.FILE_UNREADABLE, message):
                    return False
                repo.add_event(session, "intake", message, code=Incident.FILE_UNREADABLE)
                return True

            if transaction(self.factory, record, what="recording an unreadable file"):
                log.warning("an inbox file cannot be read (%s); it stays there and is tried again (a file_unreadable "
                            "event names it)", exception_kind(exc))
            self._told_unreadable.add(message)
        return Unreadable(path, message)

    def _deferred(self, path: Path, content: Content, rejection: Rejection) -> Deferred | None:
        """A file whose image data stops short, or that is still empty, and that changed within ``incomplete_grace``
        seconds is left in the inbox (it may still be being copied: a copy that opens its file and writes later kept
        it empty past the watcher's wait, and the finished photo was then found in rejected/): its
        :class:`Deferred`; None for a refusal to record now."""
        if rejection.code in (RejectReason.INCOMPLETE, RejectReason.EMPTY) and (
                time.time() - content.mtime_ns / 1e9 < self.settings.incomplete_grace):
            log.info("a file is empty, incomplete or corrupt; left in the inbox in case it is still being copied")
            return Deferred(path, rejection.code, rejection.message)
        return None

    def record_repeat(self, session: Session, path: Path, sha: str, image: Image, identity: Identity | None,
                      same_as: str) -> tuple[int, str | None]:
        """In the intake's transaction: a drop of bytes already recorded as ``image`` (a multi-page file's first page),
        an identity conflict when its name says another patient or eye (:func:`conflict_with`), else a duplicate of
        ``same_as``. Returns the drop's id and the conflict (None for a duplicate); :meth:`file_repeat` files it."""
        conflict = conflict_with(image, identity)
        if conflict is not None:
            drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.REJECTED,
                                    image=image, reason=conflict, reason_code=RejectReason.IDENTITY_CONFLICT)
        else:
            drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.DUPLICATE,
                                    image=image, reason=f"same content as {same_as}")
        return drop.id, conflict

    def file_repeat(self, path: Path, sha: str, drop_id: int, conflict: str | None, image_id: int,
                    same_as: str) -> Rejected | Duplicate:
        """Committed: the drop :meth:`record_repeat` recorded moves to rejected/ (a conflict) or the duplicates."""
        filed = self.filing.file_drop(drop_id, path, sha)
        if conflict is not None:
            log.warning("identity conflict with image %s: same bytes under another name", image_id)
            return Rejected(image_id, RejectReason.IDENTITY_CONFLICT, conflict, filed)
        log.info("duplicate of %s", same_as)
        return Duplicate(image_id, filed)

    def resume_drop(self, path: Path, sha: str, drop_id: int, image_id: int | None) -> Resumed:
        """A drop recorded before an interruption but never filed: its move finished, nothing recorded again."""
        log.info("finishing the interrupted move of a drop of image %s", image_id)
        return Resumed(image_id, self.filing.file_drop(drop_id, path, sha))

    def refuse(self, path: Path, content: Content, rejection: Rejection) -> Deferred | Rejected:
        """Refuse the whole file (recorded, then moved to ``rejected/``), or defer it while it may still arrive;
        for :mod:`screening.stages.pages`, which reads multi-page files."""
        deferred = self._deferred(path, content, rejection)
        if deferred is not None:
            return deferred

        def look(session: Session) -> _Known | None:
            image = repo.get_image_by_sha(session, content.sha256)
            return None if image is None else _Known.of(image, path)

        return self._reject(path, content.sha256, transaction(self.factory, look, what="intake"), rejection)

    def read(self, path: Path, content: Content, named: Identity | None,
             unidentified: Rejection | None) -> tuple[Identity, DecodedImage]:
        """Who the photo is of and the photo in the model's frame, from a DICOM file's tags and pixels or from
        an image file's name (or sidecar, ``named``) and pixels; raises a :class:`Rejection` saying what is wrong.
        A file over ``max_file_bytes`` (never held in memory) is refused first, whatever it is (a DICOM file too)."""
        if content.data is None:
            limit = self.settings.max_file_bytes
            raise Rejection(RejectReason.TOO_LARGE, f"'{path.name}' is {content.size / 2**20:.0f} MiB, over the limit of "
                            f"{limit / 2**20:.0f} MiB ([screening] max_file_bytes); export it at a smaller size")
        refuse_empty(content.data, path.name)  # first: a copy that has not written yet is neither unnamed nor not DICOM
        if is_dicom(content.data):  # the bytes hashed, not the file read again
            photo = read_dicom(content.data, name=path.name, limits=self.limits)
            identity = dicom_identity(photo, path, self.settings.filename_patterns)
            return identity, preprocess(photo.rgb, photo.size, self.image_size)
        if path.suffix.lower() in DICOM_SUFFIXES:
            raise Rejection(RejectReason.UNREADABLE,
                            f"'{path.name}' is named as DICOM but has no DICOM Part 10 header ('DICM' at byte 128); "
                            "export it again as a DICOM file")
        check_supported(path)
        if unidentified is not None:
            raise unidentified
        assert named is not None
        return named, decode_bytes(content.data, self.image_size, limits=self.limits, name=path.name)

    def _repair(self, known: _Known) -> None:
        """An image whose result is stored but whose state is not ``done``/``reported`` (left by a worker from
        before issue 12, which marked it ``failed`` when its file could not be archived): it is graded. Re-grading
        it would try to store a second result and fail every time."""
        if known.state in _GRADED:
            return

        def fix(session: Session) -> None:
            image = session.get(Image, known.image_id)
            if image is not None and image.result is not None and image.state not in _GRADED:
                repo.set_state(session, image, ImageState.DONE)
                repo.add_event(session, "repair", "its result was stored: marked graded", image=image,
                               code=Incident.RESULT_STATE_REPAIRED)

        transaction(self.factory, fix, what="repairing an image's state")
        log.warning("image %s had a stored result but state %r; marked graded", known.image_id, known.state)

    def _refuse_entry(self, path: Path, rejection: Rejection) -> IntakeOutcome:
        """Record and file an inbox entry that is not a photo to read (a link, a folder, a name left behind). It
        gets a drop without an image, identified by :func:`screening.intake.entry_sha256` (no link followed)."""
        try:
            sha = entry_sha256(path)
        except FileNotFoundError:
            return Vanished(path)

        def record(session: Session) -> tuple[int, bool]:
            self.hold(session, path)
            unfiled = repo.unfiled_drops(session, sha256=sha, source_name=path.name)
            if unfiled:
                return unfiled[0].id, True
            drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.REJECTED,
                                    reason=rejection.message, reason_code=rejection.code)
            return drop.id, False

        drop_id, resumed = transaction(self.factory, record, what="recording a refused entry")
        filed = self.filing.file_drop(drop_id, path, sha)
        if resumed:
            return Resumed(None, filed)
        log.warning("refused an inbox entry (drop %s): %s", drop_id, rejection.code.value)  # the code: no names
        return Rejected(None, rejection.code, rejection.message, filed)

    def _reject(self, path: Path, sha: str, known: _Known | None, rejection: Rejection) -> Rejected:
        """Record the refusal (a new content gets a ``rejected`` image; a known one keeps its state unless this
        very file was its pending drop), commit, then file it under ``rejected/``."""

        def record(session: Session) -> tuple[int, int]:
            self.hold(session, path)
            if known is None:
                image = repo.add_image(session, sha256=sha, source_name=path.name, state=ImageState.REJECTED,
                                       error=rejection.message, error_code=rejection.code, stored_path=path)
            else:
                found = session.get(Image, known.image_id)
                if found is None:
                    raise LookupError(f"image {known.image_id} vanished from the database while {path.name} was read")
                image = found
                if known.same_drop and image.state != ImageState.REJECTED:
                    repo.set_state(session, image, ImageState.REJECTED, rejection.message, code=rejection.code)
            drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.REJECTED, image=image,
                                    reason=rejection.message, reason_code=rejection.code)
            return image.id, drop.id

        image_id, drop_id = transaction(self.factory, record, what="recording a refusal")
        filed = self.filing.file_drop(drop_id, path, sha)
        # the code, no names; the drop tells apart the same bytes refused under several names
        log.warning("rejected image %s (drop %s, sha %s): %s", image_id, drop_id, sha[:12], rejection.code.value)
        return Rejected(image_id, rejection.code, rejection.message, filed)

    def _admit(self, path: Path, sha: str, known: _Known | None, identity: Identity, decoded: DecodedImage,
               verdict: IntakeVerdict) -> Job:
        """Commit the image as ``received`` in its patient's exam, with its intake checks; its file stays in the
        inbox until stored."""
        eye = verdict.eye.eye  # the stated eye, else the one the photo confidently shows

        def record(session: Session) -> Job:
            self.hold(session, path)
            patient = repo.get_or_create_patient(session, identity.patient_id)
            exam = repo.get_or_create_exam(session, patient, identity.exam_date or self.today())
            w, h = decoded.original_size
            if known is None:
                image = repo.add_image(session, sha256=sha, source_name=path.name, exam=exam, eye=eye,
                                       stored_path=path, width=w, height=h, device=identity.device)
                repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=image)
            else:  # received before a crash, failed and retried, or rejected earlier and dropped again
                found = session.get(Image, known.image_id)
                if found is None:
                    raise LookupError(f"image {known.image_id} vanished from the database while {path.name} was read")
                image = found
                if not known.same_drop:
                    drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=image)
                    if image.state == ImageState.REJECTED and image.gradable is None:
                        # refused before it was checked (a bad name or sidecar): it arrives for grading with this
                        # drop, so its turnaround and audit day start here, not at the refused arrival
                        image.received_at = drop.received_at
                image.exam, image.eye, image.stored_path, image.width, image.height = exam, eye, str(path), w, h
                image.source_name = path.name  # the name it is admitted under, not one it was refused under
                repo.set_device(session, image, identity.device)
                if image.state != ImageState.RECEIVED:
                    repo.set_state(session, image, ImageState.RECEIVED)
            record_verdict(session, image, verdict)
            session.flush()
            return Job(image.id, exam.id, path, sha, decoded, verdict.gradable)

        return transaction(self.factory, record, what="admitting a photo")

    def recover(self) -> None:
        """After a restart: images left ``received`` whose file is gone can never finish (marked failed); images
        whose result is stored but whose state says otherwise are marked graded; interrupted moves whose file is
        gone are closed (:meth:`Filing.close_stale`) and half-copied files are removed (:meth:`Filing.clean_partials`)."""

        def fix(session: Session) -> None:
            # files other workers are handling now: their images are theirs to finish, whatever this worker sees
            busy = self.claims.held_by_others(session, ClaimKind.FILE) if self.claims is not None else {}
            for image in repo.images_in_state(session, [ImageState.RECEIVED, ImageState.FAILED]):
                if image.stored_path and Path(image.stored_path).name in busy:
                    continue
                if image.result is not None:
                    repo.set_state(session, image, ImageState.DONE)
                    repo.add_event(session, "repair", "its result was stored: marked graded", image=image,
                                   code=Incident.RESULT_STATE_REPAIRED)
                elif image.state == ImageState.RECEIVED and (not image.stored_path or not Path(image.stored_path).is_file()):
                    repo.set_state(session, image, ImageState.FAILED,
                                   "the original file disappeared before it was graded; copy it into the inbox again",
                                   code=FailReason.ORIGINAL_MISSING)

        transaction(self.factory, fix, what="start-up recovery")
        self.filing.clean_partials()
        self.filing.close_stale()


__all__ = ["IntakeStage", "conflict_with", "record_verdict"]

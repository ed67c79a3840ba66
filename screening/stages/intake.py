"""Intake stage: a stable inbox file -> an identified, de-duplicated, decoded :class:`Job`, or a recorded
duplicate or refusal.

Per file, in this order:

1. hash it (SHA-256: the content's identity);
2. a move interrupted by a crash (a committed record whose file is still here) is finished: :class:`Resumed`;
3. content already graded, or being graded from another file still in the inbox: :class:`Duplicate`;
4. the checks, each raising :class:`~screening.rejection.Rejection` (supported suffix, patient / eye / date
   from the name or sidecar, a decodable image, then the intake checks of :mod:`screening.checks`: a colour
   fundus photo, and an eye that is stated or clearly visible): :class:`Rejected`;
5. otherwise the patient, exam, image (``received``, with its gradability verdict and eye check) and drop rows
   are committed: :class:`Admitted`. An ungradable photo is admitted too (its job says so): it is stored with
   its reasons instead of being graded.

The database is written before any file moves (:mod:`screening.stages.filing`). Nothing here runs the grading
model; the intake checks' small models run here, on the decoded photo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from training.common import sha256_file

from ..checks import IntakeChecks, IntakeVerdict
from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import DropOutcome, Image, ImageState
from ..db.session import session_scope
from ..imaging import DecodedImage, decode
from ..intake import Identity, check_supported, parse_identity
from ..rejection import Rejection
from .filing import Filing
from .outcomes import Admitted, Duplicate, IntakeOutcome, Job, Rejected, Resumed, Vanished

log = logging.getLogger("screening")

_GRADED = (ImageState.DONE, ImageState.REPORTED)


@dataclass(frozen=True)
class _Known:
    """What the database knows of a file's content, read in one transaction."""

    image_id: int
    state: str
    same_drop: bool  # the image's own file is this very path (its drop was recorded, its move is pending)
    in_flight_elsewhere: bool  # received from another file that is still in the inbox

    @classmethod
    def of(cls, image: Image, path: Path) -> _Known:
        stored = image.stored_path
        return cls(
            image_id=image.id, state=image.state, same_drop=stored == str(path),
            in_flight_elsewhere=(image.state == ImageState.RECEIVED and bool(stored) and stored != str(path)
                                 and Path(stored or "").is_file()),
        )

    @property
    def graded(self) -> bool:
        return self.state in _GRADED

    @property
    def duplicate(self) -> bool:
        return (self.graded and not self.same_drop) or self.in_flight_elsewhere


class IntakeStage:
    def __init__(
        self, settings: ScreeningSettings, factory: sessionmaker[Session], filing: Filing, image_size: int,
        checks: IntakeChecks, today: Callable[[], date] = date.today,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.filing = filing
        self.image_size = image_size  # the model's input size: images are decoded no larger than needed
        self.checks = checks
        self.today = today

    def admit(self, path: Path) -> IntakeOutcome:
        """One stable file through the steps of the module docstring."""
        if not path.is_file():
            return Vanished(path)
        sha = sha256_file(path)
        duplicate_drop: int | None = None
        with session_scope(self.factory) as session:
            unfiled = [(d.id, d.image_id) for d in repo.unfiled_drops(session, sha256=sha, source_name=path.name)]
            image = repo.get_image_by_sha(session, sha)
            known = _Known.of(image, path) if image is not None else None
            if not unfiled and image is not None and known is not None and known.duplicate:
                drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.DUPLICATE,
                                        image=image, reason=f"same content as image {image.id}")
                duplicate_drop = drop.id
        # committed: from here on files may move
        if unfiled:
            drop_id, image_id = unfiled[0]
            log.info("finishing the interrupted move of a drop of image %s", image_id)
            return Resumed(image_id, self.filing.file_drop(drop_id, path, sha))
        if known is not None and known.graded and known.same_drop:  # graded, committed, archive interrupted
            log.info("image %s was graded before an interruption; archiving its file now", known.image_id)
            return Resumed(known.image_id, self.filing.archive_image(known.image_id, path, sha))
        if known is not None and duplicate_drop is not None:
            log.info("duplicate of image %s", known.image_id)
            return Duplicate(known.image_id, self.filing.file_drop(duplicate_drop, path, sha))
        try:
            check_supported(path)
            identity = parse_identity(path, self.settings.filename_patterns)
            decoded = decode(path, self.image_size)
            verdict = self.checks.check(decoded, identity, path.name)
        except Rejection as rejection:
            return self._reject(path, sha, known, rejection)
        decoded = replace(decoded, frame=None)  # the full frame was for the checks; jobs wait in memory without it
        return Admitted(self._admit(path, sha, known, identity, decoded, verdict))

    def _reject(self, path: Path, sha: str, known: _Known | None, rejection: Rejection) -> Rejected:
        """Record the refusal (a new content gets a ``rejected`` image; a known one keeps its state unless this
        very file was its pending drop), commit, then file it under ``rejected/``."""
        with session_scope(self.factory) as session:
            if known is None:
                image = repo.add_image(session, sha256=sha, source_name=path.name, state=ImageState.REJECTED,
                                       error=rejection.message, stored_path=path)
            else:
                found = session.get(Image, known.image_id)
                if found is None:
                    raise LookupError(f"image {known.image_id} vanished from the database while {path.name} was read")
                image = found
                if known.same_drop and image.state != ImageState.REJECTED:
                    repo.set_state(session, image, ImageState.REJECTED, rejection.message)
            drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.REJECTED, image=image,
                                    reason=rejection.message)
            image_id, drop_id = image.id, drop.id
        filed = self.filing.file_drop(drop_id, path, sha)
        log.warning("rejected image %s (sha %s): %s", image_id, sha[:12], rejection.code.value)  # the code: no names
        return Rejected(image_id, rejection.code, rejection.message, filed)

    def _admit(self, path: Path, sha: str, known: _Known | None, identity: Identity, decoded: DecodedImage,
               verdict: IntakeVerdict) -> Job:
        """Commit the image as ``received`` in its patient's exam, with its intake checks; its file stays in the
        inbox until stored."""
        eye = verdict.eye.eye
        with session_scope(self.factory) as session:
            patient = repo.get_or_create_patient(session, identity.patient_id)
            exam = repo.get_or_create_exam(session, patient, identity.exam_date or self.today())
            w, h = decoded.original_size
            if known is None:
                image = repo.add_image(session, sha256=sha, source_name=path.name, exam=exam, eye=eye,
                                       stored_path=path, width=w, height=h)
                repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=image)
            else:  # received before a crash, failed and retried, or rejected earlier and dropped again
                found = session.get(Image, known.image_id)
                if found is None:
                    raise LookupError(f"image {known.image_id} vanished from the database while {path.name} was read")
                image = found
                if not known.same_drop:
                    repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=image)
                image.exam, image.eye, image.stored_path, image.width, image.height = exam, eye, str(path), w, h
                if image.state != ImageState.RECEIVED:
                    repo.set_state(session, image, ImageState.RECEIVED)
            prediction = verdict.eye.prediction
            repo.record_checks(
                session, image, gradable=verdict.gradable, reasons=verdict.quality.reasons, scores=verdict.quality.scores,
                eye_source=verdict.eye.source, predicted_eye=prediction.eye, eye_confidence=prediction.confidence,
                eye_mismatch=verdict.eye.mismatch, eye_note=verdict.eye.note(),
            )
            session.flush()
            return Job(image.id, exam.id, path, sha, decoded, verdict.gradable)

    def recover(self) -> None:
        """After a restart: images left ``received`` whose file is gone can never finish (marked failed), and
        interrupted moves whose file is gone are closed (:meth:`Filing.close_stale`)."""
        with session_scope(self.factory) as session:
            for image in repo.images_in_state(session, [ImageState.RECEIVED]):
                if not image.stored_path or not Path(image.stored_path).is_file():
                    repo.set_state(session, image, ImageState.FAILED,
                                   "the original file disappeared before it was graded; copy it into the inbox again")
        self.filing.close_stale()


__all__ = ["IntakeStage"]

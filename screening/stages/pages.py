"""Multi-page files: a TIFF holding several photos is graded page by page, instead of being refused (or, before
issue 12, read as its first page alone).

How a page maps to the records
------------------------------
* The file is one arrival: one ``drops`` row (outcome ``new``, the file's SHA-256), attached to the image of
  its first page. Dropped again, the whole file is a duplicate, or an identity conflict, like any file.
* Each full-size page is an ``images`` row: ``page`` is its number in the file (1 = the first directory,
  thumbnails counted, as viewers number pages), ``file_sha256`` the file's hash, and ``sha256`` names the page:
  the SHA-256 of ``<file sha256>/page/<number>`` (:func:`page_sha256`: unique, and the same whenever the same
  bytes arrive, so a page's pictures have their own ``work/`` folder). Its ``source_name`` is
  ``<file name> (page N)``, which is how the report and the review page show it.
* A page is judged exactly as a single photo is: decoded (a page too small to be a photo is refused), then the
  intake checks of :mod:`screening.checks` on it alone (:meth:`PageIntake.check`, the same
  :meth:`~screening.checks.IntakeChecks.check` call): a page that is not a colour fundus photo, or whose eye is
  neither stated by the file name nor clearly visible, is a ``rejected`` image with its reason and code
  (``not_fundus``, ``identity``, ``too_small``); any other page is ``received`` with its gradability verdict and
  eye check, and is then graded (one result per page) or, ungradable, stored without a grade with its reasons.
  Each page has its own eye: the one the file name states (a confident disagreement is a recorded mismatch),
  else the one that page shows, so a file holding both eyes under a name without one is filed eye by eye.
  A file none of whose pages passes is refused as a whole, as one image with the file's own hash and every
  page's reason. What is wrong with the file itself (more than ``max_pages`` pages, a page over ``max_pixels``,
  incomplete or corrupt data) refuses it as a whole before any page is recorded.

Commit, then move: the file stays in the inbox until its last page is stored (graded, or stored as ungradable),
then it is archived once (:meth:`~screening.stages.filing.Filing.archive_pages`) and every page's ``stored_path`` names
the archived file. A worker stopped in between finds the file in the inbox with some pages graded: the next
intake admits the pages not graded yet, in the visit the file was first filed in (a name without a date would
otherwise put them in the day of the retry's visit), or, when every page is done, only finishes the move. A graded
page is never moved to another visit: its result and reports belong to its own; a file renamed meanwhile to another
patient is refused as an identity conflict rather than split between the two. The audit counts
the file once by its drop and each page once by its image's state.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from ..checks import IntakeVerdict
from ..db import repository as repo
from ..db.models import DropOutcome, Exam, Image, ImageState
from ..db.session import transaction
from ..imaging import DecodedImage, Page, decode_pages
from ..intake import Content, Identity
from ..rejection import Incident, Rejection, RejectReason
from .outcomes import AdmittedPages, IntakeOutcome, Job, Resumed

if TYPE_CHECKING:
    from .intake import IntakeStage

log = logging.getLogger("screening")

_GRADED = (ImageState.DONE, ImageState.REPORTED)


def page_sha256(file_sha256: str, number: int) -> str:
    """The ``images.sha256`` of page ``number`` of the file whose bytes hash to ``file_sha256``."""
    return hashlib.sha256(f"{file_sha256.lower()}/page/{number}".encode("ascii")).hexdigest()


def page_name(file_name: str, number: int) -> str:
    """How a page is named wherever a photo's name is shown (its image's ``source_name``, its refusal)."""
    return f"{file_name} (page {number})"


def page_settled(image: Image) -> bool:
    """A page needs nothing more before its file may leave the inbox: stored (graded, or ungradable: ``done``
    without a result) or refused."""
    return image.state in (*_GRADED, ImageState.REJECTED) or image.result is not None


@dataclass(frozen=True)
class _Pages:
    """What the database knows of a multi-page file's pages, read in one transaction."""

    first_id: int
    settled: bool  # every page graded or refused
    same_drop: bool  # the pages' file is this very path (recorded; its move is pending)
    in_flight_elsewhere: bool  # pages received from another file that is still in the inbox

    @classmethod
    def of(cls, pages: list[Image], path: Path) -> _Pages:
        here = str(path)
        return cls(
            first_id=pages[0].id, settled=all(page_settled(p) for p in pages),
            same_drop=any(p.stored_path == here for p in pages),
            in_flight_elsewhere=any(p.state == ImageState.RECEIVED and bool(p.stored_path) and p.stored_path != here
                                    and Path(p.stored_path or "").is_file() for p in pages),
        )

    @property
    def duplicate(self) -> bool:
        return (self.settled and not self.same_drop) or self.in_flight_elsewhere


@dataclass(frozen=True)
class CheckedPage:
    """One page after the intake checks, as a single photo is after them: admitted (its photo in the model's
    frame, without the whole-size pixels the checks needed, and its verdict) or refused (why)."""

    number: int
    size: tuple[int, int]
    decoded: DecodedImage | None
    verdict: IntakeVerdict | None
    rejection: Rejection | None


def no_photo_in(name: str, pages: list[CheckedPage]) -> Rejection:
    """The refusal of a multi-page file none of whose pages passed the intake checks: every page's reason, under
    the code they share (``not_fundus`` when they differ)."""
    reasons = [p.rejection for p in pages if p.rejection is not None]
    codes = {r.code for r in reasons}
    code = codes.pop() if len(codes) == 1 else RejectReason.NOT_FUNDUS
    listed = "; ".join(r.message for r in reasons)
    return Rejection(code, f"none of the {len(pages)} pictures in '{name}' is a colour fundus photo that can be filed "
                           f"({listed}); export the fundus photos again")


def _graded_for_another(session: Session, sha: str, identity: Identity) -> str | None:
    """Why a file whose pages were partly graded cannot be admitted again under ``identity``: its name now says
    another patient than its graded pages were filed under (renamed in the inbox after a stop mid-file). Its pages
    would otherwise be split between two patients. None when they agree."""
    for page in repo.pages_of_file(session, sha):
        if (page.result is not None or page.state in _GRADED) and page.exam is not None and (
                page.exam.patient.code.lower() != identity.patient_id.lower()):
            return (f"pages of this file were already graded for another patient (image {page.id}); one of the two "
                    "names is wrong. The rest was not graded: check which patient the file belongs to and correct the "
                    "record of the wrong one")
    return None


def _visit_of(pages: Iterable[Image], patient_id: int) -> Exam | None:
    """The visit a file's pages were filed in when it was first admitted, if any and the patient's. A file whose
    name states no date is admitted again (after a restart, a failed page) into that visit, not today's: a retry
    after midnight would otherwise file its remaining pages in another visit than its graded ones."""
    return next((p.exam for p in pages if p.exam is not None and p.exam.patient_id == patient_id), None)


class PageIntake:
    """The intake stage's path for a file holding several photos (:func:`screening.imaging.several_pictures`)."""

    def __init__(self, stage: IntakeStage) -> None:
        self.stage = stage

    def admit(self, path: Path, content: Content, identity: Identity | None, unidentified: Rejection | None) -> IntakeOutcome:
        """The file through the same steps as a single photo (see :mod:`screening.stages.intake`), page by page."""
        stage, sha = self.stage, content.sha256

        def look(session: Session) -> tuple[list[tuple[int, int | None]], _Pages | None, int | None, str | None]:
            stage.hold(session, path)
            unfiled = [(d.id, d.image_id) for d in repo.unfiled_drops(session, sha256=sha, source_name=path.name)]
            pages = repo.pages_of_file(session, sha)
            known = _Pages.of(pages, path) if pages else None
            if unfiled or known is None or not known.duplicate:
                return unfiled, known, None, None
            return unfiled, known, *stage.record_repeat(session, path, sha, pages[0], identity,
                                                        f"images {pages[0].id}-{pages[-1].id}")

        unfiled, known, drop_id, conflict = transaction(stage.factory, look, what="intake")
        # committed: from here on files may move
        if unfiled:
            return stage.resume_drop(path, sha, *unfiled[0])
        if known is not None and known.settled and known.same_drop:  # every page done, archive interrupted
            self._repair(sha)
            log.info("the pages from image %s on were graded before an interruption; archiving their file now", known.first_id)
            return Resumed(known.first_id, stage.filing.archive_pages(sha, path))
        if known is not None and drop_id is not None:
            return stage.file_repeat(path, sha, drop_id, conflict, known.first_id,
                                     f"the pages from image {known.first_id} on")
        if unidentified is not None:
            return stage.refuse(path, content, unidentified)
        assert identity is not None and content.data is not None
        if known is not None and (moved := transaction(stage.factory, lambda s: _graded_for_another(s, sha, identity),
                                                       what="reading the pages of a file")):
            return stage.refuse(path, content, Rejection(RejectReason.IDENTITY_CONFLICT, f"'{path.name}': {moved}"))
        try:  # one page decoded and judged at a time: only its photo in the model's frame is kept
            pages = [self.check(page, identity, path.name)
                     for page in decode_pages(content.data, stage.image_size, limits=stage.limits, name=path.name)]
        except Rejection as rejection:  # the file itself: over the limits, incomplete or corrupt
            return stage.refuse(path, content, rejection)
        if all(p.verdict is None for p in pages):
            return stage.refuse(path, content, no_photo_in(path.name, pages))
        return self._admit(path, sha, known, identity, pages)

    def check(self, page: Page, identity: Identity, file_name: str) -> CheckedPage:
        """A decoded page through the intake checks, exactly as a single photo (the same
        :meth:`~screening.checks.IntakeChecks.check` on the whole page, named as the page is shown): refused when
        it is not a colour fundus photo or its eye is neither stated nor visible, otherwise admitted with its
        verdict, gradable or not. The page's whole-size pixels are dropped here."""
        name = page_name(file_name, page.number)
        if page.decoded is None:  # too small to be a photo: decoding refused it, as it refuses such a file
            assert page.rejection is not None
            refused = Rejection(page.rejection.code, f"'{name}': {page.rejection.message}")
            return CheckedPage(page.number, page.size, None, None, refused)
        try:
            verdict = self.stage.checks.check(page.decoded, identity, name)
        except Rejection as rejection:
            return CheckedPage(page.number, page.size, None, None, rejection)
        return CheckedPage(page.number, page.size, replace(page.decoded, whole=None), verdict, None)

    def _admit(self, path: Path, sha: str, known: _Pages | None, identity: Identity,
               pages: list[CheckedPage]) -> AdmittedPages:
        """Commit every page (``received`` with its intake checks, or ``rejected`` with its reason) in the patient's
        exam, and the file's drop; pages stored before (a retry, a restart) keep their result or verdict. The file
        stays in the inbox."""
        from .intake import record_verdict  # intake imports this module

        stage = self.stage

        def record(session: Session) -> AdmittedPages:
            stage.hold(session, path)  # several workers: the file's claim covers all its pages
            patient = repo.get_or_create_patient(session, identity.patient_id)
            recorded = {image.page: image for image in repo.pages_of_file(session, sha)}
            exam = _visit_of(recorded.values(), patient.id) if identity.exam_date is None else None
            if exam is None:
                exam = repo.get_or_create_exam(session, patient, identity.exam_date or stage.today())
            images: list[Image] = []
            jobs: list[Job] = []
            refused: list[int] = []
            for page in pages:
                rejection, verdict = page.rejection, page.verdict
                # the eye of an admitted page is its own (stated, else the one it shows); a refused page keeps the stated one
                eye = identity.eye if verdict is None else verdict.eye.eye
                (w, h), image = page.size, recorded.get(page.number)
                if image is None:
                    image = repo.add_image(
                        session, sha256=page_sha256(sha, page.number), source_name=page_name(path.name, page.number),
                        exam=exam, eye=eye, stored_path=path, width=w, height=h, device=identity.device,
                        page=page.number, file_sha256=sha, state=ImageState.RECEIVED if rejection is None else ImageState.REJECTED,
                        error=None if rejection is None else rejection.message,
                        error_code=None if rejection is None else rejection.code)
                    if rejection is not None:
                        refused.append(image.id)
                else:  # recorded before: received before a crash, failed and retried, or dropped again
                    image.stored_path, image.width, image.height = str(path), w, h
                    repo.set_device(session, image, identity.device)
                    if image.result is not None or image.state in _GRADED:  # stored (graded or ungradable): kept,
                        if image.state not in _GRADED:  # in the visit its result and reports belong to
                            repo.set_state(session, image, ImageState.DONE)
                        images.append(image)
                        continue
                    image.exam = exam
                    image.eye = eye
                    image.source_name = page_name(path.name, page.number)  # the name it is admitted under now
                    if rejection is not None and image.state != ImageState.REJECTED:
                        repo.set_state(session, image, ImageState.REJECTED, rejection.message, code=rejection.code)
                        refused.append(image.id)
                    elif rejection is None and image.state != ImageState.RECEIVED:
                        repo.set_state(session, image, ImageState.RECEIVED)
                images.append(image)
                if verdict is not None and page.decoded is not None:
                    record_verdict(session, image, verdict)
                    jobs.append(Job(image.id, exam.id, path, image.sha256, page.decoded, gradable=verdict.gradable,
                                    file_sha256=sha))
            if known is None or not known.same_drop:
                repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=images[0])
            session.flush()
            return AdmittedPages(tuple(jobs), tuple(refused))

        admitted = transaction(stage.factory, record, what="admitting the pages of a file")
        log.info("a file of %d pages: %d admitted (%d ungradable), %d refused", len(pages), len(admitted.jobs),
                 sum(not j.gradable for j in admitted.jobs), len(admitted.refused))
        return admitted

    def _repair(self, sha: str) -> None:
        """Pages whose result is stored but whose state says otherwise are graded (see ``IntakeStage._repair``)."""

        def fix(session: Session) -> None:
            for image in repo.pages_of_file(session, sha):
                if image.result is not None and image.state not in _GRADED:
                    repo.set_state(session, image, ImageState.DONE)
                    repo.add_event(session, "repair", "its result was stored: marked graded", image=image,
                                   code=Incident.RESULT_STATE_REPAIRED)

        transaction(self.stage.factory, fix, what="repairing the pages' states")


__all__ = ["CheckedPage", "PageIntake", "no_photo_in", "page_name", "page_settled", "page_sha256"]

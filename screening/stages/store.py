"""Store stage: one graded image's outputs, then its result row, then its original to the archive. An image the
intake checks judged ungradable is stored the same way without a grade (:meth:`StoreStage.save_ungradable`): its
display photo, the ``done`` state (no result row: it gets no DR grade), then the archive.

Masks, overlay, heatmaps and the display photo are published as one folder (``work/<sha[:2]>/<sha>``): the
report's pictures in the cropped square frame (``photo.jpg``, ``overlay.jpg``, ``mask_<code>.png``, heat maps)
and, for viewers that overlay a mask on the clinic's own photo, one lossless TIFF per lesion at the original
photo's width and height (``mask_<code>.tif``: the frame's crop, padding and resize undone);
the result and the ``done`` state are committed in one transaction; only then does the original leave the
inbox (:meth:`~screening.stages.filing.Filing.archive_image`). A crash before the commit redoes the image;
a crash after it leaves a ``done`` image whose file intake archives on restart, and so does an archive that
cannot take the file now (full, read-only): the image stays ``done``, never ``failed``, and its report is
made all the same. An image that already has a result (stored by an earlier attempt) keeps it. A page of a
multi-page file (:mod:`screening.stages.pages`), graded or ungradable, leaves its file in the inbox until the last
of the file's pages is stored; that page's store archives the file once (:attr:`Stored.awaits_pages` on the others). Where several workers share
the inbox, the file's claim (:mod:`screening.claims`) covers all its pages: one worker stores them all, and a
worker whose claim was taken over commits none of them (``ClaimLost``), so no page is stored twice and the file
is archived once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from training.common import LESION_CODES, atomic_write_dir

from ..claims import Claimer
from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import ClaimKind, Image, ImageState, utcnow
from ..db.session import DatabaseGone, log_failure, transaction
from ..explain import cam_overlay, lesion_overlay
from ..findings import PHOTO_FILE
from ..inference import ImagePrediction, Predictor
from ..rejection import FailReason
from .filing import Filing, MoveFailed
from .outcomes import Failed, Job, Stored
from .pages import page_settled

log = logging.getLogger("screening")


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """Report pictures are JPEG: WeasyPrint embeds JPEG as is but re-encodes PNG (measured ~0.35 s each)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"could not write {path}")


# TIFF compression PackBits (32773): baseline TIFF, so every reader has it; lossless; on a mostly empty 12-megapixel
# mask 24 ms where Deflate took 135 ms and LZW 180 ms (OpenCV's encoders, measured on this machine).
_TIFF_PACKBITS = 32773


def _write_tiff(path: Path, mask: np.ndarray) -> None:
    """One single-channel 8-bit mask (0 or 255), losslessly."""
    if not cv2.imwrite(str(path), mask, [cv2.IMWRITE_TIFF_COMPRESSION, _TIFF_PACKBITS]):
        raise OSError(f"could not write {path}")


def _image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise LookupError(f"image {image_id} is not in the database")
    return image


class StoreStage:
    def __init__(self, settings: ScreeningSettings, factory: sessionmaker[Session], filing: Filing, predictor: Predictor,
                 claims: Claimer | None = None) -> None:
        self.settings = settings
        self.factory = factory
        self.filing = filing
        self.predictor = predictor  # names the model and device in each result
        self.claims = claims  # several workers: the result is committed only while this worker holds the file

    def write_outputs(self, job: Job, pred: ImagePrediction) -> dict[str, Path]:
        """Masks (report frame and original size), overlay, heatmaps and the display photo, published together
        (:func:`training.common.atomic_write_dir`). Keys: ``dir``, ``photo``, ``overlay``, ``dr_cam``, ``dme_cam``
        and ``mask_<code>.tif`` per lesion code."""
        disp = job.decoded.display
        size = disp.shape[0]

        def fill(folder: Path) -> None:
            masks = np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in pred.masks])
            for k, code in enumerate(LESION_CODES):
                cv2.imwrite(str(folder / f"mask_{code}.png"), masks[k] * 255)
            for code, original in zip(LESION_CODES, job.decoded.geometry.to_original(pred.masks)):
                _write_tiff(folder / f"mask_{code}.tif", original)
            _write_jpeg(folder / PHOTO_FILE, disp, 92)
            _write_jpeg(folder / "overlay.jpg", lesion_overlay(disp, masks, LESION_CODES))
            small = cv2.resize(disp, (256, 256), interpolation=cv2.INTER_AREA)  # heatmaps print small: 256 px
            for name, cam in (("dr_cam", pred.dr_cam), ("dme_cam", pred.dme_cam)):
                _write_jpeg(folder / f"{name}.jpg", cam_overlay(small, cv2.resize(cam, (256, 256), interpolation=cv2.INTER_LINEAR)))

        final = atomic_write_dir(self.settings.work_dir / job.sha256[:2] / job.sha256, fill)
        return {"dir": final, "photo": final / PHOTO_FILE, "overlay": final / "overlay.jpg",
                "dr_cam": final / "dr_cam.jpg", "dme_cam": final / "dme_cam.jpg",
                **{f"mask_{code}.tif": final / f"mask_{code}.tif" for code in LESION_CODES}}

    def photo_dir(self, sha256: str) -> Path:
        """Where an image's pictures are published: one folder per content."""
        return self.settings.work_dir / sha256[:2] / sha256

    def save_ungradable(self, job: Job) -> Stored:
        """Persist an ungradable image: its display photo for the report (the verdict was recorded at intake), the
        folder and time (``images.photo_dir``, ``images.stored_at``: it has no result row to carry them) and the
        ``done`` state in one transaction, then the archive. Nothing is graded."""
        if job.gradable:
            raise ValueError(f"image {job.image_id} is gradable; grade it and store it with save()")
        folder = atomic_write_dir(self.photo_dir(job.sha256),
                                  lambda out: _write_jpeg(out / PHOTO_FILE, job.decoded.display, 92))

        def record(session: Session) -> tuple[int | None, bool]:
            self._hold(session, job)
            image = _image(session, job.image_id)
            if image.state not in (ImageState.DONE, ImageState.REPORTED):
                image.photo_dir, image.stored_at = str(folder), utcnow()
                repo.set_state(session, image, ImageState.DONE)
            return image.exam_id, self._awaits_pages(session, job)

        exam_id, awaits_pages = transaction(self.factory, record, what="storing an ungradable photo")
        if exam_id is None:
            raise LookupError(f"image {job.image_id} has no exam; its verdict is stored but no report can include it")
        return self._finish(job, exam_id, awaits_pages)

    def _hold(self, session: Session, job: Job) -> None:
        """Several workers: first in each transaction that stores claimed work, renew this worker's claim on the
        file (all the pages of a multi-page file are one claim), or raise ClaimLost when another worker took it
        over (that worker stores the image, and archives the file)."""
        if self.claims is not None and self.claims.holds(ClaimKind.FILE, job.path.name):
            self.claims.hold(session, ClaimKind.FILE, job.path.name)

    @staticmethod
    def _awaits_pages(session: Session, job: Job) -> bool:
        """A page of a multi-page file (:mod:`screening.stages.pages`) whose file holds pages not settled yet:
        read in the transaction that settles this one, so exactly one page's store archives the file."""
        return job.file_sha256 is not None and not all(page_settled(p) for p in repo.pages_of_file(session, job.file_sha256))

    def save(self, job: Job, pred: ImagePrediction, inference_ms: float) -> Stored:
        """Persist one result, then archive the original (see the module docstring)."""
        files = self.write_outputs(job, pred)

        def record(session: Session) -> tuple[int | None, bool]:
            self._hold(session, job)
            image = _image(session, job.image_id)
            if image.result is None:
                repo.add_result(
                    session, image, model_version=self.predictor.version,
                    checkpoint_sha256=self.predictor.meta["checkpoint_sha256"], dr_grade=pred.dr_grade,
                    dr_probs=pred.dr_probs, dme_grade=pred.dme_grade, dme_probs=pred.dme_probs,
                    referable_score=pred.referable_score, referable=pred.referable, lesion_areas=pred.lesion_areas,
                    mask_dir=files["dir"], overlay_path=files["overlay"], dr_cam_path=files["dr_cam"],
                    dme_cam_path=files["dme_cam"],
                    original_masks={code: files[f"mask_{code}.tif"] for code in LESION_CODES},
                    device=str(self.predictor.device), inference_ms=inference_ms, site=self.settings.site,
                )
            if image.state not in (ImageState.DONE, ImageState.REPORTED):
                image.stored_at = utcnow()
                repo.set_state(session, image, ImageState.DONE)
            return image.exam_id, self._awaits_pages(session, job)

        exam_id, awaits_pages = transaction(self.factory, record, what="storing a result")
        if exam_id is None:  # admitted images always have one; a row edited by hand might not
            raise LookupError(f"image {job.image_id} has no exam; its result is stored but no report can include it")
        return self._finish(job, exam_id, awaits_pages)

    def _finish(self, job: Job, exam_id: int, awaits_pages: bool) -> Stored:
        """Committed: now the original may leave the inbox, unless it is a page whose file holds pages not stored
        yet (the file leaves with the last of them). If it cannot move now (recorded by the filing), it stays there
        and the next intake of it (same file, image done) finishes the move."""
        if awaits_pages:
            return Stored(job.image_id, exam_id, None, awaits_pages=True)
        try:
            archived = (self.filing.archive_image(job.image_id, job.path, job.sha256) if job.file_sha256 is None
                        else self.filing.archive_pages(job.file_sha256, job.path))
        except DatabaseGone:
            raise
        except MoveFailed:
            archived = None
        except Exception as exc:  # noqa: BLE001 - log_failure logs it
            log_failure(log, exc, "image %s is stored but its file could not be archived now; it will be on the next "
                        "pass", job.image_id)
            archived = None
        return Stored(job.image_id, exam_id, archived)

    def fail(self, job: Job, exc: BaseException, code: FailReason = FailReason.GRADING) -> Failed:
        """Record why grading or storing failed (``code``, and a short text without SQL or parameters); the file
        stays in the inbox and is retried. An image whose result (or ungradable verdict) is stored meanwhile is not
        marked failed."""
        reason = f"processing failed ({describe(exc)}); the file was kept in the inbox and will be retried"

        def record(session: Session) -> None:
            image = _image(session, job.image_id)
            if image.result is None and image.state not in (ImageState.DONE, ImageState.REPORTED):
                repo.set_state(session, image, ImageState.FAILED, reason, code=code)

        transaction(self.factory, record, what="recording a failure")
        log.error("image %s failed (%s): %s", job.image_id, code.value, type(exc).__name__, exc_info=exc)
        return Failed(job.image_id, reason)


def describe(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters. A database error is described by its
    driver's message alone: SQLAlchemy's text carries the SQL and its parameters (patient ids, paths), and made
    one cause look like many in the audit."""
    from sqlalchemy.exc import DBAPIError

    inner: BaseException = exc.orig if isinstance(exc, DBAPIError) and isinstance(exc.orig, BaseException) else exc
    text = (str(inner).strip().splitlines() or [""])[0]
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return described if len(described) <= limit else described[: limit - 3] + "..."


__all__ = ["StoreStage", "describe"]

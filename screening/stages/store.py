"""Store stage: one graded image's outputs, then its result row, then its original to the archive. An image the
intake checks judged ungradable is stored the same way without a grade: its display photo, the ``done`` state
(no result row: it gets no DR grade), then the archive.

Masks, overlay, heatmaps and the display photo are published as one folder (``work/<sha[:2]>/<sha>``);
the result and the ``done`` state are committed in one transaction; only then does the original leave the
inbox (:meth:`~screening.stages.filing.Filing.archive_image`). A crash before the commit redoes the image;
a crash after it leaves a ``done`` image whose file intake archives on restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from training.common import LESION_CODES, atomic_write_dir

from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import Image, ImageState
from ..db.session import session_scope
from ..explain import cam_overlay, lesion_overlay
from ..inference import ImagePrediction, Predictor
from .filing import Filing
from .outcomes import Failed, Job, Stored

log = logging.getLogger("screening")


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """Report pictures are JPEG: WeasyPrint embeds JPEG as is but re-encodes PNG (measured ~0.35 s each)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"could not write {path}")


def photo_folder(work_dir: Path, sha256: str) -> Path:
    """Where an image's pictures (photo, masks, overlay, heatmaps) are published: one folder per content."""
    return work_dir / sha256[:2] / sha256


def _image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise LookupError(f"image {image_id} is not in the database")
    return image


class StoreStage:
    def __init__(self, settings: ScreeningSettings, factory: sessionmaker[Session], filing: Filing, predictor: Predictor) -> None:
        self.settings = settings
        self.factory = factory
        self.filing = filing
        self.predictor = predictor  # names the model and device in each result

    def write_outputs(self, job: Job, pred: ImagePrediction) -> dict[str, Path]:
        """Masks, overlay, heatmaps and the display photo, published together (:func:`training.common.atomic_write_dir`)."""
        disp = job.decoded.display
        size = disp.shape[0]

        def fill(folder: Path) -> None:
            masks = np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in pred.masks])
            for k, code in enumerate(LESION_CODES):
                cv2.imwrite(str(folder / f"mask_{code}.png"), masks[k] * 255)
            _write_jpeg(folder / "photo.jpg", disp, 92)
            _write_jpeg(folder / "overlay.jpg", lesion_overlay(disp, masks, LESION_CODES))
            small = cv2.resize(disp, (256, 256), interpolation=cv2.INTER_AREA)  # heatmaps print small: 256 px
            for name, cam in (("dr_cam", pred.dr_cam), ("dme_cam", pred.dme_cam)):
                _write_jpeg(folder / f"{name}.jpg", cam_overlay(small, cv2.resize(cam, (256, 256), interpolation=cv2.INTER_LINEAR)))

        final = atomic_write_dir(self.photo_dir(job.sha256), fill)
        return {"dir": final, "photo": final / "photo.jpg", "overlay": final / "overlay.jpg",
                "dr_cam": final / "dr_cam.jpg", "dme_cam": final / "dme_cam.jpg"}

    def photo_dir(self, sha256: str) -> Path:
        return photo_folder(self.settings.work_dir, sha256)

    def save_ungradable(self, job: Job) -> Stored:
        """Persist an ungradable image: its photo for the report (the verdict is already recorded at intake), the
        ``done`` state, then the archive. Nothing is graded."""
        if job.gradable:
            raise ValueError(f"image {job.image_id} is gradable; grade it and store it with save()")
        atomic_write_dir(self.photo_dir(job.sha256), lambda folder: _write_jpeg(folder / "photo.jpg", job.decoded.display, 92))
        with session_scope(self.factory) as session:
            image = _image(session, job.image_id)
            repo.set_state(session, image, ImageState.DONE)
            exam_id = image.exam_id
        if exam_id is None:
            raise LookupError(f"image {job.image_id} has no exam; its verdict is stored but no report can include it")
        return Stored(job.image_id, exam_id, self._archive(job))

    def _archive(self, job: Job) -> Path | None:
        """Committed: now the original may leave the inbox. If it cannot move now, it stays there and the next intake
        of it (same file, image done) finishes the move."""
        try:
            return self.filing.archive_image(job.image_id, job.path, job.sha256)
        except Exception:
            log.exception("image %s is stored but its file could not be archived now; it will be on the next pass",
                          job.image_id)
            return None

    def save(self, job: Job, pred: ImagePrediction, inference_ms: float) -> Stored:
        """Persist one result, then archive the original (see the module docstring)."""
        files = self.write_outputs(job, pred)
        with session_scope(self.factory) as session:
            image = _image(session, job.image_id)
            repo.add_result(
                session, image, model_version=self.predictor.version,
                checkpoint_sha256=self.predictor.meta["checkpoint_sha256"], dr_grade=pred.dr_grade, dr_probs=pred.dr_probs,
                dme_grade=pred.dme_grade, dme_probs=pred.dme_probs, referable_score=pred.referable_score,
                referable=pred.referable, lesion_areas=pred.lesion_areas, mask_dir=files["dir"],
                overlay_path=files["overlay"], dr_cam_path=files["dr_cam"], dme_cam_path=files["dme_cam"],
                device=str(self.predictor.device), inference_ms=inference_ms,
            )
            repo.set_state(session, image, ImageState.DONE)
            exam_id = image.exam_id
        if exam_id is None:  # admitted images always have one; a row edited by hand might not
            raise LookupError(f"image {job.image_id} has no exam; its result is stored but no report can include it")
        return Stored(job.image_id, exam_id, self._archive(job))

    def fail(self, job: Job, exc: BaseException) -> Failed:
        """Record why grading or storing failed; the file stays in the inbox and is retried when seen again."""
        reason = f"processing failed ({type(exc).__name__}: {exc}); the file was kept in the inbox and will be retried"
        with session_scope(self.factory) as session:
            repo.set_state(session, _image(session, job.image_id), ImageState.FAILED, reason)
        log.error("image %s failed: %s", job.image_id, type(exc).__name__, exc_info=exc)
        return Failed(job.image_id, reason)


__all__ = ["StoreStage", "photo_folder"]

"""The model's stored answer for one photo as a report shows it (:class:`~screening.report.EyeFinding`): a
graded photo's result, or an ungradable photo's verdict.

One owner for the worker's draft versions (:mod:`screening.stages.report`), the reviewed versions and the
review page (:mod:`screening.review`, :mod:`screening.web`), so that all three show the same pictures and
numbers. The pictures are the files the store stage wrote into the photo's folder (``results.mask_dir`` for a
graded photo, ``images.photo_dir`` for an ungradable one, which has no result).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from screening.db import repository as repo
from screening.db.models import EyeSource, Image, ImageState, Result
from screening.report import EyeFinding
from training.api import REASON_TEXT  # torch-free: showing an ungradable photo must not load the model stack

PHOTO_FILE = "photo.jpg"  # the display copy of the photo in its folder (screening.stages.store writes it)
_STORED = (ImageState.DONE, ImageState.REPORTED)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def shown_name(image: Image) -> str:
    """The photo's name as reports and the review page show it: the file's, except for a photo a person moved here
    from another visit (`dr-screen review move`), whose file name may carry the other patient's id."""
    if image.filing_note:
        return "file name withheld: moved from another visit"
    return image.source_name


def label_in_doubt(image: Image) -> bool:
    """Whether the report warns that the photo's eye label is in doubt: the intake's check found the photo showing
    the other eye, and no person has set the eye since (``dr-screen review eye``: then the note says what they set
    and what the photo showed, as information)."""
    return bool(image.eye_mismatch) and image.eye_source != EyeSource.STAFF


def _eye(image: Image) -> str:
    if image.eye not in ("R", "L"):
        raise ValueError(f"image {image.id} has no eye (R or L), so no report shows it")
    return image.eye


def eye_finding(image: Image, result: Result) -> EyeFinding:
    """``result`` (of ``image``) as the report's finding for that photograph (one field of the eye)."""
    eye = _eye(image)
    folder = _path(result.mask_dir)
    return EyeFinding(
        eye="R" if eye == "R" else "L", source_name=shown_name(image),
        photo_path=folder / PHOTO_FILE if folder else None, overlay_path=_path(result.overlay_path),
        dr_cam_path=_path(result.dr_cam_path), dme_cam_path=_path(result.dme_cam_path),
        dr_grade=result.dr_grade, dr_probs=result.dr_probs, dme_grade=result.dme_grade, dme_probs=result.dme_probs,
        referable_score=result.referable_score, referable=result.referable, lesion_areas=result.lesion_areas,
        mask_folder=folder if result.original_masks else None, eye_note=image.eye_note, filing_note=image.filing_note,
        eye_mismatch=label_in_doubt(image), check_models=dict(image.check_models or {}), device=image.device,
    )


def is_ungradable(image: Image) -> bool:
    """Stored by the worker as ungradable (the intake checks' verdict; it then has no result): shown with its
    reasons, never graded."""
    return image.gradable is False and image.state in _STORED


def ungradable_finding(image: Image) -> EyeFinding:
    """An ungradable photo as the report shows it: no grades, its reasons in the words staff read."""
    if not is_ungradable(image):
        raise ValueError(f"image {image.id} is not stored as ungradable (gradable={image.gradable}, state={image.state})")
    eye = _eye(image)
    folder = _path(image.photo_dir)
    photo = folder / PHOTO_FILE if folder else None
    return EyeFinding(
        eye="R" if eye == "R" else "L", source_name=shown_name(image),
        photo_path=photo if photo is not None and photo.is_file() else None, overlay_path=None, dr_cam_path=None,
        dme_cam_path=None, dr_grade=None, dr_probs=None, dme_grade=None, dme_probs=None, referable_score=None,
        referable=None, gradable=False, eye_note=image.eye_note, filing_note=image.filing_note, eye_mismatch=label_in_doubt(image),
        ungradable_reasons=tuple(REASON_TEXT.get(r, r) for r in (image.quality_reasons or ["not assessed"])),
        check_models=dict(image.check_models or {}), device=image.device,
    )


def stored_finding(image: Image, result: Result | None) -> EyeFinding | None:
    """What a report shows for ``image``: its graded result, its ungradable verdict, or None (not stored yet, or
    no eye)."""
    if image.eye not in ("R", "L"):
        return None
    if result is not None:
        return eye_finding(image, result)
    return ungradable_finding(image) if is_ungradable(image) else None


def refused_page_reasons(session: Session, exam_id: int) -> tuple[str, ...]:
    """Why each page of the visit's multi-page files was refused (each reason names its page): what the worker's
    versions, the reviewed ones and the review page list under "Not graded"."""
    return tuple(str(image.error) for image in repo.refused_pages(session, exam_id))


__all__ = ["PHOTO_FILE", "eye_finding", "is_ungradable", "refused_page_reasons", "stored_finding", "ungradable_finding"]

"""The model's stored result for one photo as a report shows it (:class:`~screening.report.EyeFinding`).

One owner for the worker's draft versions (:mod:`screening.stages.report`), the reviewed versions and the
review page (:mod:`screening.review`, :mod:`screening.web`), so that all three show the same pictures and
numbers. The pictures are the files the store stage wrote into the result's folder (``results.mask_dir``).
"""

from __future__ import annotations

from pathlib import Path

from screening.db.models import Image, Result
from screening.report import EyeFinding

PHOTO_FILE = "photo.jpg"  # the display copy of the photo in the result's folder (screening.stages.store writes it)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def eye_finding(image: Image, result: Result) -> EyeFinding:
    """``result`` (of ``image``) as the report's finding for that photograph (one field of the eye)."""
    if image.eye not in ("R", "L"):
        raise ValueError(f"image {image.id} has no eye (R or L), so no report shows it")
    folder = _path(result.mask_dir)
    return EyeFinding(
        eye="R" if image.eye == "R" else "L", source_name=image.source_name,
        photo_path=folder / PHOTO_FILE if folder else None, overlay_path=_path(result.overlay_path),
        dr_cam_path=_path(result.dr_cam_path), dme_cam_path=_path(result.dme_cam_path),
        dr_grade=result.dr_grade, dr_probs=result.dr_probs, dme_grade=result.dme_grade, dme_probs=result.dme_probs,
        referable_score=result.referable_score, referable=result.referable, lesion_areas=result.lesion_areas,
        mask_folder=folder if result.original_masks else None,
    )


__all__ = ["PHOTO_FILE", "eye_finding"]

"""Decoding camera files at the size the model needs.

Whether what was read is a gradable fundus photo is not decided here: the learned gradability verdict
(:mod:`screening.checks`) measures the decoded frame; a hand-set colour rule used to stand here and refused
dark but gradable photos (issue 13).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from training.api import crop_square, resize_square

from .rejection import Rejection, RejectReason

_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # preprocessed: cropped to the fundus, square, model input size, uint8 RGB
    display: np.ndarray  # the same crop at report resolution (display_size), uint8 RGB
    original_size: tuple[int, int]  # (width, height) of the file as stored
    decode_factor: int
    frame: np.ndarray | None = None  # the whole photo as decoded (reduced for big JPEGs), for the intake checks; dropped after them


def reduction_factor(width: int, height: int, needed: int) -> int:
    """Largest JPEG reduced-decode factor that still leaves the short side >= 1.25x the model input."""
    for f in (8, 4, 2):
        if min(width, height) / f >= needed * 1.25:
            return f
    return 1


def decode(path: Path, size: int, display_size: int = 512) -> DecodedImage:
    """Read an image no larger than needed and preprocess it exactly as training did; raises a
    :class:`~screening.rejection.Rejection` when the file cannot be read as an image of at least 128 px."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
    except (UnidentifiedImageError, OSError) as exc:
        raise Rejection(RejectReason.UNREADABLE,
                        f"not a readable image ({type(exc).__name__}); export the photo again as JPEG, PNG or TIFF") from None
    factor = reduction_factor(width, height, max(size, display_size)) if fmt == "JPEG" else 1
    bgr = cv2.imread(str(path), _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR)
    if bgr is None:
        raise Rejection(RejectReason.UNREADABLE, "the image data could not be decoded (truncated or corrupt file); export it again")
    if min(bgr.shape[:2]) < 128:
        raise Rejection(RejectReason.TOO_SMALL,
                        f"image is too small ({width}x{height}); fundus photos need at least 128 px on the short side")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    square = crop_square(rgb)  # crop once; both sizes are resized from it exactly as preprocess_fundus does
    return DecodedImage(resize_square(square, size), resize_square(square, display_size), (width, height), factor, rgb)

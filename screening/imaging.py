"""Decoding camera files at the size the model needs, and checking that what was read is a fundus photo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from training.api import crop_square, fundus_mask, resize_square

from .rejection import Rejection, RejectReason

_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # preprocessed: cropped to the fundus, square, model input size, uint8 RGB
    display: np.ndarray  # the same crop at report resolution (display_size), uint8 RGB
    original_size: tuple[int, int]  # (width, height) of the file as stored
    decode_factor: int


def reduction_factor(width: int, height: int, needed: int) -> int:
    """Largest JPEG reduced-decode factor that still leaves the short side >= 1.25x the model input."""
    for f in (8, 4, 2):
        if min(width, height) / f >= needed * 1.25:
            return f
    return 1


def decode(path: Path, size: int, display_size: int = 512) -> DecodedImage:
    """Read an image no larger than needed and preprocess it exactly as training did; raises a
    :class:`~screening.rejection.Rejection` when the file is not a usable colour fundus photo."""
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
    check_fundus(rgb)
    square = crop_square(rgb)  # crop once; both sizes are resized from it exactly as preprocess_fundus does
    return DecodedImage(resize_square(square, size), resize_square(square, display_size), (width, height), factor)


def check_fundus(rgb: np.ndarray) -> None:
    """Cheap plausibility check: a lit, red-dominant field of view surrounded by dark borders."""
    small = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_AREA) if max(rgb.shape[:2]) > 128 else rgb
    field = fundus_mask(small)
    frac = float(field.mean())
    if frac < 0.25:
        raise Rejection(RejectReason.TOO_DARK, f"image is almost entirely dark ({frac:.0%} lit); check the camera exposure and retake")
    r, g, b = (float(small[..., i][field].mean()) for i in range(3))
    if frac > 0.98 and not (r > 1.3 * b and r > g):
        raise Rejection(RejectReason.NOT_FUNDUS, "does not look like a fundus photo (no dark surround, not red-dominant); check the file")
    if not (r > 1.15 * b and r >= g):
        raise Rejection(
            RejectReason.NOT_FUNDUS,
            f"does not look like a colour fundus photo (mean R/G/B {r:.0f}/{g:.0f}/{b:.0f}); "
            "red-free or non-retinal images are not supported"
        )

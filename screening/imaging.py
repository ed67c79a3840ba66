"""Decoding camera files at the size the model needs, checking that what was read is a fundus photo, and
mapping the model's frame back onto the original photo.

The model sees a square frame: the photo decoded (a big JPEG at 1/2, 1/4 or 1/8 of its size), cropped to the
illuminated field, padded black to a square and resized. :class:`FrameGeometry` keeps each of those steps so
that a mask drawn in the model frame can be put back on the photo as the clinic has it (same width and
height, same place), for viewers that overlay a mask on the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from training.api import crop_square, fundus_bbox, fundus_mask, resize_square

from .rejection import Rejection, RejectReason

_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height (OpenCV applies them when decoding)


@dataclass(frozen=True)
class FrameGeometry:
    """Where the model's square frame lies in the original photo.

    ``original_size`` is (width, height) as a viewer shows the photo; ``decoded_size`` the (width, height) of
    the array that was cropped (smaller for a reduced JPEG decode); ``crop`` the fundus box (x0, y0, x1, y1)
    in decoded pixels; ``pad`` the (left, top) offset of that box in the black-padded square of side
    ``side`` (decoded pixels). The square is then resized to the model's input size.
    """

    original_size: tuple[int, int]
    decoded_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    pad: tuple[int, int]
    side: int

    @classmethod
    def of(cls, rgb: np.ndarray, original_size: tuple[int, int]) -> FrameGeometry:
        """The geometry :func:`training.api.crop_square` applies to ``rgb`` (the same box, the same centring)."""
        h, w = rgb.shape[:2]
        y0, y1, x0, x1 = fundus_bbox(rgb)
        ch, cw = y1 - y0, x1 - x0
        side = max(ch, cw)
        return cls(original_size, (w, h), (x0, y0, x1, y1), ((side - cw) // 2, (side - ch) // 2), side)

    def _axis(self, n_original: int, n_decoded: int, start: int, stop: int, offset: int, frame: int) -> tuple[float, float, slice]:
        """One axis of the map from an original pixel to the model frame: model index = floor(scale * i + shift)
        for original pixel i (its centre taken to decoded pixels, into the padded square, then to the frame),
        and the original pixels whose centre lies inside the crop box (outside it the model saw nothing)."""
        to_decoded = n_decoded / n_original
        scale = to_decoded * frame / self.side
        shift = (0.5 * to_decoded - start + offset) * frame / self.side
        # centre (i + 0.5) * to_decoded in [start, stop)  <=>  i in [start / to_decoded - 0.5, stop / to_decoded - 0.5)
        first = max(0, math.ceil(start / to_decoded - 0.5))
        last = min(n_original, math.ceil(stop / to_decoded - 0.5))
        return scale, shift, slice(first, max(first, last))

    def to_original(self, masks: np.ndarray) -> list[np.ndarray]:
        """Model-frame masks ``(K, S, S)`` (bool or 0/1) -> K arrays ``(H, W)`` uint8, 0 or 255, on the original
        photo, by nearest neighbour (a mask stays binary). Pixels outside the fundus crop are 0."""
        if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
            raise ValueError(f"expected (K, S, S) masks in the square model frame, got shape {masks.shape}")
        k, frame = masks.shape[0], masks.shape[1]
        if k > 8:
            raise ValueError(f"at most 8 masks are mapped at once (bit-packed), got {k}")
        (width, height), (w, h) = self.original_size, self.decoded_size
        x0, y0, x1, y1 = self.crop
        sx, bx, inside_x = self._axis(width, w, x0, x1, self.pad[0], frame)
        sy, by, inside_y = self._axis(height, h, y0, y1, self.pad[1], frame)
        # bit j of a pixel is mask j: one warp for all masks (a 12-megapixel photo takes one pass, not K).
        # OpenCV's nearest-neighbour warp samples the source at round(M @ (x, y, 1)).
        packed = np.zeros((frame, frame), np.uint8)
        for j in range(k):
            packed |= (masks[j] != 0).astype(np.uint8) << j
        affine = np.array([[sx, 0.0, bx - 0.5], [0.0, sy, by - 0.5]], np.float64)  # it rounds: -0.5 makes that a floor
        big = np.asarray(cv2.warpAffine(packed, affine, (width, height), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                        borderMode=cv2.BORDER_CONSTANT, borderValue=0), dtype=np.uint8)
        big[:inside_y.start] = 0
        big[inside_y.stop:] = 0
        big[:, :inside_x.start] = 0
        big[:, inside_x.stop:] = 0
        return [np.not_equal(big & np.uint8(1 << j), 0).view(np.uint8) * np.uint8(255) for j in range(k)]


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # preprocessed: cropped to the fundus, square, model input size, uint8 RGB
    display: np.ndarray  # the same crop at report resolution (display_size), uint8 RGB
    geometry: FrameGeometry  # how to map the model frame back onto the original photo
    decode_factor: int

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) of the photo as a viewer shows it."""
        return self.geometry.original_size


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
            orientation = im.getexif().get(_EXIF_ORIENTATION)
    except (UnidentifiedImageError, OSError) as exc:
        raise Rejection(RejectReason.UNREADABLE,
                        f"not a readable image ({type(exc).__name__}); export the photo again as JPEG, PNG or TIFF") from None
    if orientation in _TRANSPOSED:  # OpenCV turns the picture upright: so do the sizes the masks are made at
        width, height = height, width
    factor = reduction_factor(width, height, max(size, display_size)) if fmt == "JPEG" else 1
    bgr = cv2.imread(str(path), _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR)
    if bgr is None:
        raise Rejection(RejectReason.UNREADABLE, "the image data could not be decoded (truncated or corrupt file); export it again")
    return preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (width, height), size, display_size, factor)


def preprocess(rgb: np.ndarray, original_size: tuple[int, int], size: int, display_size: int = 512,
               decode_factor: int = 1) -> DecodedImage:
    """A decoded uint8 RGB photo (from any container: a JPEG, a DICOM) -> the model's frame and the report's,
    with the geometry that maps the frame back; raises a :class:`~screening.rejection.Rejection` when it is too
    small or not a colour fundus photo."""
    width, height = original_size
    if min(rgb.shape[:2]) < 128:
        raise Rejection(RejectReason.TOO_SMALL,
                        f"image is too small ({width}x{height}); fundus photos need at least 128 px on the short side")
    check_fundus(rgb)
    geometry = FrameGeometry.of(rgb, (width, height))
    square = crop_square(rgb)  # crop once; both sizes are resized from it exactly as preprocess_fundus does
    if square.shape[0] != geometry.side:  # the crop is training's: if it ever changes, masks would be misplaced
        raise RuntimeError(f"crop_square made a {square.shape[0]} px square where the recorded geometry says {geometry.side}")
    return DecodedImage(resize_square(square, size), resize_square(square, display_size), geometry, decode_factor)


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

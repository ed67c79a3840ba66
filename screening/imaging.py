"""Decoding camera files at the size the model needs, within hard limits, only when they are complete; and
mapping the model's frame back onto the original photo.

Whether what was read is a gradable fundus photo is not decided here: the learned gradability verdict
(:mod:`screening.checks`) measures the decoded photo (:attr:`DecodedImage.whole`); a hand-set colour rule used to
stand here and refused dark but gradable photos (issue 13).

Order of the checks, cheapest first, so that a hostile file costs little (:func:`decode_bytes`):

1. the bytes carry a known signature (JPEG, PNG, TIFF, BMP); empty is its own reason;
2. the header (read by Pillow without decoding the pixels) gives width x height, checked against
   ``max_pixels``; a TIFF's pages are counted up to ``max_pages``: thumbnails are skipped, and a file
   holding more than one full-size picture is never read as its first page: the worker reads it page by
   page (:func:`decode_pages`, one :class:`Page` each, each page then judged by the intake checks alone);
3. the image data is complete: a JPEG is decoded once, strictly, at 1/8 scale by libjpeg-turbo
   (``simplejpeg``), which turns libjpeg's warnings ("premature end of data segment", corrupt data) into
   errors; a PNG's chunks are walked with their CRCs up to IEND; a TIFF's strips and tiles must lie
   inside the file; a BMP must be as long as its header says;
4. only then is the picture decoded (OpenCV, exactly as training reads it, at reduced size for large JPEGs).

A file with a known signature that fails 3 or 4 is "incomplete or corrupt" (``incomplete``): the intake
stage leaves it in the inbox for a while in case it is still being copied. The bytes decoded are the bytes
the caller hashed (:func:`screening.intake.read_content`).

The model sees a square frame: the photo decoded (a big JPEG at 1/2, 1/4 or 1/8 of its size), cropped to the
illuminated field, padded black to a square and resized. :class:`FrameGeometry` keeps each of those steps so
that a mask drawn in the model frame can be put back on the photo as the clinic has it (same width and
height, same place), for viewers that overlay a mask on the original.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from training.api import crop_square, fundus_bbox, resize_square

from .rejection import Rejection, RejectReason

_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
)
_REDUCED_RESOLUTION = 1  # TIFF NewSubfileType bit 0: a thumbnail of another page
# Said when the file is refused, i.e. once it has stopped changing (``incomplete_grace``): not "wait for the copy"
_EXPORT_AGAIN = "the copy into the inbox may have been cut short: copy or export the photo again"
T = TypeVar("T")


@dataclass(frozen=True)
class DecodeLimits:
    """Hard limits on a file's cost, checked before its pixels are decoded ([screening] max_pixels, max_pages)."""

    max_pixels: int = 50_000_000
    max_pages: int = 4
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
    whole: np.ndarray | None = None  # the whole photo as decoded (reduced for big JPEGs), for the intake checks; dropped after them

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


def sniff(data: bytes) -> str | None:
    """The format the bytes' signature names (JPEG, PNG, TIFF, BMP), or None."""
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def _incomplete(detail: str) -> Rejection:
    return Rejection(RejectReason.INCOMPLETE, f"the image data is incomplete or corrupt ({detail}); {_EXPORT_AGAIN}")


def png_complete(data: bytes) -> str | None:
    """Why a PNG is incomplete (a chunk cut short, a bad CRC, no IEND), or None when every chunk is whole."""
    pos = 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return f"chunk {kind.decode('latin-1')!r} is cut short"
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != struct.unpack(">I", data[pos + 8 + length:end])[0]:
            return f"chunk {kind.decode('latin-1')!r} fails its checksum"
        if kind == b"IEND":
            return None
        pos = end
    return "no IEND chunk: the file ends early"


def jpeg_complete(data: bytes) -> str | None:
    """Why a JPEG does not decode cleanly (libjpeg-turbo's own warning), or None. Decoded at 1/8 scale:
    every entropy-coded byte is still read, so truncation and corrupt data are both seen."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        return str(exc).strip().rstrip(".") or "libjpeg refused it"
    return None


def tiff_complete(im: Image.Image, size: int) -> str | None:
    """Why the current TIFF page is incomplete (its strips or tiles run past the end of the file), or None."""
    tags = getattr(im, "tag_v2", {})
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        if counts is None or len(counts) != len(offsets):
            return "its strip table is damaged"
        if any(int(o) + int(c) > size for o, c in zip(offsets, counts)):
            return "its image data runs past the end of the file"
    return None


def bmp_complete(data: bytes) -> str | None:
    """Why a BMP is incomplete (shorter than its header says), or None."""
    if len(data) < 14:
        return "the header is cut short"
    declared, offset = struct.unpack("<I", data[2:6])[0], struct.unpack("<I", data[10:14])[0]
    if offset > len(data) or declared > len(data):
        return f"{len(data)} of {max(declared, offset)} bytes"
    return None


def tiff_pages(im: Image.Image, limits: DecodeLimits, name: str) -> list[int]:
    """The indices of a TIFF's full-size pages (thumbnails, NewSubfileType bit 0, skipped), read from the headers
    alone; a Rejection when the file has more than ``max_pages`` pages or a page over ``max_pixels``."""
    full: list[int] = []
    page = 0
    while True:
        try:
            im.seek(page)
        except EOFError:
            break
        if page + 1 > limits.max_pages:
            raise Rejection(RejectReason.MULTI_PAGE, f"'{name}' has more than {limits.max_pages} pages ([screening] "
                            "max_pages); export each photo as its own file")
        w, h = im.size
        if w * h > limits.max_pixels:
            raise _too_large(name, w, h, limits)
        if not int(getattr(im, "tag_v2", {}).get(254, 0)) & _REDUCED_RESOLUTION:
            full.append(page)
        page += 1
    return full


def _tiff_page(im: Image.Image, limits: DecodeLimits, name: str) -> int:
    """The index of the one full-size page of a TIFF (thumbnails skipped); a Rejection when there are more (the
    worker reads those with :func:`decode_pages`) or none."""
    full = tiff_pages(im, limits, name)
    if len(full) != 1:
        raise Rejection(RejectReason.MULTI_PAGE, f"'{name}' holds {len(full) or 'no'} full-size pictures; read it "
                        "page by page (decode_pages), or export each photo as its own file")
    return full[0]


def _too_large(name: str, w: int, h: int, limits: DecodeLimits) -> Rejection:
    return Rejection(RejectReason.TOO_LARGE, f"'{name}' is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), over the "
                     f"limit of {limits.max_pixels / 1e6:g} megapixels ([screening] max_pixels); export it at a "
                     "smaller size")


def refuse_empty(data: bytes, name: str) -> None:
    """Raise the refusal of an empty file (``EMPTY``; the intake leaves a fresh one in the inbox, as a copy may be
    starting), before anything else is said of it (its name, a DICOM header it cannot have yet)."""
    if not data:
        raise Rejection(RejectReason.EMPTY, f"'{name}' is empty (0 bytes); copy the photo into the inbox again")


def decode_bytes(data: bytes, size: int, display_size: int = 512, *, limits: DecodeLimits | None = None,
                 name: str = "the file") -> DecodedImage:
    """Decode ``data`` (a whole file) no larger than needed and preprocess it exactly as training did, after the
    checks of the module docstring; raises a :class:`~screening.rejection.Rejection` when the file is not a
    usable, complete photo within the limits."""
    limits = limits or DecodeLimits()
    refuse_empty(data, name)
    fmt = sniff(data)
    if fmt is None:
        raise Rejection(RejectReason.UNREADABLE,
                        "not a readable image (no JPEG, PNG, TIFF or BMP signature); export the photo again as JPEG, PNG or TIFF")
    page = 0
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow refuses at twice this on open; the check below is exact
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, "Truncated File Read": checked here instead
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                orientation = im.getexif().get(_EXIF_ORIENTATION)
                if width * height > limits.max_pixels:
                    raise _too_large(name, width, height, limits)
                if fmt == "TIFF":
                    page = _tiff_page(im, limits, name)
                    im.seek(page)
                    width, height = im.size
                    problem = tiff_complete(im, len(data))
                    pixels = np.asarray(im.convert("RGB"))[..., ::-1] if page else None  # not the first page: Pillow
                else:
                    problem, pixels = None, None
    except Image.DecompressionBombError:
        raise Rejection(RejectReason.TOO_LARGE, f"'{name}' is over the limit of {limits.max_pixels / 1e6:g} megapixels "
                        "([screening] max_pixels); export it at a smaller size") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise _incomplete(f"{fmt} header: {type(exc).__name__}") from None
    if fmt == "JPEG":
        problem = jpeg_complete(data)
    elif fmt == "PNG":
        problem = png_complete(data)
    elif fmt == "BMP":
        problem = bmp_complete(data)
    if problem is not None:
        raise _incomplete(problem)
    if orientation in _TRANSPOSED and pixels is None:  # OpenCV turns the picture upright: so do the sizes the masks are made at
        width, height = height, width
    factor = reduction_factor(width, height, max(size, display_size)) if fmt == "JPEG" else 1
    if pixels is None:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR)
    else:
        bgr = np.ascontiguousarray(pixels)
    if bgr is None:
        raise _incomplete("the decoder stopped")
    return preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (width, height), size, display_size, factor)


# ------------------------------------------------------------------------------------------- multi-page files

_TIFF_ORIENTATION = 274
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # TIFF/EXIF orientation -> the turn that shows the page as viewers do


@dataclass(frozen=True)
class Page:
    """One full-size picture of a multi-page file: its number (1 = the file's first directory, thumbnails
    counted, as viewers number pages), its (width, height) as a viewer shows it, and either the photo in the
    model's frame (with ``whole`` for the intake checks, which judge it like any single photo) or why this page
    cannot be a photo at all (too small)."""

    number: int
    size: tuple[int, int]
    decoded: DecodedImage | None
    rejection: Rejection | None


def several_pictures(data: bytes, limits: DecodeLimits) -> bool:
    """True for a TIFF holding more than one full-size picture within the limits: the worker grades it page by
    page (:func:`decode_pages`). False for anything else, a damaged header or a file over the limits included:
    :func:`decode_bytes` then says what is wrong with it."""
    if sniff(data) != "TIFF":
        return False
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return len(tiff_pages(im, limits, "")) > 1
    except Exception:  # noqa: BLE001 - any refusal of the header: decode_bytes gives the reason
        return False


def _pillow(name: str, limits: DecodeLimits, work: Callable[[], T]) -> T:
    """Run Pillow work on a file's bytes, turning its errors into the refusals :func:`decode_bytes` gives."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, "Truncated File Read": checked here instead
            return work()
    except Image.DecompressionBombError:
        raise Rejection(RejectReason.TOO_LARGE, f"'{name}' is over the limit of {limits.max_pixels / 1e6:g} "
                        "megapixels ([screening] max_pixels); export it at a smaller size") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise _incomplete(f"TIFF: {type(exc).__name__}") from None


def _page_rgb(im: Image.Image, index: int, file_size: int) -> np.ndarray:
    """Page ``index`` of an open TIFF as an upright uint8 RGB array, once its strips are known to be whole."""
    im.seek(index)
    problem = tiff_complete(im, file_size)
    if problem is not None:
        raise _incomplete(f"page {index + 1}: {problem}")
    im.load()  # Pillow >= 11 turns the page upright as it loads it, and then drops the orientation tag
    turn = _UPRIGHT.get(int(getattr(im, "tag_v2", {}).get(_TIFF_ORIENTATION, 1) or 1))
    page = im.transpose(turn) if turn is not None else im
    return np.ascontiguousarray(np.asarray(page.convert("RGB")))


def decode_pages(data: bytes, size: int, display_size: int = 512, *, limits: DecodeLimits | None = None,
                 name: str = "the file") -> Iterator[Page]:
    """Every full-size picture of a multi-page TIFF (:func:`several_pictures`), decoded one at a time as the
    caller iterates and preprocessed as :func:`decode_bytes` does a single photo (``whole`` kept for the intake
    checks). A page too small to be a photo gets its :class:`~screening.rejection.Rejection` in its :class:`Page`
    (the other pages are still read); what is wrong with the file itself (over the limits, incomplete or
    corrupt) raises one for the whole file, at the first page for the limits, at the page it shows on for damage.

    An iterator, not a list, so that a caller may judge each page and drop its whole-size pixels before the next
    one is decoded: a file of ``max_pages`` camera-size pages then never holds more than one in memory."""
    limits = limits or DecodeLimits()
    if sniff(data) != "TIFF":
        raise ValueError(f"'{name}' is not a TIFF; only TIFF files hold several pages")
    return _pages(data, size, display_size, limits, name)


def _pages(data: bytes, size: int, display_size: int, limits: DecodeLimits, name: str) -> Iterator[Page]:
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    with _pillow(name, limits, partial(Image.open, io.BytesIO(data))) as im:
        for index in _pillow(name, limits, partial(tiff_pages, im, limits, name)):
            rgb = _pillow(name, limits, partial(_page_rgb, im, index, len(data)))
            width, height = rgb.shape[1], rgb.shape[0]
            try:
                page = Page(index + 1, (width, height), preprocess(rgb, (width, height), size, display_size), None)
            except Rejection as rejection:
                page = Page(index + 1, (width, height), None, rejection)
            del rgb  # the page's pixels live on in page.decoded.whole only until the caller drops them
            yield page


def preprocess(rgb: np.ndarray, original_size: tuple[int, int], size: int, display_size: int = 512,
               decode_factor: int = 1) -> DecodedImage:
    """A decoded uint8 RGB photo (from any container: a JPEG, a DICOM) -> the model's frame and the report's,
    with the geometry that maps the frame back; raises a :class:`~screening.rejection.Rejection` when it is too
    small (whether it is a gradable colour fundus photo is :mod:`screening.checks`' verdict, on ``whole``)."""
    width, height = original_size
    if min(rgb.shape[:2]) < 128:
        raise Rejection(RejectReason.TOO_SMALL,
                        f"image is too small ({width}x{height}); fundus photos need at least 128 px on the short side")
    geometry = FrameGeometry.of(rgb, (width, height))
    square = crop_square(rgb)  # crop once; both sizes are resized from it exactly as preprocess_fundus does
    if square.shape[0] != geometry.side:  # the crop is training's: if it ever changes, masks would be misplaced
        raise RuntimeError(f"crop_square made a {square.shape[0]} px square where the recorded geometry says {geometry.side}")
    return DecodedImage(resize_square(square, size), resize_square(square, display_size), geometry, decode_factor, rgb)


def decode(path: Path, size: int, display_size: int = 512, limits: DecodeLimits | None = None) -> DecodedImage:
    """:func:`decode_bytes` of the file at ``path`` (for tools and tests; the worker reads each file once with
    :func:`screening.intake.read_content` and decodes those bytes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise Rejection(RejectReason.UNREADABLE, f"could not read '{Path(path).name}' ({type(exc).__name__})") from None
    return decode_bytes(data, size, display_size, limits=limits, name=Path(path).name)

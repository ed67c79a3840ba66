"""DICOM input: fundus photos as cameras and PACS export them, read with pydicom.

Accepted: Ophthalmic Photography 8 Bit Image (SOP class 1.2.840.10008.5.1.4.1.1.77.1.5.1) and Secondary
Capture (single-frame, or the multi-frame true-colour class with one frame), uncompressed or compressed with
any transfer syntax an installed pydicom decoder handles (JPEG baseline/extended through pylibjpeg or Pillow,
lossless JPEG through pylibjpeg-libjpeg, RLE natively). A file is DICOM by its content, the ``DICM`` marker
at byte 128 of a Part 10 file, whatever its name (PACS exports often have none).

What the tags give (:class:`DicomPhoto`): the patient id (0010,0020), the eye (Image Laterality (0020,0062),
else Laterality (0020,0060)), the date (Acquisition DateTime (0008,002A), else Study Date (0008,0020)) and the
camera (Manufacturer (0008,0070) and Manufacturer's Model Name (0008,1090)). :func:`dicom_identity` merges
them with what the file name or a sidecar says: the tags win where the name is silent, a disagreement is
refused (a photo filed under the wrong patient or eye is worse than one sent back). A file whose tags, name and
sidecar give no exam date is refused too: the day it arrived would file it under a visit it may not belong to.

The worker hands :func:`read_dicom` the bytes it hashed (read once, :func:`screening.intake.read_content`), so
the tags and picture recorded are those of the hashed content. ``max_pixels`` is checked on Rows x Columns before
the pixel data is decoded, and on the decoded picture again.

Identifiers never reach a log: this module logs nothing read from a file, its records leave the patient id
out of their ``repr``, every refusal message names the tag that was wrong but not its value, and pydicom's own
messages (which can quote tag values) are kept out of the worker's log and warnings.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from .imaging import DecodeLimits
from .intake import Identity, normalise_eye, parse_identity, sidecar_for
from .rejection import Rejection, RejectReason

# pydicom reports odd values (a malformed name or date, quoted) on its logger and as warnings: neither may carry a
# patient's data into the worker's log. Its logger emits nothing (a level above CRITICAL: no record is even made,
# so no handler anywhere sees one) and passes nothing up; its warnings are silenced where a file is read.
_PYDICOM_LOG = logging.getLogger("pydicom")
_PYDICOM_LOG.setLevel(logging.CRITICAL + 1)
_PYDICOM_LOG.propagate = False

OPHTHALMIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
SOP_CLASSES: dict[str, str] = {
    OPHTHALMIC_PHOTOGRAPHY: "Ophthalmic Photography 8 Bit Image",
    SECONDARY_CAPTURE: "Secondary Capture Image",
    MULTIFRAME_TRUE_COLOR_SC: "Multi-frame True Color Secondary Capture Image",
}
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})

_PREAMBLE = 128
_MAGIC = b"DICM"
_MAX_ID_LENGTH = 64  # DICOM LO; also patients.code
_MAX_DEVICE_LENGTH = 128  # images.device
_EXPORT_HINT = "export the photo from the camera or PACS again as Ophthalmic Photography or Secondary Capture"


def is_dicom(source: str | os.PathLike[str] | bytes) -> bool:
    """True for a DICOM Part 10 file (a path, or the file's bytes): ``DICM`` at byte 128, after the preamble."""
    if isinstance(source, bytes):
        return source[_PREAMBLE:_PREAMBLE + len(_MAGIC)] == _MAGIC
    path = source
    try:
        with open(path, "rb") as fh:
            fh.seek(_PREAMBLE)
            return fh.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class DicomPhoto:
    """What a DICOM file holds for grading. ``patient_id`` is left out of ``repr`` (and so of any log line or
    traceback that prints the record)."""

    rgb: np.ndarray = field(repr=False)  # (rows, columns, 3) uint8 RGB, full size
    patient_id: str = field(repr=False)
    eye: Literal["L", "R"] | None
    exam_date: date | None
    device: str | None
    sop_class: str
    eye_tag: str | None = None  # which tag gave ``eye``: "Image Laterality (0020,0062)" or "Laterality (0020,0060)"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height): Columns x Rows."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def _refuse(code: RejectReason, name: str, what: str) -> Rejection:
    return Rejection(code, f"DICOM file '{name}': {what}")


def _text(ds: Dataset, keyword: str) -> str | None:
    """A text element, stripped; None when absent or empty. Several values come back joined with a backslash,
    as the file stores them (the caller decides whether one value is required)."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):  # an element pydicom could not give a VR to
        text = value.decode("latin-1")
    else:
        text = str(value)
    return text.strip().strip("\x00").strip() or None


def _dicom_date(raw: str) -> date | None:
    """The date of a DA (``YYYYMMDD``) or DT (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``) value; None if it is not one."""
    digits = raw[:8]
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        d = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
    return d if d.year >= 1900 else None


def _patient_id(ds: Dataset, name: str) -> str:
    value = _text(ds, "PatientID")
    if value is None:
        raise _refuse(RejectReason.IDENTITY, name, "no Patient ID (0010,0020); set it on the camera or in the PACS and export again")
    if "\\" in value:
        raise _refuse(RejectReason.IDENTITY, name, "the Patient ID (0010,0020) holds several values; it must hold one")
    if len(value) > _MAX_ID_LENGTH or not value.isprintable():
        raise _refuse(RejectReason.IDENTITY, name,
                      f"the Patient ID (0010,0020) is not a valid id (at most {_MAX_ID_LENGTH} printable characters)")
    return value


_LATERALITY_TAGS = (("ImageLaterality", "Image Laterality", "(0020,0062)"), ("Laterality", "Laterality", "(0020,0060)"))


def _eye(ds: Dataset, name: str) -> tuple[Literal["L", "R"] | None, str | None]:
    """The eye the laterality tags state, and which tag said it ("Image Laterality (0020,0062)")."""
    for keyword, tag_name, tag in _LATERALITY_TAGS:
        value = _text(ds, keyword)
        if value is None:
            continue
        if value.upper() in ("B", "U"):  # both eyes / unpaired: says nothing of this photo's eye
            continue
        eye = normalise_eye(value)
        if eye is None:
            raise _refuse(RejectReason.IDENTITY, name, f"{keyword} {tag} is {value!r}; expected R or L")
        return eye, f"{tag_name} {tag}"
    return None, None


def _exam_date(ds: Dataset, name: str) -> date | None:
    present = False
    for keyword in ("AcquisitionDateTime", "StudyDate"):
        value = _text(ds, keyword)
        if value is None:
            continue
        present = True
        found = _dicom_date(value)
        if found is not None:
            return found
    if present:
        raise _refuse(RejectReason.IDENTITY, name,
                      "neither Acquisition DateTime (0008,002A) nor Study Date (0008,0020) holds a valid date")
    return None


def _device(ds: Dataset) -> str | None:
    parts = [v for v in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if v]
    text = " ".join(parts)
    return "".join(c for c in text if c.isprintable())[:_MAX_DEVICE_LENGTH] or None


def _declared_size(ds: Dataset, name: str) -> tuple[int, int]:
    """(width, height) as the header declares them: Columns (0028,0011) x Rows (0028,0010)."""
    try:
        width, height = int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise _refuse(RejectReason.UNREADABLE, name, "no valid Rows (0028,0010) and Columns (0028,0011); export it again")
    return width, height


def _too_large(name: str, width: int, height: int, limits: DecodeLimits) -> Rejection:
    return _refuse(RejectReason.TOO_LARGE, name, f"{width}x{height} pixels ({width * height / 1e6:.0f} megapixels), over the "
                   f"limit of {limits.max_pixels / 1e6:g} megapixels ([screening] max_pixels); export it at a smaller size")


_EXPORT_AS = "export it uncompressed, JPEG-compressed (baseline, extended or lossless) or RLE-compressed"


def _syntax(uid: UID) -> str:
    """A transfer syntax as a reason names it: the UID, and its name where pydicom knows one (for an unknown UID
    ``UID.name`` is the UID again)."""
    known = str(getattr(uid, "name", "") or "")
    return f"{uid} ({known})" if known and known != str(uid) else f"{uid} (not a known transfer syntax)"


def _pixels(ds: Dataset, name: str, limits: DecodeLimits) -> np.ndarray:
    """The photo as (rows, columns, 3) uint8 RGB; raises a :class:`Rejection` saying what is unsupported. The size
    the header declares is checked against ``limits`` before any pixel is decoded (a 30000 x 30000 claim costs
    nothing), and the decoded size again after (a header that understates its picture)."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise _refuse(RejectReason.UNREADABLE, name, "no Transfer Syntax UID (0002,0010) in the file meta information; export it again")
    if "PixelData" not in ds:
        raise _refuse(RejectReason.UNREADABLE, name, "no pixel data (7FE0,0010): the file holds no picture; export the photo itself")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _refuse(RejectReason.UNSUPPORTED_TYPE, name,
                      f"its Transfer Syntax UID (0002,0010), {_syntax(syntax)}, is not supported; {_EXPORT_AS}") from None
    if not decoder.is_available:
        raise _refuse(RejectReason.UNSUPPORTED_TYPE, name,
                      f"no decoder is installed for its Transfer Syntax UID (0002,0010), {_syntax(syntax)}; {_EXPORT_AS}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise _refuse(RejectReason.UNSUPPORTED_TYPE, name, f"{frames} frames in one file; export each photo as its own file")
    photometric = _text(ds, "PhotometricInterpretation") or ""
    if photometric.startswith("MONOCHROME"):
        raise _refuse(RejectReason.NOT_FUNDUS, name,
                      f"a monochrome (red-free) photo (Photometric Interpretation (0028,0004) {photometric}); only "
                      "colour fundus photos are graded: export the colour photograph of this eye")
    if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        raise _refuse(RejectReason.UNSUPPORTED_TYPE, name,
                      f"photometric interpretation {photometric or '(none)'} (0028,0004) is not supported; export as RGB colour")
    width, height = _declared_size(ds, name)
    if width * height > limits.max_pixels:
        raise _too_large(name, width, height, limits)
    try:
        arr = np.asarray(ds.pixel_array)  # YBR is converted to RGB by pydicom
    except Exception as exc:  # noqa: BLE001 - any decoder failure (truncated JPEG, wrong lengths): the file is refused
        raise _refuse(RejectReason.UNREADABLE, name,
                      f"the pixel data could not be decoded ({type(exc).__name__}); export it again") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise _refuse(RejectReason.UNSUPPORTED_TYPE, name, f"pixel data of shape {arr.shape}; expected one colour picture")
    if arr.shape[0] * arr.shape[1] > limits.max_pixels:
        raise _too_large(name, arr.shape[1], arr.shape[0], limits)
    if arr.dtype != np.uint8:  # a 16-bit Secondary Capture: keep the top 8 of the stored bits
        stored = int(ds.get("BitsStored", 16) or 16)
        arr = (arr.astype(np.uint32) >> max(stored - 8, 0)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_dicom(source: str | os.PathLike[str] | bytes, *, name: str | None = None,
               limits: DecodeLimits | None = None) -> DicomPhoto:
    """Read a DICOM fundus photo from a file's bytes (the worker passes the bytes it hashed, so the picture and
    tags recorded are those of the hashed content) or, for tools, from a path; raises a :class:`Rejection` (the
    tag or property that is wrong, never its value) when it is not one the worker can grade or is over
    ``limits``. ``name`` names the file in refusals. Call it for files :func:`is_dicom` accepts."""
    if isinstance(source, bytes):
        stream: io.BytesIO | Path = io.BytesIO(source)
        label = name or "the file"
    else:
        stream = Path(source)
        label = name or stream.name
    limits = limits or DecodeLimits()
    with warnings.catch_warnings():  # pydicom's warnings may quote tag values (see the module docstring)
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(stream)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise _refuse(RejectReason.UNREADABLE, label, f"not a readable DICOM file ({type(exc).__name__}); export it again") from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files; all mean "unreadable"
            raise _refuse(RejectReason.UNREADABLE, label, f"not a readable DICOM file ({type(exc).__name__}); export it again") from None
        sop = str(ds.get("SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else "") or "")
        if sop not in SOP_CLASSES:
            sop_name = UID(sop).name if sop else ""
            described = f"{sop} ({sop_name})" if sop_name and sop_name != sop else (sop or "(none)")
            raise _refuse(RejectReason.UNSUPPORTED_TYPE, label,
                          f"SOP class {described} is not a photograph the worker grades; {_EXPORT_HINT}")
        patient_id = _patient_id(ds, label)
        (eye, eye_tag), exam_date, device = _eye(ds, label), _exam_date(ds, label), _device(ds)
        rgb = _pixels(ds, label, limits)
    return DicomPhoto(rgb=rgb, patient_id=patient_id, eye=eye, exam_date=exam_date, device=device, sop_class=sop,
                      eye_tag=eye_tag)


def named_identity(path: str | os.PathLike[str], patterns: tuple[str, ...]) -> Identity | None:
    """What a DICOM file's name or sidecar states about it, or None when they state nothing: a name no pattern
    reads, or a bare one (``IM000001``, ``IM0001.dcm``, as PACS exports name files) that a pattern reads as a
    patient id alone, with no eye, no date and no sidecar. Such a name says nothing about whose photo it is; the
    tags do (:func:`dicom_identity`), and so the intake compares a repeat of a DICOM file by this, not by the name
    alone."""
    p = Path(path)
    try:
        named = parse_identity(p, patterns)
    except Rejection:  # the name of a PACS export rarely says anything; the tags must then
        return None
    if named.eye is None and named.exam_date is None and sidecar_for(p) is None:
        return None
    return named


def dicom_identity(photo: DicomPhoto, path: str | os.PathLike[str], patterns: tuple[str, ...]) -> Identity:
    """Patient, eye, date and camera of a DICOM photo: the tags, with the file name or sidecar
    (:func:`~screening.intake.parse_identity`) filling in what the tags leave out. Where both state a value and
    they differ, the file is refused (:class:`Rejection`, ``identity``), naming the tag but not the values. An eye
    neither states is left None: the intake checks (:mod:`screening.checks`) read it from the photo when that is
    clear, and refuse the file otherwise."""
    p = Path(path)
    named = named_identity(p, patterns)
    if named is not None and named.patient_id != photo.patient_id:
        raise _refuse(RejectReason.IDENTITY, p.name,
                      "the patient id in the file name or sidecar differs from the Patient ID (0010,0020); correct one of them")
    eye = photo.eye
    if named is not None and eye is not None and named.eye is not None and named.eye != eye:
        raise _refuse(RejectReason.IDENTITY, p.name,
                      f"the file name or sidecar says eye {named.eye}, the DICOM laterality (0020,0062/0020,0060) says {eye}; "
                      "correct one of them")
    if eye is not None:
        eye_from: str | None = f"DICOM {photo.eye_tag or 'laterality tag'}"  # screening.checks: eye source 'dicom'
    else:  # neither the tags nor the name state it: the intake checks read it from the photo, or refuse the file
        eye, eye_from = (named.eye, named.eye_from) if named is not None else (None, None)
    exam_date = photo.exam_date
    if named is not None and named.exam_date is not None and exam_date is not None and named.exam_date != exam_date:
        raise _refuse(RejectReason.IDENTITY, p.name,
                      "the date in the file name or sidecar differs from the DICOM acquisition or study date; correct one of them")
    exam_date = exam_date or (named.exam_date if named is not None else None)
    if exam_date is None:  # the drop day would file it under a visit it may not belong to (a late PACS export)
        raise _refuse(RejectReason.IDENTITY, p.name,
                      "no exam date: neither Acquisition DateTime (0008,002A) nor Study Date (0008,0020) is present, and "
                      "the file name or sidecar gives none; export it with its study date, or add a sidecar "
                      '(IM000001.json beside IM000001) with {"patient_id": "<its Patient ID>", "exam_date": "YYYY-MM-DD"} '
                      "(a sidecar names the patient, so it gives the same id as the tag)")
    return Identity(patient_id=photo.patient_id, eye=eye, exam_date=exam_date, device=photo.device, eye_from=eye_from)


__all__ = [
    "DICOM_SUFFIXES", "MULTIFRAME_TRUE_COLOR_SC", "OPHTHALMIC_PHOTOGRAPHY", "SECONDARY_CAPTURE", "SOP_CLASSES", "DicomPhoto",
    "dicom_identity", "is_dicom", "named_identity", "read_dicom",
]

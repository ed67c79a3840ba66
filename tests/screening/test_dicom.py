"""DICOM input: recognised by content, tags read (patient, eye, date, camera), JPEG pixel data decoded, malformed
files refused with the tag that is wrong (never its value)."""

from __future__ import annotations

import logging
import warnings
from datetime import date

import numpy as np
import pytest

from screening.config import DEFAULT_PATTERNS
from screening.dicom import DicomPhoto, dicom_identity, is_dicom, read_dicom
from screening.rejection import Rejection, RejectReason

from .conftest import SC_SOP_CLASS, jpeg_bytes, synthetic_fundus, write_dicom


def test_dicom_is_recognised_by_content_not_by_name(tmp_path):
    rgb = synthetic_fundus()
    assert is_dicom(write_dicom(tmp_path / "IM000001", rgb=rgb))  # PACS exports often have no extension
    assert is_dicom(write_dicom(tmp_path / "photo.jpg", rgb=rgb))  # nor the right one
    not_dicom = tmp_path / "fake.dcm"
    not_dicom.write_bytes(jpeg_bytes(rgb))
    assert not is_dicom(not_dicom) and not is_dicom(tmp_path / "missing.dcm")


def test_uncompressed_ophthalmic_photograph_with_all_tags(tmp_path):
    rgb = synthetic_fundus(1)
    photo = read_dicom(write_dicom(tmp_path / "a.dcm", rgb=rgb, patient_id="A-1234", image_laterality="L",
                                   acquisition="20250301235959.123456+0100"))
    assert np.array_equal(photo.rgb, rgb) and photo.size == (256, 256)
    assert (photo.patient_id, photo.eye, photo.exam_date, photo.device) == ("A-1234", "L", date(2025, 3, 1), "Topcon TRC-NW8")
    assert photo.eye_tag == "Image Laterality (0020,0062)"
    assert "A-1234" not in repr(photo)  # a record printed into a log or a traceback carries no identifier


def test_jpeg_baseline_secondary_capture_is_decoded(tmp_path):
    rgb = synthetic_fundus(2)
    photo = read_dicom(write_dicom(tmp_path / "b.dcm", jpeg=jpeg_bytes(rgb), sop_class=SC_SOP_CLASS, manufacturer=None,
                                   model="Visucam 500"))
    assert photo.rgb.shape == rgb.shape and photo.rgb.dtype == np.uint8
    assert np.abs(photo.rgb.astype(int) - rgb).mean() < 3  # YBR -> RGB by pydicom, JPEG loss only
    assert photo.device == "Visucam 500" and photo.sop_class == SC_SOP_CLASS


def test_fallback_tags_laterality_and_study_date(tmp_path):
    rgb = synthetic_fundus(3)
    photo = read_dicom(write_dicom(tmp_path / "c.dcm", rgb=rgb, image_laterality=None, laterality="R", acquisition=None,
                                   study_date="20240229", manufacturer=None, model=None))
    assert (photo.eye, photo.exam_date, photo.device, photo.eye_tag) == ("R", date(2024, 2, 29), None, "Laterality (0020,0060)")
    both = read_dicom(write_dicom(tmp_path / "d.dcm", rgb=rgb, image_laterality="B", laterality=None, acquisition=None))
    assert (both.eye, both.exam_date) == (None, None)  # "both eyes" says nothing of this photo; no date: the drop date


def _photo(**kw) -> DicomPhoto:
    base = dict(rgb=np.zeros((2, 2, 3), np.uint8), patient_id="P100", eye="R", exam_date=date(2025, 3, 1), device="X",
                sop_class=SC_SOP_CLASS, eye_tag="Image Laterality (0020,0062)")
    return DicomPhoto(**{**base, **kw})


def test_identity_tags_first_the_name_fills_gaps_and_a_disagreement_is_refused(tmp_path):
    plain = dicom_identity(_photo(), tmp_path / "1.2.826.0.1.3680043.8.498.1.dcm", DEFAULT_PATTERNS)
    assert (plain.patient_id, plain.eye, plain.exam_date, plain.device) == ("P100", "R", date(2025, 3, 1), "X")
    named = dicom_identity(_photo(eye=None, exam_date=None), tmp_path / "P100_L_20250302.dcm", DEFAULT_PATTERNS)
    assert (named.eye, named.exam_date) == ("L", date(2025, 3, 2))
    assert (plain.eye_from, named.eye_from) == ("DICOM Image Laterality (0020,0062)", "file name")  # eye source 'dicom' / 'name'
    # no eye in the tags nor the name: left to the intake checks (read from the photo, or refused there); a bare
    # PACS file name is no patient id to compare
    bare = dicom_identity(_photo(eye=None), tmp_path / "IM0001.dcm", DEFAULT_PATTERNS)
    assert (bare.patient_id, bare.eye, bare.eye_from) == ("P100", None, None)
    for photo, name, fragment in (
        (_photo(), "P200_R.dcm", "patient id"),
        (_photo(eye="L"), "P100_R.dcm", "says eye R"),
        (_photo(), "P100_R_20250302.dcm", "date"),
    ):
        with pytest.raises(Rejection, match=fragment) as exc:
            dicom_identity(photo, tmp_path / name, DEFAULT_PATTERNS)
        assert exc.value.code == RejectReason.IDENTITY and "P100" not in exc.value.message.replace(name, "")


SECRET = "SECRET-ID-4711"


@pytest.mark.parametrize("kw, code, fragment", [
    (dict(patient_id=None), RejectReason.IDENTITY, "no Patient ID (0010,0020)"),
    (dict(patient_id="A\\B"), RejectReason.IDENTITY, "several values"),
    (dict(no_pixels=True), RejectReason.UNREADABLE, "no pixel data (7FE0,0010)"),
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.2"), RejectReason.UNSUPPORTED_TYPE, "CT Image Storage"),
    (dict(syntax="1.2.3.4.5.6.7.8.9.10"), RejectReason.UNSUPPORTED_TYPE, "Transfer Syntax UID (0002,0010), 1.2.3.4.5.6.7.8.9.10 (not a"),
    (dict(image_laterality="X"), RejectReason.IDENTITY, "ImageLaterality (0020,0062)"),
    (dict(acquisition=None, study_date=SECRET), RejectReason.IDENTITY, "valid date"),
    (dict(monochrome=True), RejectReason.NOT_FUNDUS, "monochrome (red-free) photo (Photometric Interpretation (0028,0004) MONOCHROME2)"),
    (dict(truncated=True), RejectReason.UNREADABLE, "export it again"),
])
def test_malformed_files_are_refused_naming_the_tag_not_its_value(tmp_path, kw, code, fragment, caplog):
    with warnings.catch_warnings():  # pydicom warns when it writes the invalid value; reading is what is tested
        warnings.simplefilter("ignore")
        path = malformed_dicom(tmp_path / "m.dcm", **kw)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(Rejection) as exc:
        warnings.simplefilter("always")
        read_dicom(path)
    assert exc.value.code == code and fragment in exc.value.message, exc.value.message
    assert SECRET not in exc.value.message and "m.dcm" in exc.value.message
    assert SECRET not in caplog.text and not any(SECRET in str(w.message) for w in seen)


def malformed_dicom(path, *, no_pixels=False, syntax=None, monochrome=False, truncated=False, **tags):
    """One way a DICOM file can be wrong; the patient id (when there is one) is SECRET."""
    rgb = synthetic_fundus(4, size=128)
    tags.setdefault("patient_id", SECRET)
    if monochrome:
        mono = rgb[..., 0].copy()
        write_dicom(path, **tags, rgb=None)
        import pydicom

        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 128, 128, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = mono.tobytes()
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
        return path
    write_dicom(path, rgb=None if no_pixels else rgb, **tags)
    if syntax is not None:  # a transfer syntax nobody knows: patched in place, same length as explicit VR LE's UID
        data = path.read_bytes()
        known = b"1.2.840.10008.1.2.1\x00"
        assert len(syntax) == len(known) and data.count(known) == 1
        path.write_bytes(data.replace(known, syntax.encode()))
    if truncated:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 20000])
    return path


def test_rle_compressed_and_16_bit_secondary_captures_are_read(tmp_path):
    """Any transfer syntax an installed decoder handles: RLE Lossless (pydicom's own), and a 16-bit SC kept to its top 8 bits."""
    import pydicom
    from pydicom.uid import RLELossless

    rgb = synthetic_fundus(7, size=128)
    path = write_dicom(tmp_path / "rle.dcm", rgb=rgb, sop_class=SC_SOP_CLASS)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(read_dicom(path).rgb, rgb)

    wide = write_dicom(tmp_path / "16.dcm", rgb=rgb, sop_class=SC_SOP_CLASS)
    ds = pydicom.dcmread(wide)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = (rgb.astype(np.uint16) << 4).tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(wide, enforce_file_format=True)
    assert np.array_equal(read_dicom(wide).rgb, rgb)


def test_a_file_is_read_from_its_bytes(tmp_path):
    """The worker hands over the bytes it hashed: nothing is read from the path again."""
    rgb = synthetic_fundus(9, size=128)
    path = write_dicom(tmp_path / "IM1", rgb=rgb, patient_id="P7")
    data = path.read_bytes()
    path.unlink()
    assert is_dicom(data) and not is_dicom(data[:100])
    photo = read_dicom(data, name="IM1")
    assert np.array_equal(photo.rgb, rgb) and photo.patient_id == "P7"
    with pytest.raises(Rejection) as exc:
        read_dicom(data[: len(data) // 2], name="IM1")  # cut short: its pixel data runs past the end
    assert exc.value.code == RejectReason.UNREADABLE and "'IM1'" in exc.value.message


def test_pixel_limits_are_checked_before_decoding_and_after(tmp_path, monkeypatch):
    from pydicom.dataset import Dataset

    from screening import dicom
    from screening.imaging import DecodeLimits

    rgb = synthetic_fundus(10, size=128)
    data = write_dicom(tmp_path / "IM2", rgb=rgb).read_bytes()
    limits = DecodeLimits(max_pixels=128 * 128 - 1)
    with monkeypatch.context() as m:  # over the limit by its Rows x Columns: refused without decoding a pixel
        m.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("the pixel data was decoded")))
        with pytest.raises(Rejection) as exc:
            read_dicom(data, name="IM2", limits=limits)
    assert exc.value.code == RejectReason.TOO_LARGE and "128x128" in exc.value.message and "max_pixels" in exc.value.message
    # a header that understates the picture: the decoded size is checked too
    monkeypatch.setattr(dicom, "_declared_size", lambda ds, name: (64, 64))
    with pytest.raises(Rejection) as exc:
        read_dicom(data, name="IM2", limits=limits)
    assert exc.value.code == RejectReason.TOO_LARGE and "128x128" in exc.value.message
    assert read_dicom(data, name="IM2", limits=DecodeLimits(max_pixels=128 * 128)).size == (128, 128)


def test_a_multi_frame_file_is_refused(tmp_path):
    import pydicom

    rgb = synthetic_fundus(8, size=128)
    path = write_dicom(tmp_path / "mf.dcm", rgb=rgb, sop_class="1.2.840.10008.5.1.4.1.1.7.4")
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = np.concatenate([rgb, rgb]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(Rejection, match="2 frames") as exc:
        read_dicom(path)
    assert exc.value.code == RejectReason.UNSUPPORTED_TYPE
    ds.NumberOfFrames = 1
    ds.PixelData = rgb.tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(read_dicom(path).rgb, rgb)  # the multi-frame true-colour class with one frame is fine

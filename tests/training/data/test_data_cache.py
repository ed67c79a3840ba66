"""Preprocessing cache: mask reading, reuse, rebuild on change, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import training.data.cache as cache
from training.config import IdridSegmentationSource
from training.data.cache import CachedImage, ImageReadError, build_cache, cache_path, load_record
from training.data.records import Record
from training.data.sources import load_idrid_segmentation


def _seg_records(make_idrid_seg) -> list[Record]:
    return load_idrid_segmentation(IdridSegmentationSource(kind="idrid-segmentation", path=make_idrid_seg(n_images=2)))


def test_rgb_and_single_channel_masks_and_missing_lesion(make_idrid_seg, tmp_path: Path) -> None:
    rgb_rec, gray_rec = _seg_records(make_idrid_seg)  # image 1: RGB masks; image 2: single-channel, no SE
    for rec in (rgb_rec, gray_rec):
        entry = load_record(rec, 64, tmp_path / "cache")
        assert entry.image.shape == (64, 64, 3) and entry.image.dtype == np.uint8
        assert entry.masks.shape == (64, 64, 5) and entry.masks.dtype == np.uint8
        assert set(np.unique(entry.masks)) <= {0, 1}
    assert load_record(rgb_rec, 64, tmp_path / "cache").masks[..., 3].sum() > 0
    gray = load_record(gray_rec, 64, tmp_path / "cache").masks
    assert gray[..., 3].sum() == 0 and gray[..., 0].sum() > 0  # missing SE file -> zeros


def test_record_without_masks_stores_none(tmp_path: Path, synth) -> None:
    rec = Record(image=synth.write_rgb(tmp_path / "a.png", synth.fundus()), patient_id="a", source="t", dr_grade=1)
    assert load_record(rec, 32, tmp_path / "c").masks is None


def test_cache_reused_then_rebuilt_on_file_or_size_change(tmp_path: Path, synth, monkeypatch) -> None:
    image = synth.write_rgb(tmp_path / "a.png", synth.fundus())
    rec = Record(image=image, patient_id="a", source="t")
    calls: list[int] = []
    real = cache.preprocess_record
    monkeypatch.setattr(cache, "preprocess_record", lambda r, s: calls.append(s) or real(r, s))

    (first,) = build_cache([rec], 32, tmp_path / "c", progress=False)
    stamp = first.stat().st_mtime_ns
    (again,) = build_cache([rec], 32, tmp_path / "c", progress=False)
    load_record(rec, 32, tmp_path / "c")
    assert again == first and calls == [32] and first.stat().st_mtime_ns == stamp

    load_record(rec, 64, tmp_path / "c")  # new size -> new entry
    assert calls == [32, 64]

    synth.write_rgb(image, synth.fundus(level=90))  # source edited: content and mtime change
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cache_path(rec, 32, tmp_path / "c") != first
    assert load_record(rec, 32, tmp_path / "c").image.max() > 80
    assert calls == [32, 64, 32]


def test_version_bump_changes_key(tmp_path: Path, synth, monkeypatch) -> None:
    rec = Record(image=synth.write_rgb(tmp_path / "a.png", synth.fundus()), patient_id="a", source="t")
    before = cache_path(rec, 32, tmp_path)
    monkeypatch.setattr(cache, "PREPROCESS_VERSION", cache.PREPROCESS_VERSION + 1)
    assert cache_path(rec, 32, tmp_path) != before


def test_corrupt_entry_is_rebuilt(tmp_path: Path, synth) -> None:
    rec = Record(image=synth.write_rgb(tmp_path / "a.png", synth.fundus()), patient_id="a", source="t")
    (path,) = build_cache([rec], 32, tmp_path / "c", progress=False)
    path.write_bytes(b"not a zip")
    assert load_record(rec, 32, tmp_path / "c").image.shape == (32, 32, 3)
    assert CachedImage.load(path).image.shape == (32, 32, 3)


def test_unreadable_image_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    rec = Record(image=bad, patient_id="b", source="t")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_record(rec, 32, tmp_path / "c")
    with pytest.raises(ImageReadError, match="missing.jpg"):
        load_record(Record(image=tmp_path / "missing.jpg", patient_id="m", source="t"), 32, tmp_path / "c")


def test_mask_size_mismatch_names_both_files(tmp_path: Path, synth) -> None:
    img = synth.write_rgb(tmp_path / "a.png", synth.fundus(60, 80))
    mask = synth.write_mask(tmp_path / "a_OD.png", np.ones((30, 40), np.uint8))
    rec = Record(image=img, patient_id="a", source="t", masks=(None, None, None, None, mask))
    with pytest.raises(ImageReadError, match="a_OD.png.*a.png"):
        load_record(rec, 32, tmp_path / "c")


def test_real_idrid_tif_masks(shared_data: Path, tmp_path: Path) -> None:
    recs = load_idrid_segmentation(IdridSegmentationSource(kind="idrid-segmentation", path=shared_data / "idrid" / "A. Segmentation"))
    entry = load_record(recs[0], 64, tmp_path)
    assert entry.masks.shape == (64, 64, 5) and entry.masks[..., 4].sum() > 0  # optic disc present

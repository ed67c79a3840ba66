"""The synthetic fundus generator: masks match the painted lesions, grades follow the rules, output is reproducible."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from training.data.synthetic import (
    CSV_COLUMNS,
    SEVERE_HAEMORRHAGES,
    SEVERE_SOFT_EXUDATES,
    SyntheticFundus,
    dme_grade_from_mask,
    dr_grade_from_lesions,
    make_fundus,
    write_synthetic_dataset,
)
from training.model import LESIONS

MA, HE, EX, SE, OD = range(5)


def _fundus(seed: int, grade: int | None = None, **kw) -> SyntheticFundus:
    return make_fundus(np.random.default_rng(seed), 256, grade, **kw)


def _ring(masks: np.ndarray, k: int, width: int = 6) -> np.ndarray:
    """Retina around lesion channel k: a dilation of it minus every lesion mask."""
    grown = cv2.dilate(masks[..., k], np.ones((2 * width + 1, 2 * width + 1), np.uint8)).astype(bool)
    return grown & ~masks[..., :4].any(axis=2) & ~masks[..., OD].astype(bool)


def test_image_and_mask_format() -> None:
    f = _fundus(0, 3)
    assert f.image.shape == (256, 256, 3) and f.image.dtype == np.uint8
    assert f.masks.shape == (256, 256, len(LESIONS)) and f.masks.dtype == np.uint8
    assert set(np.unique(f.masks)) <= {0, 1}
    assert f.eye in ("L", "R")
    # dark surround, bright disc at disc_center, disc on the eye's side of the fovea
    assert f.image[:4, :4].max() < 12
    x, y = (int(round(v)) for v in f.disc_center)
    assert f.masks[y, x, OD] == 1
    assert f.image[f.masks[..., OD] == 1].mean() > f.image[_ring(f.masks, OD, 10)].mean()
    for seed in range(6):
        g = _fundus(seed)
        assert (g.disc_center[0] > g.fovea[0]) == (g.eye == "R")
        assert 2.0 * g.disc_diameter < np.hypot(g.disc_center[0] - g.fovea[0], g.disc_center[1] - g.fovea[1]) < 3.0 * g.disc_diameter
    assert _fundus(1, eye="L").eye == "L" and _fundus(1, eye="R").eye == "R"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_cover_the_painted_lesions(seed: int) -> None:
    f = _fundus(seed, 3, dme_grade=2)
    img = f.image.astype(np.float32)
    brightness = img.sum(axis=2)
    yellowness = img[..., 1] / (img[..., 0] + 1.0)  # green relative to red: ~1 for yellow, well below for orange-red
    assert all(f.masks[..., k].any() for k in (MA, HE, EX))
    for k in (MA, HE):  # dark red lesions are darker than the retina around them
        inside = f.masks[..., k].astype(bool)
        assert brightness[inside].mean() < 0.85 * brightness[_ring(f.masks, k)].mean(), LESIONS[k]
    ex = f.masks[..., EX].astype(bool)
    assert brightness[ex].mean() > 1.3 * brightness[_ring(f.masks, EX)].mean()
    assert yellowness[ex].mean() > yellowness[_ring(f.masks, EX)].mean() + 0.25
    if f.masks[..., SE].any():
        se = f.masks[..., SE].astype(bool)
        assert brightness[se].mean() > 1.2 * brightness[_ring(f.masks, SE)].mean()


def test_grade_rules_unit() -> None:
    assert dr_grade_from_lesions(0, 0, 0, 0, False) == 0
    assert dr_grade_from_lesions(3, 0, 0, 0, False) == 1
    assert dr_grade_from_lesions(3, 1, 0, 0, False) == 2
    assert dr_grade_from_lesions(0, 0, 4, 0, False) == 2
    assert dr_grade_from_lesions(5, SEVERE_HAEMORRHAGES, 0, 0, False) == 3
    assert dr_grade_from_lesions(5, 2, 0, SEVERE_SOFT_EXUDATES, False) == 3
    assert dr_grade_from_lesions(5, 2, 0, 0, True) == 4
    ex = np.zeros((64, 64), np.uint8)
    assert dme_grade_from_mask(ex, (32.0, 32.0), 10.0) == 0
    ex[32, 50] = 1  # 18 px away
    assert dme_grade_from_mask(ex, (32.0, 32.0), 10.0) == 1
    ex[32, 41] = 1  # 9 px away
    assert dme_grade_from_mask(ex, (32.0, 32.0), 10.0) == 2


@pytest.mark.parametrize("grade", range(5))
def test_requested_grade_matches_lesion_content(grade: int) -> None:
    for seed in range(8):
        f = _fundus(100 * grade + seed, grade)
        assert f.dr_grade == grade
        present = [bool(f.masks[..., k].any()) for k in range(5)]
        counts = f.lesion_counts
        assert present[OD]
        assert present[:4] == [counts[name] > 0 for name in LESIONS[:4]]
        if grade == 0:
            assert present[:4] == [False] * 4 and f.dme_grade == 0
        elif grade == 1:
            assert present[:4] == [True, False, False, False] and f.dme_grade == 0
        else:
            assert any(present[HE:SE + 1])
        if grade == 3:
            assert counts["haemorrhages"] >= SEVERE_HAEMORRHAGES or counts["soft_exudates"] >= SEVERE_SOFT_EXUDATES
        if grade == 2:
            assert counts["haemorrhages"] < SEVERE_HAEMORRHAGES and counts["soft_exudates"] < SEVERE_SOFT_EXUDATES
        assert f.neovascularisation == (grade == 4)


def test_dme_grade_measured_from_exudate_mask() -> None:
    seen = set()
    for seed in range(30):
        f = _fundus(seed, 2 + seed % 3)
        ys, xs = np.nonzero(f.masks[..., EX])
        if ys.size == 0:
            expected = 0
        else:
            near = np.hypot(xs - f.fovea[0], ys - f.fovea[1]).min() <= f.disc_diameter
            expected = 2 if near else 1
        assert f.dme_grade == expected
        seen.add(f.dme_grade)
    assert seen == {0, 1, 2}
    for target in range(3):  # an explicit DME target is honoured
        assert _fundus(7, 2, dme_grade=target).dme_grade == target
    with pytest.raises(ValueError):
        _fundus(0, 1, dme_grade=2)


def test_deterministic_for_a_seed() -> None:
    a, b, c = _fundus(42), _fundus(42), _fundus(43)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert (a.dr_grade, a.dme_grade, a.eye, a.fovea) == (b.dr_grade, b.dme_grade, b.eye, b.fovea)
    assert not np.array_equal(a.image, c.image)


def test_fast_enough() -> None:
    import time

    rng = np.random.default_rng(0)
    make_fundus(rng)
    t = time.perf_counter()
    for _ in range(10):
        make_fundus(rng)
    assert (time.perf_counter() - t) / 10 < 0.1  # ~10-20 ms on an idle core; generous for shared CI


def test_write_synthetic_dataset(tmp_path) -> None:
    csv_path = write_synthetic_dataset(tmp_path / "synth", n=10, size=128, seed=3)
    assert csv_path == tmp_path / "synth" / "labels.csv"
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 10
    assert [r["image"] for r in rows[:2]] == ["images/Patient001_L.jpg", "images/Patient001_R.jpg"]
    assert sorted(int(r["dr_grade"]) for r in rows) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    root = csv_path.parent
    written = {p.relative_to(root).as_posix() for p in (root / "masks").iterdir()}
    referenced = set()
    for r in rows:
        assert r["patient_id"] == r["image"].split("/")[1].split("_")[0] and r["eye"] in ("L", "R")
        assert r["image"].endswith(f"_{r['eye']}.jpg")
        img = cv2.imread(str(root / r["image"]))
        assert img is not None and img.shape == (128, 128, 3)
        assert r["od_mask"]
        if r["dr_grade"] == "0":
            assert not any(r[c] for c in ("ma_mask", "he_mask", "ex_mask", "se_mask"))
        assert (r["ex_mask"] != "") == (r["dme_grade"] != "0")
        for col in CSV_COLUMNS[5:]:
            if r[col]:
                referenced.add(r[col])
                m = cv2.imread(str(root / r[col]), cv2.IMREAD_UNCHANGED)
                assert m.shape == (128, 128) and set(np.unique(m)) == {0, 255}
    assert written == referenced  # absent lesions have no file
    assert len(written) < 10 * 5


def test_write_without_masks(tmp_path) -> None:
    csv_path = write_synthetic_dataset(tmp_path, n=3, size=64, seed=0, with_masks=False)
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["images/Patient001_L.jpg", "images/Patient001_R.jpg", "images/Patient002_L.jpg"]
    assert all(not r[c] for r in rows for c in CSV_COLUMNS[5:])
    assert not (tmp_path / "masks").exists()

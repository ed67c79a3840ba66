"""Degradations of good photos and non-fundus pictures (training/degrade.py)."""

from __future__ import annotations

import numpy as np
import pytest

from training.degrade import DEGRADATIONS, FROM_PHOTOS, NOT_FUNDUS, degrade, not_fundus


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from training.data.synthetic import make_fundus

    return make_fundus(np.random.default_rng(3), size=320).image


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_each_degradation_keeps_the_frame_and_is_reproducible(photo, name):
    for severe in (False, True):
        a = degrade(photo, name, np.random.default_rng(1), severe)
        b = degrade(photo, name, np.random.default_rng(1), severe)
        assert a.shape == photo.shape and a.dtype == np.uint8 and np.array_equal(a, b)


def test_severe_is_worse_than_mild(photo):
    """Sizes and strengths come from separate ranges, so a mild degradation stays closer to the photo."""
    lit = photo.max(axis=2) > 12
    for name in sorted(DEGRADATIONS):
        rng = np.random.default_rng(5)
        mild = np.abs(degrade(photo, name, rng, False).astype(float) - photo)[lit].mean()
        severe = np.abs(degrade(photo, name, rng, True).astype(float) - photo)[lit].mean()
        assert severe > mild, name
    dark = degrade(photo, "under_exposed", np.random.default_rng(0), True)
    assert dark[lit].mean() < 0.2 * photo[lit].mean()


@pytest.mark.parametrize("kind", NOT_FUNDUS)
def test_non_fundus_pictures(photo, kind):
    picture = not_fundus(kind, np.random.default_rng(0), photo)
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.uint8 and min(picture.shape[:2]) >= 128
    if kind in FROM_PHOTOS:
        with pytest.raises(ValueError, match="transforms a fundus photo"):
            not_fundus(kind, np.random.default_rng(0))


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown non-fundus kind"):
        not_fundus("painting", np.random.default_rng(0))

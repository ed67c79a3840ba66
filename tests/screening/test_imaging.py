import cv2
import numpy as np
import pytest

from screening.imaging import check_fundus, decode, reduction_factor
from screening.rejection import Rejection, RejectReason
from training.data.synthetic import make_fundus
from training.data.transforms import preprocess_fundus


def test_reduction_factor_keeps_enough_pixels():
    assert reduction_factor(4288, 2848, 512) == 4  # 712 px short side >= 1.25 * 512
    assert reduction_factor(1024, 685, 512) == 1
    assert reduction_factor(4288, 2848, 256) == 8


def test_decode_matches_training_preprocessing(tmp_path):
    img = make_fundus(np.random.default_rng(0), size=300).image
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    d = decode(path, 128, display_size=256)
    assert d.rgb.shape == (128, 128, 3) and d.display.shape == (256, 256, 3)
    assert np.array_equal(d.rgb, preprocess_fundus(img, 128)[0])
    assert d.original_size == (300, 300) and d.decode_factor == 1


def test_big_camera_jpeg_uses_reduced_decode(shared_data):
    d = decode(shared_data / "fullres" / "camera_01.jpg", 256)
    assert d.decode_factor == 4 and d.original_size == (4288, 2848)


@pytest.mark.parametrize("make, reason, code", [
    (lambda: np.zeros((300, 300, 3), np.uint8), "dark", RejectReason.TOO_DARK),
    (lambda: np.full((300, 300, 3), 255, np.uint8), "fundus", RejectReason.NOT_FUNDUS),
    (lambda: np.dstack([np.full((300, 300), 40, np.uint8), np.full((300, 300), 90, np.uint8), np.full((300, 300), 200, np.uint8)]),
     "fundus", RejectReason.NOT_FUNDUS),
])
def test_non_fundus_images_are_rejected_with_reason(make, reason, code):
    with pytest.raises(Rejection, match=reason) as exc:
        check_fundus(make())
    assert exc.value.code == code


def test_tiny_and_corrupt_files(tmp_path):
    small = tmp_path / "s.png"
    cv2.imwrite(str(small), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(Rejection, match="too small") as exc:
        decode(small, 64)
    assert exc.value.code == RejectReason.TOO_SMALL
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(Rejection) as exc:
        decode(bad, 64)
    assert exc.value.code == RejectReason.UNREADABLE

import cv2
import numpy as np
import pytest

from screening.imaging import decode, reduction_factor
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


def test_decode_keeps_the_whole_frame_for_the_intake_checks(tmp_path):
    img = make_fundus(np.random.default_rng(1), size=300).image
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.pad(img, ((0, 0), (50, 50), (0, 0))), cv2.COLOR_RGB2BGR))
    d = decode(path, 128)
    assert d.frame is not None and d.frame.shape == (300, 400, 3)  # uncropped: field geometry is measured on it


def test_dark_and_odd_pictures_are_decoded_not_judged(tmp_path):
    """Whether a picture is a gradable fundus photo is the learned verdict's call (screening.checks), not decode's."""
    path = tmp_path / "dark.png"
    cv2.imwrite(str(path), np.zeros((300, 300, 3), np.uint8))
    assert decode(path, 64).rgb.shape == (64, 64, 3)


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

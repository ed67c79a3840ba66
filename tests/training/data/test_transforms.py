import cv2
import numpy as np
import pytest
import torch

from training.data.synthetic import make_fundus
from training.data.transforms import (
    channel_max,
    eval_transforms,
    fundus_bbox,
    preprocess_fundus,
    subtract_local_mean,
    train_transforms,
)


def _fundus():
    return make_fundus(np.random.default_rng(0), size=256)


def test_preprocess_crops_pads_and_keeps_masks_aligned():
    f = _fundus()
    wide = np.zeros((256, 400, 3), np.uint8)
    wide[:, 72:328] = f.image
    masks = np.zeros((256, 400, 5), np.uint8)
    masks[:, 72:328] = f.masks
    img, m = preprocess_fundus(wide, 128, masks)
    ref_img, ref_m = preprocess_fundus(f.image, 128, f.masks)
    assert img.shape == (128, 128, 3) and m.shape == (128, 128, 5)
    assert np.array_equal(m, ref_m)  # the black side bands are cropped away
    assert np.abs(img.astype(int) - ref_img.astype(int)).mean() < 1.0


def test_local_mean_contrast_flattens_illumination_and_keeps_background_black():
    img = _fundus().image
    out = subtract_local_mean(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[img.max(axis=2) <= 12] == 0).all()
    centre = out[96:160, 96:160].reshape(-1, 3).mean(0)
    assert np.all(np.abs(centre - 128) < 40)  # the retina's colour cast is gone: near mid-grey


def test_channel_max_gives_numpys_values_for_any_layout():
    rng = np.random.default_rng(3)
    for img in (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rng.normal(size=(20, 30, 4)).astype(np.float32)):
        for view in (img, img[::2, 1::3], np.ascontiguousarray(img.transpose(1, 0, 2))):
            out = channel_max(view)
            assert out.dtype == view.dtype and np.array_equal(out, view.max(axis=2))
    assert not np.shares_memory(channel_max(img), img)  # a new array: callers may write into it
    with pytest.raises(ValueError, match=r"\(H, W, C\).*\(5, 5\)"):
        channel_max(np.zeros((5, 5), np.uint8))


def _reference_local_mean(image):
    """The contrast step as first written (numpy max over channels, boolean-mask assignment); the fast
    version must give the same bytes, or the worker would no longer apply the training preset."""
    field = (image.max(axis=2) > 12).astype(np.uint8)
    k = max(3, int(max(image.shape[:2]) * 0.03) | 1)
    field = cv2.erode(field, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool)
    blur = cv2.GaussianBlur(image, (0, 0), sigmaX=max(image.shape[:2]) / 30)
    out = cv2.addWeighted(image, 4.0, blur, -4.0, 128.0)
    out[~field] = 0
    return out


@pytest.mark.parametrize("size", [256, 512])
def test_local_mean_contrast_and_bbox_are_byte_identical_to_the_reference(size):
    img = make_fundus(np.random.default_rng(size), size=size, dr_grade=3, dme_grade=2).image
    assert np.array_equal(subtract_local_mean(img), _reference_local_mean(img))
    wide = np.zeros((size, size + 90, 3), np.uint8)
    wide[:, 40:40 + size] = img
    probe = wide.max(axis=2)
    rows, cols = np.flatnonzero((probe > 12).mean(axis=1) > 0.01), np.flatnonzero((probe > 12).mean(axis=0) > 0.01)
    assert fundus_bbox(wide) == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)


def test_contrast_mode_is_part_of_both_presets_and_validated():
    img = _fundus().image
    plain = eval_transforms(64)(image=img)["image"]
    enhanced = eval_transforms(64, "local-mean")(image=img)["image"]
    assert plain.shape == enhanced.shape == (3, 64, 64) and not torch.allclose(plain, enhanced)
    a = train_transforms(64, seed=1, contrast="local-mean")(image=img, mask=np.zeros((256, 256, 5), np.uint8))
    assert a["image"].shape == (3, 64, 64) and a["mask"].shape == (5, 64, 64)
    with pytest.raises(ValueError, match="contrast"):
        eval_transforms(64, "clahe")


def test_predictor_applies_the_checkpoints_contrast(tmp_path):
    from screening.inference import Predictor
    from training.checkpoint import labels_dict, save_checkpoint
    from training.model import ModelConfig, build_model

    cfg = ModelConfig(backbone="resnet18", image_size=64, decoder_channels=(16, 16, 16, 8, 8), contrast="local-mean")
    path = save_checkpoint(tmp_path / "c.pt", {
        "model_state": build_model(cfg).state_dict(), "model_config": cfg.to_dict(), "labels": labels_dict(),
        "thresholds": {"referable": 0.5}, "provenance": {"kind": "real"}, "metrics": {}, "model_version": "x"})
    p = Predictor(path, "cpu", 1)
    img = _fundus().image
    assert torch.allclose(p.to_tensor([img])[0], eval_transforms(64, "local-mean")(image=img)["image"])

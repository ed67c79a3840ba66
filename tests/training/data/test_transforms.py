import numpy as np
import pytest
import torch

from training.data.synthetic import make_fundus
from training.data.transforms import eval_transforms, preprocess_fundus, subtract_local_mean, train_transforms


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

"""FundusDataset: item contract, default collate, augmentation keeps masks aligned with the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data.dataset import FundusDataset, class_counts
from training.data.records import DME_PRESENT, Record
from training.data.transforms import train_transforms
from training.model import IMAGENET_MEAN, IMAGENET_STD

SIZE = 64


def _records(tmp_path: Path, synth) -> list[Record]:
    img = synth.fundus(96, 96, level=40, square=(30, 56, 16))
    square = np.zeros((96, 96), np.uint8)
    square[30:46, 56:72] = 1
    masks = tuple(synth.write_mask(tmp_path / f"m{k}.png", square) if k == 2 else None for k in range(5))
    seg = Record(image=synth.write_rgb(tmp_path / "seg.png", img), patient_id="s", source="t", masks=masks)
    graded = Record(image=synth.write_rgb(tmp_path / "g.png", synth.fundus(96, 96)), patient_id="g", source="t", dr_grade=2, dme_grade=DME_PRESENT)
    return [seg, graded]


def test_items_and_default_collate(tmp_path: Path, synth) -> None:
    ds = FundusDataset(_records(tmp_path, synth), SIZE, tmp_path / "cache")
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["masks"].shape == (2, 5, SIZE, SIZE) and batch["masks"].dtype == torch.float32
    assert batch["dr"].tolist() == [-1, 2] and batch["dr"].dtype == torch.long
    assert batch["dme"].tolist() == [-1, DME_PRESENT]
    assert batch["has_masks"].tolist() == [True, False]
    assert batch["index"].tolist() == [0, 1]
    assert batch["masks"][1].sum() == 0 and batch["masks"][0, 2].sum() > 0
    assert set(batch["masks"].unique().tolist()) <= {0.0, 1.0}


def test_augmentation_keeps_mask_on_bright_square(tmp_path: Path, synth) -> None:
    ds = FundusDataset(_records(tmp_path, synth)[:1], SIZE, tmp_path / "cache", train_transforms(SIZE))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    dilate = torch.nn.MaxPool2d(5, stride=1, padding=2)
    for seed in range(12):
        torch.manual_seed(seed)
        np.random.seed(seed)
        item = ds[0]
        pixel = (item["image"] * std + mean).mean(0) * 255
        mask = item["masks"][2]
        bright = pixel > 126  # square >= 153 after brightness/contrast, background <= 99
        assert bright.sum() > 20 and mask.sum() > 20, seed
        near_mask = dilate(mask[None, None])[0, 0] > 0
        assert bool((bright <= near_mask).all()), f"bright pixels outside the mask (seed {seed})"
        inside = pixel[mask > 0]
        assert (inside > 126).float().mean() > 0.8, seed
        ys, xs = torch.nonzero(bright, as_tuple=True)
        my, mx = torch.nonzero(mask > 0, as_tuple=True)
        assert abs(ys.float().mean() - my.float().mean()) < 1.5 and abs(xs.float().mean() - mx.float().mean()) < 1.5


def test_class_counts() -> None:
    recs = [Record(image=Path(f"/{g}{i}"), patient_id="p", source="t", dr_grade=g) for i, g in enumerate([0, 0, 2, 4, -1])]
    assert class_counts(recs).tolist() == [2, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="grade 7"):
        class_counts([Record(image=Path("/x"), patient_id="p", source="t", dr_grade=7)])

"""Small synthetic fundus images, masks and folder layouts for the data-pipeline tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

torch.set_num_threads(1)

OFFICIAL_LESION_FOLDERS = ("1. Microaneurysms", "2. Haemorrhages", "3. Hard Exudates", "4. Soft Exudates", "5. Optic Disc")
CODES = ("MA", "HE", "EX", "SE", "OD")


def fundus(h: int = 60, w: int = 80, level: int = 40, square: tuple[int, int, int] | None = None) -> np.ndarray:
    """RGB image: a dark-grey disc on black; optional bright square (y, x, side)."""
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 2 - 1, (level, level, level), -1)
    if square is not None:
        y, x, s = square
        img[y : y + s, x : x + s] = 255
    return img


def write_rgb(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok, path
    return path


def write_mask(path: Path, mask: np.ndarray, rgb: bool = False, value: int = 255) -> Path:
    """Write a {0,1} mask as single-channel or 3-channel TIF/PNG with ``value`` for lesion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = (mask > 0).astype(np.uint8) * value
    if rgb:
        m = np.stack([m, np.zeros_like(m), np.zeros_like(m)], axis=2)  # red-only lesion, as some releases ship
    assert cv2.imwrite(str(path), m), path
    return path


@pytest.fixture
def make_idrid_seg(tmp_path: Path) -> Callable[..., Path]:
    """Build an official-layout IDRiD segmentation folder; image 2 has no SE mask, image 1's masks are RGB."""

    def build(n_images: int = 2, h: int = 60, w: int = 80) -> Path:
        root = tmp_path / "idrid" / "A. Segmentation"
        for i in range(1, n_images + 1):
            name = f"IDRiD_{i:02d}"
            write_rgb(root / "1. Original Images" / "a. Training Set" / f"{name}.jpg", fundus(h, w))
            for folder, code in zip(OFFICIAL_LESION_FOLDERS, CODES):
                gt = root / "2. All Segmentation Groundtruths" / "a. Training Set" / folder
                gt.mkdir(parents=True, exist_ok=True)
                if code == "SE" and i == 2:
                    continue
                mask = np.zeros((h, w), np.uint8)
                mask[10 + i : 20 + i, 30:40] = 1
                write_mask(gt / f"{name}_{code}.tif", mask, rgb=(i == 1))
        return root

    return build


class Synth:
    """Helpers handed to tests through the ``synth`` fixture (conftest modules are not importable)."""

    fundus = staticmethod(fundus)
    write_rgb = staticmethod(write_rgb)
    write_mask = staticmethod(write_mask)


@pytest.fixture
def synth() -> type[Synth]:
    return Synth

"""E14, first part: more test-time views for the shipped chirality network (experiments/README.md, E14).

    .venv/bin/python experiments/e14_test_time_views.py

The shipped model averages four views (as is, rotated by 180 degrees, and the two mirrored views negated). This adds
copies of the photo rotated by +-10 and +-20 degrees and scaled by 0.92 and 1.08 (each again in the four views) and
prints, for each set, the network alone and joined with the landmarks (weights refitted on validation), on the
validation split only: the test split is not read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e14_chirality_resolution import joined  # noqa: E402 - the same joining and measures as the E14 run

from training.chirality import chirality_logits  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.data.records import Record  # noqa: E402
from training.data.sources import load_all  # noqa: E402
from training.data.split import configured_split  # noqa: E402
from training.fit_laterality import _probabilities, measure_records, stored_photos  # noqa: E402
from training.laterality import load_laterality_model  # noqa: E402


def warp(img: np.ndarray, angle: float, scale: float) -> np.ndarray:
    size = img.shape[0]
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    return cv2.warpAffine(np.ascontiguousarray(img), m, (size, size), borderValue=(0, 0, 0))


def named_validation(model: dict[str, Any]) -> tuple[list[Record], Path, np.ndarray, np.ndarray]:
    """The validation photos that name the eye (quality.toml's split), the laterality cache folder, their labels
    (1 = right eye) and the landmarks' P(right eye) under ``model``: what E14's views, E16 and E17 are measured on."""
    cfg = load_training_config(ROOT / "experiments" / "quality.toml")
    split = configured_split(cfg.data, load_all(cfg.data))
    val = [r for r in split["val"] if r.eye in ("L", "R")]
    cache = Path(cfg.data.cache_dir).parent / "laterality" / "landmarks.npz"
    y = np.array([r.eye == "R" for r in val], float)
    return val, cache.parent, y, _probabilities(model, measure_records(val, cache), "detect")


def main() -> int:
    model = load_laterality_model(ROOT / "models" / "laterality.pt")
    val, cache_dir, y, p_l = named_validation(model)
    photos = stored_photos(val, cache_dir)

    def report(name: str, cnn: np.ndarray) -> None:
        j = joined(p_l, cnn, y)
        print(f"{name:28s} alone {((cnn > 0) == (y > 0)).mean():.4f}  joined errors {len(y) - j['right']}"
              f"  log-loss {j['log_loss']:.4f}", flush=True)

    base = chirality_logits(model["_net"], photos)
    report("4 views (shipped)", base)
    extra = {(a, s): chirality_logits(model["_net"], np.stack([warp(im, a, s) for im in photos]))
             for a, s in [(10, 1.0), (-10, 1.0), (0, 0.92), (0, 1.08), (20, 1.0), (-20, 1.0)]}
    report("12 views, +-10 degrees", (base + extra[(10, 1.0)] + extra[(-10, 1.0)]) / 3)
    report("12 views, scale 0.92/1.08", (base + extra[(0, 0.92)] + extra[(0, 1.08)]) / 3)
    report("20 views, +-10 and +-20", (base + sum(extra[(a, 1.0)] for a in (10, -10, 20, -20))) / 5)
    report("28 views, all", (base + sum(extra.values())) / 7)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

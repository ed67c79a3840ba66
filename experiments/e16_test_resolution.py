"""E16: the shipped chirality network (E15) shown the photo at a higher resolution, no training
(experiments/README.md, E16).

    .venv/bin/python experiments/e16_test_resolution.py [--store 320] [--crop 280]

Prints the network alone and joined with the landmarks (weights refitted on validation, as `fit-laterality` does)
on the validation split, first at the shipped sizes (256/224: reproduces the model's own validation numbers), then
at ``--store``/``--crop``. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e14_chirality_resolution import joined  # noqa: E402 - the same joining and measures as E14

from training.chirality import CROP, STORE, chirality_logits  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.data.sources import load_all  # noqa: E402
from training.data.split import configured_split  # noqa: E402
from training.fit_laterality import _probabilities, measure_records, stored_photos  # noqa: E402
from training.laterality import load_laterality_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=int, default=320)
    ap.add_argument("--crop", type=int, default=280)
    args = ap.parse_args()
    cfg = load_training_config(ROOT / "experiments" / "quality.toml")
    split = configured_split(cfg.data, load_all(cfg.data))
    val = [r for r in split["val"] if r.eye in ("L", "R")]
    cache = Path(cfg.data.cache_dir).parent / "laterality" / "landmarks.npz"
    y = np.array([r.eye == "R" for r in val], float)
    model = load_laterality_model(ROOT / "models" / "laterality.pt")
    p_l = _probabilities(model, measure_records(val, cache), "detect")
    for store, crop in ((STORE, CROP), (args.store, args.crop)):
        cnn = chirality_logits(model["_net"], stored_photos(val, cache.parent, store), crop=crop)
        row = {"store": store, "crop": crop, "photos": len(y),
               "alone_right": int(((cnn > 0) == (y > 0)).sum()), **joined(p_l, cnn, y)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

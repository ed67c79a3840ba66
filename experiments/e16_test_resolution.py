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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e14_chirality_resolution import joined  # noqa: E402 - the same joining and measures as E14
from e14_test_time_views import named_validation  # noqa: E402 - the same validation photos and landmarks

from training.chirality import CROP, STORE, chirality_logits  # noqa: E402
from training.fit_laterality import stored_photos  # noqa: E402
from training.laterality import load_laterality_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=int, default=320)
    ap.add_argument("--crop", type=int, default=280)
    args = ap.parse_args()
    model = load_laterality_model(ROOT / "models" / "laterality.pt")
    val, cache_dir, y, p_l = named_validation(model)
    for store, crop in ((STORE, CROP), (args.store, args.crop)):
        cnn = chirality_logits(model["_net"], stored_photos(val, cache_dir, store), crop=crop)
        row = {"store": store, "crop": crop, "photos": len(y),
               "alone_right": int(((cnn > 0) == (y > 0)).sum()), **joined(p_l, cnn, y)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

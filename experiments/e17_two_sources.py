"""E17: E12's and E15's chirality networks averaged (experiments/README.md, E17).

    .venv/bin/python experiments/e17_two_sources.py [--other PATH]

``--other`` is E12's laterality model (format 3), by default read from git (7835d2f:models/laterality.pt, the last
commit that shipped it). Prints each network and their mean, alone and joined with the landmarks (weights refitted
on validation, as `fit-laterality` does), on the validation split. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e14_chirality_resolution import joined  # noqa: E402 - the same joining and measures as E14

from training.chirality import chirality_logits  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.data.sources import load_all  # noqa: E402
from training.data.split import configured_split  # noqa: E402
from training.fit_laterality import _probabilities, measure_records, stored_photos  # noqa: E402
from training.laterality import load_laterality_model  # noqa: E402

E12_COMMIT = "7835d2f"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = args.other
        if other is None:
            other = Path(tmp) / "laterality-e12.pt"
            other.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{E12_COMMIT}:models/laterality.pt"],
                                             check=True, capture_output=True).stdout)
        e12 = load_laterality_model(other)
    e15 = load_laterality_model(ROOT / "models" / "laterality.pt")
    cfg = load_training_config(ROOT / "experiments" / "quality.toml")
    split = configured_split(cfg.data, load_all(cfg.data))
    val = [r for r in split["val"] if r.eye in ("L", "R")]
    cache = Path(cfg.data.cache_dir).parent / "laterality" / "landmarks.npz"
    y = np.array([r.eye == "R" for r in val], float)
    p_l = _probabilities(e15, measure_records(val, cache), "detect")
    photos = stored_photos(val, cache.parent)
    logits = {"E12": chirality_logits(e12["_net"], photos), "E15": chirality_logits(e15["_net"], photos)}
    logits["mean"] = (logits["E12"] + logits["E15"]) / 2
    for name, cnn in logits.items():
        row = {"network": name, "photos": len(y), "alone_right": int(((cnn > 0) == (y > 0)).sum()), **joined(p_l, cnn, y)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

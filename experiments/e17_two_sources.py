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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e14_chirality_resolution import joined  # noqa: E402 - the same joining and measures as E14
from e14_test_time_views import named_validation  # noqa: E402 - the same validation photos and landmarks

from training.chirality import chirality_logits  # noqa: E402
from training.fit_laterality import stored_photos  # noqa: E402
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
    val, cache_dir, y, p_l = named_validation(e15)
    photos = stored_photos(val, cache_dir)
    logits = {"E12": chirality_logits(e12["_net"], photos), "E15": chirality_logits(e15["_net"], photos)}
    logits["mean"] = (logits["E12"] + logits["E15"]) / 2
    for name, cnn in logits.items():
        row = {"network": name, "photos": len(y), "alone_right": int(((cnn > 0) == (y > 0)).sum()), **joined(p_l, cnn, y)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

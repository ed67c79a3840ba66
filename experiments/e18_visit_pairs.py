"""E18: a visit's two eyes read together, no training (experiments/README.md, E18).

    .venv/bin/python experiments/e18_visit_pairs.py [--test]

Each photo's P(right eye) comes from the shipped laterality model as the product computes it (landmarks joined with
the chirality network by the model's own weights). A visit's photos named the two different eyes are then read
together: the truth is one of four pairs (as named, swapped, both right, both left); the two different-eye pairs
share a prior of 1 - EPSILON, the two same-eye pairs EPSILON (fixed before any number was seen: a site that photographs
one eye twice under both names once in twenty visits), and each photo's posterior of its stated eye is the marginal.
A photo with no partner named the other eye keeps its own probability. Prints single and pair reading on the
validation split; ``--test`` reads the test split too, and is run only for a reading the rule of E18 has chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.chirality import chirality_logits  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.data.records import Record  # noqa: E402
from training.data.sources import load_all  # noqa: E402
from training.data.split import configured_split  # noqa: E402
from training.fit_laterality import _probabilities, measure_records, stored_photos  # noqa: E402
from training.laterality import load_laterality_model, log_odds  # noqa: E402

EPSILON = 0.05


def pair_posteriors(records: list[Record], p_right: np.ndarray, epsilon: float = EPSILON) -> np.ndarray:
    """P(each photo shows its stated eye) after reading it with its patient's photos named the other eye (the mean
    log-odds of those, when several); a photo with no such partner keeps its own probability."""
    stated_p = np.where(np.array([r.eye == "R" for r in records]), p_right, 1 - p_right)
    z = log_odds(stated_p)
    by_patient: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(records):
        by_patient[(r.source, r.patient_id)][str(r.eye)].append(i)
    out = stated_p.copy()
    for eyes in by_patient.values():
        if len(eyes) < 2:
            continue
        for eye, idx in eyes.items():
            other = [j for e, js in eyes.items() if e != eye for j in js]
            zb = float(np.mean(z[other]))
            for i in idx:
                # likelihood ratios of "shows its stated eye": photo i (z[i]) and its partner (zb)
                a, b = 1 / (1 + np.exp(-z[i])), 1 / (1 + np.exp(-zb))
                both = (1 - epsilon) / 2 * a * b  # as named
                swap = (1 - epsilon) / 2 * (1 - a) * (1 - b)  # swapped
                same_i = epsilon / 2 * a * (1 - b)  # both are photo i's stated eye
                same_o = epsilon / 2 * (1 - a) * b  # both are the partner's stated eye
                out[i] = (both + same_i) / (both + swap + same_i + same_o)
    return out


def measures(p_stated: np.ndarray) -> dict[str, float]:
    q = np.clip(p_stated, 1e-6, 1 - 1e-6)
    return {"photos": len(q), "right": int((q >= 0.5).sum()), "log_loss": round(float(-np.mean(np.log(q))), 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--test", action="store_true", help="also read the test split (only for a reading E18's rule chose)")
    args = ap.parse_args()
    model = load_laterality_model(ROOT / "models" / "laterality.pt")
    cfg = load_training_config(ROOT / "experiments" / "quality.toml")
    split = configured_split(cfg.data, load_all(cfg.data))
    cache = Path(cfg.data.cache_dir).parent / "laterality" / "landmarks.npz"
    for name in ("val", "test") if args.test else ("val",):
        recs = [r for r in split[name] if r.eye in ("L", "R")]
        cnn = chirality_logits(model["_net"], stored_photos(recs, cache.parent))
        p = _probabilities(model, measure_records(recs, cache), "detect", cnn)
        right = np.array([r.eye == "R" for r in recs])
        single = np.where(right, p, 1 - p)
        paired = pair_posteriors(recs, p)
        for reading, q in (("single", single), ("pair", paired), ("pair, epsilon 0", pair_posteriors(recs, p, 0.0))):
            for src in sorted({r.source for r in recs}):
                m = np.array([r.source == src for r in recs])
                print(json.dumps({"split": name, "reading": reading, "source": src, **measures(q[m])}), flush=True)
            print(json.dumps({"split": name, "reading": reading, "source": "all", **measures(q)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

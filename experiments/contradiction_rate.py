"""How often the shipped model's two heads contradict each other (DR 0 with a DME risk), on the validation split.

    .venv/bin/python experiments/contradiction_rate.py

The report flags such an eye ("grades disagree", screening.report.visit_cautions): hard exudates are themselves
retinopathy, so DR 0 with DME risk 1 or 2 cannot both be right. This measures how many photos carry that caution and
what the graders said of them, on the validation split (the test split is not read). About 20 minutes on 2 cores.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.checkpoint import load_model  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.evaluate import _predict, _split  # noqa: E402


def main() -> None:
    cfg = load_training_config(ROOT / "config.toml")
    checkpoint = ROOT / "models" / "baseline.pt"
    model, meta = load_model(checkpoint, torch.device("cpu"))
    recs = _split(cfg, meta)["val"]
    preds = _predict(model, meta, recs, cfg, torch.device("cpu"), progress=False)
    dr, dme = np.argmax(preds.dr_probs, 1), np.argmax(preds.dme_probs, 1)
    flagged = (dr == 0) & (dme >= 1)
    truth = Counter(int(t) for t in np.asarray(preds.dr_true)[flagged])
    by_source = Counter(r.source for r, f in zip(recs, flagged) if f)
    out = {"model": meta.get("model_version"), "photos": len(recs), "flagged": int(flagged.sum()),
           "flagged_share": float(flagged.mean()), "graders_dr_of_flagged": dict(sorted(truth.items())),
           "flagged_by_source": dict(by_source), "photos_by_source": dict(Counter(r.source for r in recs))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

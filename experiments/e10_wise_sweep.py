"""E10 (experiments/README.md): WiSE-FT alphas between model v2's network and E8's, scored on the validation split
only. For each alpha: the interpolated network (:func:`training.interpolate.interpolated_network`), optionally its
batch-norm statistics measured afresh on N training photos (``--reset-bn N``), one pass over the graded validation
photos (with the regression's lesion evidence), blend-grader's steps (temper, heads' weight by the five-fold rule,
Platt map, threshold), then per-source AUCs, kappa and DME; lesion AUPR on the annotated validation photos.
One JSON line per alpha on stdout and in ``--out``.

    .venv/bin/python experiments/e10_wise_sweep.py 1.0 0.5 0.75 0.25 [--reset-bn 400]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from training.checkpoint import read_checkpoint
from training.config import TrainingConfig, load_training_config
from training.evaluate import _pass, _split
from training.grader import apply_grader, blend, choose_heads_weight
from training.grading import temper_network
from training.interpolate import interpolated_network, reset_batch_norm
from training.metrics import (
    calibrated_referable,
    choose_threshold,
    classification_metrics,
    fit_referable_calibration,
    referable_labels,
    referable_score,
    segmentation_metrics,
)
from training.model import MultiTaskNet


def score(model: MultiTaskNet, cfg: TrainingConfig, val: list[Any], seg: list[Any], grader: dict[str, Any]) -> dict[str, Any]:
    cpu = torch.device("cpu")
    h = _pass(model, val, cfg, cpu, progress=False, seg_features=True)
    dr_t, dme_t, temps = temper_network(model, h.dr_probs, h.dme_probs, h.dr_true, h.dme_true)
    reg_dr, reg_dme = apply_grader(grader, h.extra, dme_t)
    y = referable_labels(h.dr_true, h.dme_true, dme_unknown_as_absent=True)
    src = np.array([r.source for r in val])
    w, choices = choose_heads_weight((dr_t, dme_t), (reg_dr, reg_dme), y, src, np.array([r.patient_id for r in val]))
    row: dict[str, Any] = {"temps": temps, "w": w, "choices": choices}
    for name, ww in (("net", 1.0), ("blend", w)):
        dr, dme = blend((dr_t, dme_t), (reg_dr, reg_dme), ww) if ww < 1 else (dr_t, dme_t)
        s = referable_score(dr, dme)
        per = {str(k): round(float(roc_auc_score(y[src == k], s[src == k])), 4) for k in np.unique(src)
               if len(np.unique(y[src == k])) == 2}
        cal = fit_referable_calibration(y, s)
        thr = choose_threshold(y, calibrated_referable(dr, dme, cal), 0.9)
        m = classification_metrics(dr, dme, h.dr_true, h.dme_true, thr, dme_unknown_as_absent=True,
                                   referable_calibration=cal)
        row[name] = {"auc": round(m["referable"]["auc"], 4), "mean_source_auc": round(float(np.mean(list(per.values()))), 4),
                     "per_source": per, "kappa": round(m["dr"]["quadratic_kappa"], 4), "dr_acc": round(m["dr"]["accuracy"], 4),
                     "spec": round(m["referable"]["specificity"], 4), "sens": round(m["referable"]["sensitivity"], 4),
                     "dme_acc": m["dme"].get("accuracy")}
    p = _pass(model, seg, cfg, cpu, progress=False)
    sm = segmentation_metrics(p.seg_probs.astype(np.float32), p.seg_masks)
    row["lesion_aupr"] = {k: (round(v["aupr"], 4) if v and v.get("aupr") is not None else None) for k, v in sm.items()}
    row["od_dice"] = sm["OD"]["dice"] if sm.get("OD") else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("alphas", type=float, nargs="+")
    ap.add_argument("--reset-bn", type=int, default=0, help="training photos to re-measure batch norm on (0: averaged)")
    ap.add_argument("--start", default="runs/v2-baseline.pt")
    ap.add_argument("--end", default="models/baseline.pt")
    ap.add_argument("--grader-from", default="runs/v1-baseline.pt")
    ap.add_argument("--out", default="runs/e10-wise/sweep.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_training_config("experiments/e8-finetune.toml")
    grader = {k: v for k, v in read_checkpoint(args.grader_from)["grader"].items() if k != "heads_weight"}
    for alpha in args.alphas:
        t0 = time.time()
        model, ckpt = interpolated_network(Path(args.start), Path(args.end), alpha)
        splits = _split(cfg, ckpt)
        if args.reset_bn:
            train = [r for r in splits["train"] if r.has_grade or r.has_dme]
            reset_batch_norm(model, random.Random(0).sample(train, min(args.reset_bn, len(train))), cfg, torch.device("cpu"))
        row = {"alpha": alpha, "reset_bn": args.reset_bn,
               **score(model, cfg, [r for r in splits["val"] if r.has_grade or r.has_dme],
                       [r for r in splits["val"] if r.has_masks], grader),
               "seconds": round(time.time() - t0)}
        print(json.dumps(row), flush=True)
        with Path(args.out).open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

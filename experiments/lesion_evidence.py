"""Experiment: does grading from the segmentation head's lesion evidence beat the DR/DME heads?

Fits a logistic regression for referable DR on lesion-area features (predicted MA/HE/EX/SE area
fractions, log-scaled) plus the heads' referable score, on the TRAIN split's predictions, and
compares validation AUCs. The test split is not touched.

    .venv/bin/python experiments/lesion_evidence.py --checkpoint runs/baseline/best.pt
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from training.checkpoint import load_model
from training.config import load_training_config
from training.data.dataset import FundusDataset
from training.data.sources import load_all
from training.data.split import split_by_patient
from training.data.transforms import eval_transforms
from training.metrics import referable_labels, referable_score


@torch.inference_mode()
def features(model, records, cfg, size, contrast):
    loader = DataLoader(FundusDataset(records, size, cfg.data.cache_dir, eval_transforms(size, contrast)), batch_size=16)
    feats, heads, dr, dme = [], [], [], []
    for batch in loader:
        out = model(batch["image"])
        seg = torch.sigmoid(out.seg_logits)
        areas = (seg > 0.5).float().mean((2, 3))[:, :4]
        soft = seg.mean((2, 3))[:, :4]
        feats.append(torch.cat([torch.log1p(1e4 * areas), torch.log1p(1e3 * soft)], 1).numpy())
        heads.append(referable_score(out.dr_logits.softmax(1).numpy(), out.dme_logits.softmax(1).numpy()))
        dr.append(batch["dr"].numpy())
        dme.append(batch["dme"].numpy())
    return np.concatenate(feats), np.concatenate(heads), np.concatenate(dr), np.concatenate(dme)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", default="config.toml")
    args = ap.parse_args()
    cfg = load_training_config(args.config)
    model, meta = load_model(args.checkpoint)
    size, contrast = model.config.image_size, model.config.contrast
    splits = split_by_patient(load_all(cfg.data), cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    res = {}
    data = {name: features(model, [r for r in splits[name] if r.has_grade], cfg, size, contrast) for name in ("train", "val")}
    (ftr, htr, drtr, dmetr), (fva, hva, drva, dmeva) = data["train"], data["val"]
    ytr, yva = referable_labels(drtr, dmetr), referable_labels(drva, dmeva)
    ktr, kva = ytr >= 0, yva >= 0
    res["val_auc_heads"] = roc_auc_score(yva[kva], hva[kva])
    for name, xtr, xva in (("lesions", ftr, fva), ("lesions+heads", np.c_[ftr, htr], np.c_[fva, hva])):
        clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(xtr[ktr], ytr[ktr])
        res[f"val_auc_{name}"] = roc_auc_score(yva[kva], clf.predict_proba(xva[kva])[:, 1])
    print(json.dumps({k: round(float(v), 4) for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()

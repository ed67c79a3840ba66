"""Evaluate a checkpoint on a split of the configured data: metrics.json + plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.checkpoint import content_digest, file_sha256, load_model, read_checkpoint, save_checkpoint
from training.config import TrainingConfig
from training.data.cache import load_record
from training.data.dataset import FundusDataset
from training.data.records import Record, fingerprints
from training.data.split import configured_split
from training.data.transforms import eval_transforms
from training.engine import Predictions, predict, resolve_device
from training.evaluation import METRICS_FILE, RELIABILITY_PNG, clinical_evaluation, plot_reliability, write_evaluation
from training.grader import (
    apply_grader,
    blend,
    choose_heads_weight,
    features_of,
    fit_grader,
    grades_with_grader,
    uses_segmentation,
)
from training.grading import temper_network
from training.metrics import (
    calibrated_referable,
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    fit_referable_calibration,
    referable_labels,
    referable_score,
)
from training.model import MultiTaskNet


def _split(cfg: TrainingConfig, meta: dict[str, Any]) -> dict[str, list[Record]]:
    """The checkpoint's own split, rebuilt from the configured sources and the recorded fractions and seed."""
    sp = meta["provenance"].get("split", {})
    return configured_split(cfg.data, None, sp.get("val_fraction"), sp.get("test_fraction"), sp.get("seed"))


def check_unseen(meta: dict[str, Any], split: str, records: list[Record], checkpoint: Path) -> None:
    """Refuse to score a checkpoint on photos its run trained on (and, for the test split, validated on). The split
    is rebuilt from today's configured sources: one source with a few more rows deals patients out differently,
    and photos of the run's training side land in "test" without a word (found in an ML engineer's check).
    Checkpoints trained before the run recorded what it saw (``provenance.split.seen``) cannot be checked."""
    seen = meta.get("provenance", {}).get("split", {}).get("seen")
    if not seen or split == "train":
        return
    sides = ("train",) if split == "val" else ("train", "val")
    known = {h for side in sides for h in seen.get(side, [])}
    overlap = [h for h in fingerprints(records) if h in known]
    if overlap:
        raise ValueError(f"{checkpoint}: {len(overlap)} of the {len(records)} photos of the {split!r} split were in "
                         f"its run's {' or '.join(sides)} split, so the scores would be flattered. The configured sources "
                         "or split settings differ from the run's: evaluate with the config the run was trained with")


def _features(records: list[Record], size: int, cache_dir: Path, model: Any = None, device: Any = None,
              batch_size: int = 8) -> Any:
    """Lesion features of the same preprocessed image the network sees (the worker's decode gives the same);
    with ``model``, its lesion maps of those images join them (a grader fitted ``--with-segmentation``)."""
    images = [load_record(r, size, cache_dir).image for r in records]
    if model is None:
        return features_of(images)
    transform = eval_transforms(size, model.config.contrast)
    model.eval()
    rows = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = torch.stack([transform(image=im)["image"] for im in chunk]).to(device)
            rows.append(features_of(chunk, torch.sigmoid(model(x).seg_logits.float()).cpu().numpy()))
    return np.concatenate(rows) if rows else features_of([])


def _pass(
    model: MultiTaskNet, recs: list[Record], cfg: TrainingConfig, device: torch.device, tta: bool = False,
    progress: bool = True, seg_features: bool = False,
) -> Predictions:
    """The network over ``recs`` once. ``seg_features``: the lesion-evidence features a segmentation grader reads
    (:func:`features_of` the preprocessed photo and its lesion maps) are taken from that same pass into
    ``Predictions.extra``; a second pass for them doubled evaluation time."""
    size = model.config.image_size
    loader = DataLoader(FundusDataset(recs, size, cfg.data.cache_dir, eval_transforms(size, model.config.contrast)),
                        batch_size=cfg.train.batch_size)
    seen = 0

    def lesion_rows(out: Any) -> np.ndarray:
        nonlocal seen
        chunk = [load_record(r, size, cfg.data.cache_dir).image for r in recs[seen:seen + out.seg_logits.shape[0]]]
        seen += len(chunk)
        return features_of(chunk, torch.sigmoid(out.seg_logits.float()).cpu().numpy())

    return predict(model, loader, device, progress=progress, tta_flip=tta, extra=lesion_rows if seg_features else None)


def _grader_inputs(grader: dict[str, Any], recs: list[Record], size: int, cache_dir: Path, preds: Predictions) -> Any:
    """The grader's features of ``recs``: from the network's pass when it reads lesion maps, else from the images."""
    if uses_segmentation(grader):
        assert preds.extra is not None, "the pass was run without seg_features"
        return preds.extra
    return _features(recs, size, cache_dir)


def _predict(
    model: MultiTaskNet, meta: dict[str, Any], recs: list[Record], cfg: TrainingConfig, device: torch.device,
    tta: bool = False, progress: bool = True,
) -> Predictions:
    grader = meta.get("grader")
    preds = _pass(model, recs, cfg, device, tta, progress, seg_features=grader is not None and uses_segmentation(grader))
    if grader is not None:
        features = _grader_inputs(grader, recs, model.config.image_size, cfg.data.cache_dir, preds)
        preds.dr_probs, preds.dme_probs = grades_with_grader(grader, features, preds.dr_probs, preds.dme_probs)
    return preds


def _grader_validation(network: dict[str, Any], graded: dict[str, Any]) -> dict[str, Any]:
    """The validation numbers a checkpoint records when a grader joins its network: the network's own (for the
    comparison) and the graded ones at the new threshold (:func:`classification_metrics` of each)."""
    return {
        "network_val_kappa": network["dr"]["quadratic_kappa"] or 0.0, "network_val_ref_auc": network["referable"]["auc"] or 0.0,
        "val_kappa": graded["dr"]["quadratic_kappa"] or 0.0, "val_ref_auc": graded["referable"]["auc"] or 0.0,
        "val_sensitivity": graded["referable"]["sensitivity"], "val_specificity": graded["referable"]["specificity"],
    }


def fit_grader_for_checkpoint(cfg: TrainingConfig, checkpoint: Path, output: Path, c: float = 1.0,
                              segmentation: bool = False) -> dict[str, Any]:
    """Fit the lesion-evidence grader on the checkpoint's training split, choose the referral threshold on
    its validation split, and write a checkpoint that carries both (the test split is not touched).
    ``segmentation``: the network's lesion maps join the image measurements as evidence."""
    device = resolve_device(cfg.train.device)
    model, meta = load_model(checkpoint, device)
    meta = {k: v for k, v in meta.items() if k != "grader"}
    size = model.config.image_size
    splits = _split(cfg, meta)
    train = [r for r in splits["train"] if r.has_grade or r.has_dme]
    seg_model = model if segmentation else None
    grader = fit_grader(_features(train, size, cfg.data.cache_dir, seg_model, device), np.array([r.dr_grade for r in train]),
                        np.array([r.dme_grade for r in train]), c)
    val = [r for r in splits["val"] if r.has_grade or r.has_dme]
    cnn = _pass(model, val, cfg, device, progress=False, seg_features=segmentation)
    dr, dme = apply_grader(grader, _grader_inputs(grader, val, size, cfg.data.cache_dir, cnn), cnn.dme_probs)
    target = float(meta["thresholds"].get("target_sensitivity", cfg.train.target_sensitivity))
    threshold = float(choose_threshold(referable_labels(cnn.dr_true, cnn.dme_true), referable_score(dr, dme), target))
    before = classification_metrics(cnn.dr_probs, cnn.dme_probs, cnn.dr_true, cnn.dme_true)
    after = classification_metrics(dr, dme, cnn.dr_true, cnn.dme_true, threshold)
    ckpt = read_checkpoint(checkpoint)
    ckpt.pop("referable_calibration", None)  # fitted on the heads' score, not on this grader's
    validation = dict(ckpt["metrics"].get("validation", {}))
    validation.update(_grader_validation(before, after))
    ckpt.update(
        grader=grader, model_version=ckpt["model_version"].split("+")[0] + ("+lesion-seg-lr" if segmentation else "+lesion-lr"),
        thresholds={**ckpt["thresholds"], "referable": threshold},
        metrics={**ckpt["metrics"], "validation": validation},
    )
    save_checkpoint(output, ckpt)
    return {"output": str(output), "threshold": threshold, "validation": validation}


def blend_grader_for_checkpoint(cfg: TrainingConfig, checkpoint: Path, grader_from: Path, output: Path,
                                heads_weight: float | None = None) -> dict[str, Any]:
    """An ensemble checkpoint: ``checkpoint``'s network (its DR/DME heads) with the lesion-evidence regression of
    ``grader_from``, blended as w x heads + (1 - w) x regression (:func:`grades_with_grader`). On the validation
    split: heads never calibrated (trained end to end, E8) are first temperature-scaled (:func:`temper_network`;
    E7's heads already were), then w (given, or :func:`choose_heads_weight`), then P(referable) recalibrated on the
    blend and the referral threshold chosen on that scale. The test split is not touched. The regression must have been fitted on
    photos outside this checkpoint's validation and test splits (``pin_split`` keeps v1's patients on their side)."""
    device = resolve_device(cfg.train.device)
    model, meta = load_model(checkpoint, device)
    if "grader" in meta:
        raise ValueError(f"{checkpoint} already carries a grader: blend from the network-only checkpoint")
    donor = read_checkpoint(grader_from)
    if "grader" not in donor:
        raise ValueError(f"{grader_from} carries no lesion-evidence grader (fit one with `dr-train fit-grader`)")
    grader = {k: v for k, v in donor["grader"].items() if k != "heads_weight"}
    val = [r for r in _split(cfg, meta)["val"] if r.has_grade or r.has_dme]
    heads = _pass(model, val, cfg, device, progress=False, seg_features=uses_segmentation(grader))
    ckpt = read_checkpoint(checkpoint)
    provenance = dict(ckpt["provenance"])
    if "calibration" not in provenance:  # heads trained end to end (E8): temperature-scale them first, as E7's were
        dr_t, dme_t, temps = temper_network(model, heads.dr_probs, heads.dme_probs, heads.dr_true, heads.dme_true)
        heads = dataclasses.replace(heads, dr_probs=dr_t, dme_probs=dme_t)
        provenance["calibration"] = {**temps, "fitted_by": "blend-grader, on the validation split"}
        tempered = model.state_dict()
        ckpt["model_state"] = {k: (tempered[k].to(v.dtype) if k.startswith(("dr_head.", "dme_head.")) else v)
                               for k, v in ckpt["model_state"].items()}
    reg_dr, reg_dme = apply_grader(grader, _grader_inputs(grader, val, model.config.image_size, cfg.data.cache_dir, heads),
                                   heads.dme_probs)
    y_ref = referable_labels(heads.dr_true, heads.dme_true, dme_unknown_as_absent=True)
    choices: list[float] = []
    if heads_weight is None:
        heads_weight, choices = choose_heads_weight((heads.dr_probs, heads.dme_probs), (reg_dr, reg_dme), y_ref,
                                                    np.array([r.source for r in val]), np.array([r.patient_id for r in val]))
    if not 0.0 < heads_weight < 1.0:
        raise ValueError(f"--heads-weight must be between 0 and 1 (exclusive), got {heads_weight}")
    grader["heads_weight"] = float(heads_weight)
    dr, dme = blend((heads.dr_probs, heads.dme_probs), (reg_dr, reg_dme), heads_weight)  # as grades_with_grader does
    calibration = fit_referable_calibration(y_ref, referable_score(dr, dme))
    target = float(meta["thresholds"].get("target_sensitivity", cfg.train.target_sensitivity))
    threshold = float(choose_threshold(y_ref, calibrated_referable(dr, dme, calibration), target))
    network = classification_metrics(heads.dr_probs, heads.dme_probs, heads.dr_true, heads.dme_true,
                                     dme_unknown_as_absent=True, referable_calibration=meta.get("referable_calibration"))
    after = classification_metrics(dr, dme, heads.dr_true, heads.dme_true, threshold, dme_unknown_as_absent=True,
                                   referable_calibration=calibration)
    validation = dict(ckpt["metrics"].get("validation", {}))
    validation.update({
        **_grader_validation(network, after), "val_dr_acc": after["dr"]["accuracy"] or 0.0,
        # in-sample (the map was fitted on these photos); the test split measures it honestly
        "val_ece_referable": expected_calibration_error(y_ref, calibrated_referable(dr, dme, calibration)) or 0.0,
    })
    provenance["grader"] = {"from": str(grader_from), "sha256": file_sha256(grader_from),
                            "model_version": donor.get("model_version"), "heads_weight": heads_weight,
                            "fold_choices": choices, "rule": "median over 5 patient-grouped folds of the weight with "
                            "the best mean per-source referable AUC (validation split)" if choices else "given"}
    ckpt.update(
        grader=grader, referable_calibration=calibration, provenance=provenance,
        model_version=f"{ckpt['model_version'].split('+')[0]}+blend-lesion-lr-{heads_weight:.1f}",
        thresholds={**ckpt["thresholds"], "referable": threshold},
        metrics={**ckpt["metrics"], "validation": {k: float(v) for k, v in validation.items() if v is not None}},
    )
    save_checkpoint(output, ckpt)
    return {"output": str(output), "heads_weight": heads_weight, "fold_choices": choices, "threshold": threshold,
            "calibration": calibration, "validation": validation}


def evaluate_checkpoint(
    cfg: TrainingConfig, checkpoint: Path, split: str = "val", out_dir: Path | None = None,
    tta: bool = False, bootstrap: int = 1000, progress: bool = True,
) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    model, meta = load_model(checkpoint, device)
    recs = _split(cfg, meta)[split]
    if not recs:
        sp = meta["provenance"].get("split", {})
        fractions = (f"the checkpoint's recorded split (val_fraction {sp.get('val_fraction')}, test_fraction "
                     f"{sp.get('test_fraction')}) applies, not the config's" if sp.get("val_fraction") is not None
                     else "check [data] val_fraction/test_fraction")
        raise ValueError(f"split {split!r} is empty: {fractions}")
    check_unseen(meta, split, recs, checkpoint)
    preds = _predict(model, meta, recs, cfg, device, tta, progress)
    out_dir = out_dir or checkpoint.parent / f"eval-{split}{'-tta' if tta else ''}"
    metrics = write_evaluation(
        out_dir, preds.dr_probs, preds.dme_probs, preds.dr_true, preds.dme_true,
        preds.seg_probs, preds.seg_masks, threshold=float(meta["thresholds"]["referable"]),
        target_sensitivity=float(meta["thresholds"].get("target_sensitivity", 0.9)), bootstrap=bootstrap,
        referable_calibration=meta.get("referable_calibration"),
    )
    threshold = float(meta["thresholds"]["referable"])
    calibration = meta.get("referable_calibration")
    clinical = clinical_evaluation(preds.dr_probs, preds.dme_probs, preds.dr_true, preds.dme_true,
                                   [r.patient_id for r in recs], [r.source for r in recs], threshold, bootstrap,
                                   referable_calibration=calibration)
    plot_reliability(referable_labels(preds.dr_true, preds.dme_true, dme_unknown_as_absent=True),
                     calibrated_referable(preds.dr_probs, preds.dme_probs, calibration), out_dir / RELIABILITY_PNG)
    metrics["clinical"] = clinical
    metrics["plots"]["referable_reliability"] = RELIABILITY_PNG
    # what was evaluated: `dr-train export --test-metrics` stores only a test split's numbers of the same model
    metrics["evaluated"] = {"split": split, "model_version": meta["model_version"], "checkpoint": checkpoint.name,
                            # from what load_model read already: the file is neither hashed nor read again
                            "checkpoint_sha256": meta["checkpoint_sha256"],
                            "content_digest": content_digest({**meta, "model_state": model.state_dict()}),
                            "images": len(recs), "tta": tta}
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    seg = metrics.get("segmentation") or {}
    summary = {
        "checkpoint": str(checkpoint), "model_version": meta["model_version"], "split": split, "images": len(recs),
        "tta": tta, "images_per_s": round(preds.images_per_s, 2),
        "dr_kappa": metrics["dr"].get("quadratic_kappa"),
        "dr_kappa_ci95": metrics["dr"].get("quadratic_kappa_ci95"),
        "dr_accuracy": metrics["dr"].get("accuracy"),
        "referable": {k: v for k, v in metrics["referable"].items() if not k.endswith("_reason")},
        "lesion_aupr": {k: (v or {}).get("aupr") for k, v in seg.items()} if seg else None,
        "od_dice": (seg.get("OD") or {}).get("dice") if seg else None,
        "table": clinical_table(clinical),
    }
    return {"summary": summary, "metrics": metrics, "out_dir": out_dir}


def _fmt(block: dict[str, Any]) -> str:
    v, ci = block.get("value"), block.get("ci95")
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci and ci[0] is not None else "")


def clinical_table(clinical: dict[str, Any]) -> list[str]:
    """Markdown rows (overall, then per source) of the headline numbers with their 95% intervals."""
    rows = ["| source | images / patients | eye referable AUC | eye sens | eye spec | patient sens | patient spec "
            "| DR kappa | DR acc | DME present AUC | DME 0/1/2 acc | ECE |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in [("overall", clinical["overall"]), *clinical["by_source"].items()]:
        rows.append(
            f"| {name} | {b['images']} / {b['patients']} | {_fmt(b['eye']['auc'])} | {_fmt(b['eye']['sensitivity'])} "
            f"| {_fmt(b['eye']['specificity'])} | {_fmt(b['patient']['sensitivity'])} | {_fmt(b['patient']['specificity'])} "
            f"| {_fmt(b['dr']['kappa'])} | {_fmt(b['dr']['accuracy'])} | {_fmt(b['dme']['present_auc'])} "
            f"| {_fmt(b['dme']['exact_accuracy'])} | {_fmt(b['eye']['ece'])} |")
    return rows

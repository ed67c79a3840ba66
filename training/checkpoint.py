"""Checkpoints as plain dicts that load with ``torch.load(..., weights_only=True)``.

A checkpoint carries everything the worker needs to rebuild and describe the model:
``model_state``, ``model_config`` (backbone, input size, normalisation...), ``labels``,
``thresholds`` (the referral operating point, on the scale of ``referable_calibration`` when the
checkpoint has that map of P(referable)), ``provenance`` (data summary, synthetic or real,
command, date, git commit) and ``metrics`` (validation). Training checkpoints also carry
``optimizer_state``, ``scheduler_state``, ``epoch``, ``best_score`` and ``history`` for resuming.
"""

from __future__ import annotations

import pickle
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from training.common import atomic_write, sha256_file
from training.model import DME_GRADES, DR_GRADES, LESION_CODES, ModelConfig, MultiTaskNet, build_model

REQUIRED_KEYS = ("model_state", "model_config", "labels", "thresholds", "provenance", "metrics", "model_version")
MODEL_KINDS = ("real", "synthetic")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or lacks the metadata the product requires."""


def labels_dict() -> dict[str, list[str]]:
    return {"dr": list(DR_GRADES), "dme": list(DME_GRADES), "lesions": list(LESION_CODES)}


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_version(model_config: ModelConfig, kind: str, when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    return f"drnet-{model_config.backbone}-{model_config.image_size}-{kind}-{when:%Y%m%d%H%M}"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomic save (:func:`training.common.atomic_write`): a reader, or a resumed run, never finds half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


file_sha256 = sha256_file
"""The checkpoint file's SHA-256 (the one hashing function, :func:`training.common.sha256_file`)."""


def _load_plain(path: Path, error: type[CheckpointError], what: str, remedy: str) -> Any:
    """``torch.load`` of tensors and plain data only, every failure as ``error`` naming ``path`` and the ``remedy``.

    torch's own message advises loading with weights_only=False, which would run whatever code the file holds:
    it is never quoted to someone holding a file of unknown origin."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a reference to code: damaged, or not a pickle at all
            raise error(f"{path}: not a loadable {what} (not a PyTorch file, or damaged). {remedy}") from None
        raise error(f"{path}: refused: it holds Python objects other than tensors and plain data, and loading those "
                    f"could run code. {remedy}, or use a file from a source you trust") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to read is the same user error
        raise error(f"{path}: not a loadable {what} ({type(exc).__name__}); it may be damaged or not a PyTorch file. "
                    f"{remedy}") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train one with `dr-train train` or set [screening] checkpoint)")
    ckpt = _load_plain(path, CheckpointError, "checkpoint", "Export it again with `dr-train export`")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def load_fitted(path: Path, *, what: str, command: str, setting: str, error: type[CheckpointError]) -> object:
    """Read a small fitted model file (``dr-train fit-quality``, ``fit-laterality``): ``error`` when it is missing, naming
    the ``command`` that fits one and the ``[screening] setting`` that points at it, or when it does not load. The
    caller checks what it holds."""
    if not path.is_file():
        raise error(f"{what} model not found: {path}; fit one with `dr-train {command} --output {path}` "
                    f"or set [screening] {setting}")
    return _load_plain(path, error, f"{what} model", f"Fit it again with `dr-train {command} --output {path}`")


def validate_metadata(ckpt: dict[str, Any], path: str | Path) -> None:
    """The worker refuses checkpoints that cannot say what they are."""
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks required metadata {missing}; export it with `dr-train export` "
            "from a training run (it records config, labels, threshold, provenance and metrics)"
        )
    kind = ckpt["provenance"].get("kind")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: provenance.kind must be one of {MODEL_KINDS}, got {kind!r}")
    if "referable" not in ckpt["thresholds"]:
        raise CheckpointError(f"{path}: thresholds.referable (the referral operating point) is missing")
    grader = ckpt.get("grader")
    if isinstance(grader, dict) and "heads_weight" in grader:
        w = grader["heads_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) < 1.0:
            raise CheckpointError(f"{path}: grader.heads_weight (the network heads' share of a blended grade) must be a "
                                  f"number in [0, 1), got {w!r}; rebuild it with `dr-train blend-grader`")
    cal = ckpt.get("referable_calibration")
    if cal is not None:
        ok = (isinstance(cal, dict) and cal.get("method") == "platt"
              and all(isinstance(cal.get(k), (int, float)) for k in ("slope", "intercept")) and cal["slope"] > 0)
        if not ok:
            raise CheckpointError(f"{path}: referable_calibration must be {{'method': 'platt', 'slope': > 0, "
                                  f"'intercept': number}}, got {cal!r}; refit it with `dr-train grade-heads`")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiTaskNet, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config; returns (model in eval mode, metadata)."""
    ckpt = read_checkpoint(path)
    validate_metadata(ckpt, path)
    config = ModelConfig.from_dict(ckpt["model_config"])
    model = build_model(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match its model_config: {exc}") from None
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model_state", "optimizer_state", "scheduler_state")}
    meta["checkpoint_sha256"] = file_sha256(path)
    return model, meta


def test_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an evaluation's metrics.json, for the checkpoint and the report."""
    ref, dr = metrics.get("referable", {}), metrics.get("dr", {})
    out: dict[str, Any] = {
        "referable AUC": ref.get("auc"), "referable AUC 95% CI": ref.get("auc_ci95"),
        "sensitivity": ref.get("sensitivity"), "specificity": ref.get("specificity"),
        "DR kappa": dr.get("quadratic_kappa"), "images": metrics.get("n_samples"),
    }
    for code, seg in (metrics.get("segmentation") or {}).items():
        if seg:
            out[f"{code} AUPR"] = seg.get("aupr")
    od = (metrics.get("segmentation") or {}).get("OD") or {}
    out["OD Dice"] = od.get("dice")
    clinical = metrics.get("clinical")
    if clinical:  # v2 evaluations: per-source, per-patient numbers with patient-bootstrap intervals
        overall = _clinical_summary(clinical["overall"])
        out.update({"referable AUC": overall["eye AUC"], "referable AUC 95% CI": overall.get("eye AUC 95% CI"),
                    "sensitivity": overall["eye sensitivity"], "specificity": overall["eye specificity"],
                    "DR kappa": overall["DR kappa"]})
        out["overall"] = overall
        out["by_source"] = {name: _clinical_summary(block) for name, block in clinical["by_source"].items()}
        out["referable definition"] = clinical.get("referable_definition")
    return {k: v for k, v in out.items() if v is not None}


def _clinical_summary(block: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{"eye AUC": v, "eye AUC 95% CI": [lo, hi], ...}`` of one :func:`clinical_evaluation` block."""
    items = {
        "eye AUC": block["eye"]["auc"], "eye sensitivity": block["eye"]["sensitivity"],
        "eye specificity": block["eye"]["specificity"], "ECE": block["eye"]["ece"],
        "patient AUC": block["patient"]["auc"], "patient sensitivity": block["patient"]["sensitivity"],
        "patient specificity": block["patient"]["specificity"], "DR kappa": block["dr"]["kappa"],
        "DR accuracy": block["dr"]["accuracy"], "DME present AUC": block["dme"]["present_auc"],
        "DME 0/1/2 accuracy": block["dme"]["exact_accuracy"],
    }
    out: dict[str, Any] = {"images": block["images"], "patients": block["patients"]}
    for name, value in items.items():
        out[name] = value["value"]
        if value.get("ci95"):
            out[f"{name} 95% CI"] = value["ci95"]
    return out


def content_digest(ckpt: dict[str, Any]) -> str:
    """What makes a checkpoint's answers, hashed: its weights (as float16, so a shipped half-precision export and its
    float32 source agree), its grader and its referral operating point. Two blends of one base with different
    graders share a model version; they differ here."""
    import hashlib

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            t = t.half() if t.is_floating_point() else t
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                h.update(str(k).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    feed(ckpt["model_state"])
    feed(ckpt.get("grader"))
    feed(ckpt.get("referable_calibration"))
    feed(float(ckpt["thresholds"]["referable"]))
    return h.hexdigest()[:16]


def check_test_metrics(metrics: dict[str, Any], ckpt: dict[str, Any], src: str | Path) -> None:
    """Refuse to store ``metrics`` as ``src``'s test metrics unless an evaluation of the test split of the same
    model wrote them (``metrics["evaluated"]``, by ``dr-train evaluate``): any JSON was taken, a validation run's
    or another model's numbers would have reached the reports as this model's test figures."""
    done = metrics.get("evaluated") if isinstance(metrics, dict) else None
    if not isinstance(done, dict):
        raise CheckpointError("--test-metrics: not the metrics.json of a `dr-train evaluate` run (it records what it "
                              "evaluated; files written before it did must be made again): run `dr-train evaluate "
                              f"--checkpoint {src} --split test` and pass its metrics.json")
    if done.get("split") != "test":
        raise CheckpointError(f"--test-metrics: that evaluation was of the {done.get('split')!r} split; only the test "
                              "split's numbers are stored as the model's test metrics")
    if done.get("model_version") != ckpt.get("model_version") or done.get("content_digest") != content_digest(ckpt):
        raise CheckpointError(f"--test-metrics: that evaluation was of another model ({done.get('model_version')!r}, "
                              f"content {done.get('content_digest')!r}) than {src} ({ckpt.get('model_version')!r}, "
                              f"content {content_digest(ckpt)!r}): evaluate this checkpoint, or its float16 export")


def export_checkpoint(src: str | Path, dst: str | Path, half: bool = True, test_metrics: dict[str, Any] | None = None) -> Path:
    """Strip optimizer/scheduler state (and optionally store weights in float16) for shipping.

    ``test_metrics`` (an evaluation's metrics.json on the held-out test split) is summarised into
    ``metrics["test"]`` so the worker's reports can show it."""
    ckpt = read_checkpoint(src)
    validate_metadata(ckpt, src)
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer_state", "scheduler_state", "history", "torch_rng")}
    if test_metrics is not None:
        check_test_metrics(test_metrics, ckpt, src)
        out["metrics"] = {**ckpt["metrics"], "test": test_summary(test_metrics)}
    if half:
        out["model_state"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}
    return save_checkpoint(dst, out)

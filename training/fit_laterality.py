"""``dr-train fit-laterality``: fit the laterality model (:mod:`training.laterality`) and
measure it.

Photos: every record of the configured sources that names its eye (srahim, EyePACS), split by patient with the
configured split. The landmarks of each photo are found once and cached (``<cache_dir>/laterality/landmarks.npz``).
The :data:`~training.laterality.PARAMETERS` maximise the likelihood of the stated eyes on ``train``; the
confidence threshold (``confident``: below it the model abstains: a photo's eye is not taken from the image, a
disagreement with the name is not flagged as a mismatch, and the report says "eye not confirmed") is the lowest at
which ``target_accuracy`` of the confident photos of ``train`` and ``val`` together are right (six fitted numbers
barely overfit, and ``val`` alone, 160 photos, moved the threshold from 0.63 to 0.9 between draws); ``test`` gives
the numbers for MODEL_CARD.md, with patient-bootstrap 95 % intervals, per source, with the abstention share, and
the errors sorted by what the landmarks say (:func:`error_kinds`).

With ``--chirality-epochs N`` (format 3, E12) the chirality network (:mod:`training.chirality`) is trained too, on
the named ``train`` photos and on the unnamed photos of sources whose cameras show upright photos
(``--upright-source``, their ``train`` and ``val`` photos: the disc's side is then the eye), its encoder started from
a grading checkpoint (``--init``). The network has seen ``train``, so its weight beside the landmarks
(:func:`fit_weights`) and the confidence threshold come from ``val`` alone. Its run is checkpointed every epoch in
``<cache_dir>/laterality/`` and resumed exactly when the command is run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.common import atomic_write, atomic_write_text, sha256_file
from training.config import TrainingConfig
from training.data.records import Record
from training.data.transforms import crop_square, resize_square
from training.fit_quality import read_photo
from training.laterality import (
    PARAMETERS,
    SIDE,
    TILT_RANGE,
    Orientation,
    combine,
    landmarks,
    log_odds,
    pack_model,
    probability_right,
)

LANDMARKS_VERSION = "2"
COLUMNS = ("disc_offset", "tilt", "fovea_depth", "has_fovea")


def measure_records(records: Sequence[Record], cache_path: Path) -> np.ndarray:
    """(N, 4) disc offset, tilt, fovea depth and whether a fovea was found (:data:`COLUMNS`) per record, cached by
    file."""
    version = hashlib.sha256((LANDMARKS_VERSION + Path(__file__).name).encode()).hexdigest()[:12]
    cached: dict[str, np.ndarray] = {}
    if cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as data:
            if str(data["version"]) == version:
                cached = {str(k): v for k, v in zip(data["keys"], data["values"])}
    out = np.zeros((len(records), len(COLUMNS)))
    new = 0
    for i, rec in enumerate(records):
        key = str(rec.image.resolve())
        if key not in cached:
            lm = landmarks(resize_square(crop_square(read_photo(rec.image)), SIDE))
            cached[key] = np.array([lm.disc_offset, lm.tilt, lm.fovea_depth, float(lm.fovea is not None)])
            new += 1
        out[i] = cached[key]
    if new:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(cached))
        values = np.stack([cached[k] for k in keys])

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, version=np.array(version), keys=keys, values=values)

        atomic_write(cache_path, write, durable=False)
    return out


def _probability(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """P(right eye) of :func:`training.laterality.probability_right`, in torch for fitting. ``params``: side gain,
    tilt mean, log tilt sd, miss bias, miss depth gain, logit of the upright prior."""
    p_side = torch.sigmoid(params[0] * x[:, 0])
    sd = torch.exp(params[2])
    miss = torch.sigmoid(params[3] - params[4] * x[:, 2])
    miss = torch.where(x[:, 3] > 0, miss, torch.ones_like(miss))  # no fovea found: the tilt says nothing

    def normal(t: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * ((t - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    up = (1 - miss) * normal(x[:, 1], params[1]) + miss / TILT_RANGE
    inv = (1 - miss) * normal(x[:, 1], -params[1]) + miss / TILT_RANGE
    prior = torch.sigmoid(params[5])
    p_up = prior * up / (prior * up + (1 - prior) * inv)
    return p_side * p_up + (1 - p_side) * (1 - p_up)


def fit_parameters(x: np.ndarray, right: np.ndarray) -> dict[str, float]:
    """Maximum-likelihood :data:`~training.laterality.PARAMETERS` for (N, 4) measurements (:data:`COLUMNS`) and 0/1
    right eyes, started from anatomy (disc right = right eye; fovea ~8 degrees below the disc, sd 4)."""
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(right, dtype=torch.float64)
    params = torch.tensor([8.0, 8.0, math.log(4.0), 0.0, 10.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([params], lr=0.03)
    for _ in range(4000):  # six parameters, a few hundred photos: seconds on a CPU
        p = _probability(params, xt).clamp(1e-6, 1 - 1e-6)
        loss = -(yt * p.log() + (1 - yt) * (1 - p).log()).mean() + 1e-5 * (params ** 2).sum()
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    side, mean, log_sd, miss_bias, miss_gain, logit_prior = (float(v) for v in params.detach())
    prior = 1 / (1 + math.exp(-logit_prior))
    if side < 0:  # flipping the side gain and the orientation gives the same likelihood: keep anatomy's sign
        side, prior = -side, 1 - prior
    if mean < 0:  # a negative mean is "upright" and "inverted" swapped
        mean, prior = -mean, 1 - prior
    return dict(zip(PARAMETERS, (side, mean, math.exp(log_sd), miss_bias, miss_gain, prior)))


def _probabilities(model: dict[str, Any], x: np.ndarray, orientation: str, cnn: np.ndarray | None = None) -> np.ndarray:
    """P(right eye) per photo; ``cnn``: the chirality network's logits, joined in ``detect`` mode as
    :func:`training.laterality.predict` joins them."""
    mode: Orientation = "upright" if orientation == "upright" else "detect"
    p = np.array([probability_right(model, float(o), float(t), mode, float(d), bool(f))[0] for o, t, d, f in x])
    if cnn is not None and mode == "detect" and "chirality_weight" in model:
        p = np.array([combine(model, float(a), float(c)) for a, c in zip(p, cnn)])
    return p


def _predictions(model: dict[str, Any], x: np.ndarray, orientation: str,
                 cnn: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(right eye?, confidence) per photo (:func:`_probabilities`)."""
    p = _probabilities(model, x, orientation, cnn)
    return p >= 0.5, np.maximum(p, 1 - p)


def error_kinds(model: dict[str, Any], x: np.ndarray, right: np.ndarray, cnn: np.ndarray | None = None) -> dict[str, int]:
    """The wrong answers (``detect``) by what the landmarks say went wrong: the disc lies on the side that fits the
    stated eye but the photo was judged inverted (``upright_read_as_inverted``); the disc lies on the other side and
    the fovea above it, so the photo is inverted (rotated 180 degrees: the EyePACS quirk) but was judged upright
    (``inverted_read_as_upright``); the disc lies on the other side and the fovea below it or nowhere: a mirrored
    photo, a wrong label or a wrongly found disc, which no orientation cue fixes (``disc_side_wrong``)."""
    pred, _ = _predictions(model, x, "detect", cnn)
    out = {"upright_read_as_inverted": 0, "inverted_read_as_upright": 0, "disc_side_wrong": 0}
    for (offset, tilt, _, has_fovea), p, r in zip(x, pred, right.astype(bool)):
        if p == r:
            continue
        if (offset > 0) == r:
            out["upright_read_as_inverted"] += 1
        elif has_fovea and tilt < 0:
            out["inverted_read_as_upright"] += 1
        else:
            out["disc_side_wrong"] += 1
    return out


def choose_confident(x: np.ndarray, right: np.ndarray, model: dict[str, Any], target_accuracy: float,
                     cnn: np.ndarray | None = None) -> float:
    """The lowest confidence at which ``target_accuracy`` of the photos at or above it are right (0.95 when no level
    reaches it: the metrics then show the accuracy it has)."""
    pred, conf = _predictions(model, x, "detect", cnn)
    ok = pred == right.astype(bool)
    for t in np.arange(0.6, 0.995, 0.01):
        keep = conf >= t
        if keep.sum() >= 20 and ok[keep].mean() >= target_accuracy:
            return float(round(t, 2))
    return 0.95


def evaluate(model: dict[str, Any], x: np.ndarray, records: Sequence[Record], n_boot: int = 1000,
             cnn: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy (every photo, both orientation modes) and the confident photos' coverage and accuracy, overall
    and per source, with patient-bootstrap 95 % intervals."""
    from training.metrics import grouped_bootstrap_ci

    right = np.array([r.eye == "R" for r in records])
    sources = np.array([r.source for r in records])
    patients = np.array([f"{r.source}|{r.patient_id}" for r in records])

    def block(mask: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"photos": int(mask.sum()), "patients": int(len(set(patients[mask])))}
        for orientation in ("detect", "upright"):
            p = _probabilities(model, x[mask], orientation, None if cnn is None else cnn[mask])
            pred, conf = p >= 0.5, np.maximum(p, 1 - p)
            ok = (pred == right[mask]).astype(float)
            ci = grouped_bootstrap_ci(lambda v: float(np.mean(v)), patients[mask], ok, n_boot=n_boot)
            keep = conf >= float(model["confident"])
            q = np.clip(np.where(right[mask], p, 1 - p), 1e-6, 1.0)  # the probability given to the stated eye
            entry: dict[str, Any] = {"accuracy": float(ok.mean()), "accuracy_ci95": list(ci),
                                     "log_loss": float(-np.log(q).mean()),
                                     "confident_coverage": float(keep.mean()), "abstained": float(1 - keep.mean())}
            if keep.any():
                ci_k = grouped_bootstrap_ci(lambda v: float(np.mean(v)), patients[mask][keep], ok[keep], n_boot=n_boot)
                entry.update(confident_accuracy=float(ok[keep].mean()), confident_accuracy_ci95=list(ci_k))
            out[orientation] = entry
        # photos whose disc lies on the side that does not fit their stated eye: inverted or mirrored by the camera
        # (or wrongly labelled, or the disc wrongly found): the EyePACS quirk, counted, never dropped
        out["disc_side_contradicts_label"] = int(((x[mask][:, 0] > 0) != right[mask]).sum())
        out["errors"] = error_kinds(model, x[mask], right[mask], None if cnn is None else cnn[mask])
        return out

    result = {"all": block(np.ones(len(records), bool))}
    for src in sorted(set(sources)):
        result[src] = block(sources == src)
    return result


CHIRALITY_VERSION = "1"  # bump when the stored photos' preprocessing or the training recipe changes


def _digest(records: Sequence[Record], *extra: str) -> str:
    """A cache key over the files (path, size and modification time: a photo replaced under the same name is new)
    and ``extra`` (what else decides the content)."""
    def stamp(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    return hashlib.sha256("\n".join([CHIRALITY_VERSION, *extra, *(stamp(r.image) for r in records)]).encode()).hexdigest()[:16]


PSEUDO_MARGIN = 0.15  # disc offset (field radii) beyond which the disc's side names the eye of an upright photo


def stored_photos(records: Sequence[Record], cache_dir: Path, store: int | None = None) -> np.ndarray:
    """(N, store, store, 3) uint8: each record as the chirality network stores it
    (:func:`training.chirality.chirality_input`; ``store`` px, by default its ``STORE``), cached as one array per
    list of files and size (memory-mapped)."""
    from training.chirality import STORE, chirality_input

    store = STORE if store is None else store
    path = cache_dir / f"chirality-photos-{_digest(records, str(store))}.npy"
    if not path.is_file():
        photos = np.zeros((len(records), store, store, 3), np.uint8)
        for i, rec in enumerate(records):
            photos[i] = chirality_input(crop_square(read_photo(rec.image)), store)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, photos)

        atomic_write(path, write, durable=False)
    stored: np.ndarray = np.load(path, mmap_mode="r")
    return stored


def pseudo_labelled(records: Sequence[Record], upright_sources: Sequence[str], cache: Path) -> tuple[list[Record], np.ndarray]:
    """Records of sources whose cameras show upright photos and which do not name the eye, with the eye the disc's
    side gives (1 = right), kept where the disc is clearly off-centre (:data:`PSEUDO_MARGIN`)."""
    pool = [r for r in records if r.eye not in ("L", "R") and r.source in upright_sources]
    if not pool:
        return [], np.zeros(0)
    offset = measure_records(pool, cache)[:, 0]
    keep = np.abs(offset) >= PSEUDO_MARGIN
    return [r for r, k in zip(pool, keep) if k], (offset[keep] > 0).astype(np.float32)


def fit_weights(p_landmarks: np.ndarray, cnn: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """The (landmark, chirality) weights of :func:`training.laterality.combine`: a logistic regression without
    intercept on the two log-odds (the network is fitted on train, so these come from the validation split)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(right.astype(int).tolist())) < 2:
        raise ValueError("the validation split's named photos are all of one eye, so the network's weight beside the "
                         "landmarks cannot be fitted; add sources that name both eyes, or change [data] split_seed")
    fit = LogisticRegression(fit_intercept=False, C=1.0).fit(np.c_[log_odds(p_landmarks), cnn], right.astype(int))
    a, b = (float(v) for v in fit.coef_[0])
    return a, b


def fit_laterality(cfg: TrainingConfig, output: Path, target_accuracy: float = 0.97, *, chirality_epochs: int = 0,
                   upright_sources: Sequence[str] = (), init: Path | None = None, chirality_networks: int = 1,
                   log: Any = print) -> dict[str, Any]:
    """Fit on train, choose the confidence threshold on val, evaluate on test; write ``output`` and
    ``<output stem>.metrics.json``. Returns the metrics.

    ``chirality_epochs`` > 0 also trains the chirality network (:mod:`training.chirality`) on the train split's
    named photos and on the ``upright_sources``' train and validation photos (eye = the disc's side; their test
    photos are never read), its encoder started from ``init`` (a grading checkpoint) when given; its weight beside
    the landmarks and the confidence threshold are then chosen on the validation split alone. ``chirality_networks``
    > 1 trains that many alike from seeds 0, 1, ... (each its own checkpoint) and joins their mean logit (E13)."""
    from training.data.sources import load_all
    from training.data.split import configured_split

    if chirality_networks < 1:
        raise ValueError(f"--chirality-networks {chirality_networks}: give 1 or more")
    if chirality_networks > 1 and chirality_epochs <= 0:
        raise ValueError("--chirality-networks N > 1 trains several chirality networks, which needs --chirality-epochs "
                         "N (N > 0); add it, or drop --chirality-networks")
    t0 = time.monotonic()
    split = configured_split(cfg.data, load_all(cfg.data))
    named = {side: [r for r in recs if r.eye in ("L", "R")] for side, recs in split.items()}
    if not named["train"] or not named["val"] or not named["test"]:
        raise ValueError("no photos that name their eye in one of the splits; list sources with an 'eye' column "
                         "(srahim, EyePACS) in [data] sources")
    if upright_sources and chirality_epochs <= 0:
        raise ValueError("--upright-source teaches the chirality network, which is trained only with --chirality-epochs "
                         "N (N > 0); add it, or drop --upright-source")
    unknown = sorted(set(upright_sources) - {r.source for recs in split.values() for r in recs})
    if unknown:
        raise ValueError(f"--upright-source {unknown}: no such source in [data] sources (they are "
                         f"{sorted({r.source for recs in split.values() for r in recs})})")
    cache = Path(cfg.data.cache_dir).parent / "laterality" / "landmarks.npz"
    x = {side: measure_records(recs, cache) for side, recs in named.items()}
    y = {side: np.array([r.eye == "R" for r in recs], float) for side, recs in named.items()}
    params = fit_parameters(x["train"], y["train"])
    provisional = pack_model(params, 0.5, {}, {})
    cnn: dict[str, np.ndarray | None] = {"val": None, "test": None}
    chirality: dict[str, Any] | None = None
    weights = (1.0, 1.0)
    extra: dict[str, Any] = {}
    if chirality_epochs > 0:
        from training.checkpoint import load_model
        from training.chirality import ChiralityEnsemble, chirality_logits, fit_chirality, pack_net

        pseudo, pseudo_y = pseudo_labelled([*split["train"], *split["val"]], upright_sources, cache)
        train_records = [*named["train"], *pseudo]
        labels = np.r_[y["train"], pseudo_y].astype(np.float32)
        photos = stored_photos(train_records, cache.parent)
        encoder_state, backbone = None, "resnet18"
        if init is not None:
            grading, ckpt = load_model(init)
            encoder_state, backbone = grading.encoder.state_dict(), str(ckpt["model_config"]["backbone"])
        init_id = sha256_file(init) if init is not None else "random"
        val_photos = stored_photos(named["val"], cache.parent)

        def progress(epoch: int, loss: float, net: Any) -> None:
            alone = float(((chirality_logits(net, val_photos) > 0) == (y["val"] > 0)).mean())
            log(f"  epoch {epoch}: loss {loss:.4f}, the network alone right on {alone:.1%} of the validation photos")

        nets = []
        for seed in range(chirality_networks):
            # seed 0 has a single network's key (the key since 1a0f690), so a finished single-network run is reused
            key = _digest(train_records, str(chirality_epochs), init_id, backbone, *([f"seed{seed}"] if seed else []))
            run = cache.parent / f"chirality-run-{key}.pt"
            log(f"chirality network {seed + 1} of {chirality_networks} (seed {seed}): {len(named['train'])} named and "
                f"{len(pseudo)} upright photos, {chirality_epochs} epochs (checkpoint {run}, resumed if present)")
            nets.append(fit_chirality(photos, labels, epochs=chirality_epochs, checkpoint=run, encoder_state=encoder_state,
                                      backbone=backbone, batch=min(32, len(labels)), seed=seed, on_epoch=progress))
        net = nets[0] if len(nets) == 1 else ChiralityEnsemble(nets)
        val_logits = chirality_logits(net, val_photos)
        if len(nets) > 1:
            log(f"  the {len(nets)} networks' mean right on "
                f"{float(((val_logits > 0) == (y['val'] > 0)).mean()):.1%} of the validation photos")
        cnn["val"], cnn["test"] = val_logits, chirality_logits(net, stored_photos(named["test"], cache.parent))
        p_val = _probabilities(provisional, x["val"], "detect")
        weights = fit_weights(p_val, val_logits, y["val"])
        chirality = pack_net(net)
        extra = {"chirality_photos": {"named": len(named["train"]), "upright": len(pseudo)},
                 "chirality_epochs": chirality_epochs, "chirality_networks": chirality_networks, "upright_sources": sorted(upright_sources),
                 "init": str(init) if init is not None else None, "weights": list(weights)}
        provisional = pack_model(params, 0.5, {}, {}, chirality, weights)
        confident = choose_confident(x["val"], y["val"], provisional, target_accuracy, cnn["val"])
    else:
        confident = choose_confident(np.r_[x["train"], x["val"]], np.r_[y["train"], y["val"]], provisional, target_accuracy)
    model = pack_model(params, confident, {}, {}, chirality, weights)
    metrics = {side: evaluate(model, x[side], named[side], cnn=cnn[side]) for side in ("val", "test")}
    metrics["photos"] = {side: len(recs) for side, recs in named.items()}
    model["metrics"] = {"test": metrics["test"]["all"], "val": metrics["val"]["all"]}
    model["provenance"] = {
        "kind": "real", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": sorted({r.source for recs in named.values() for r in recs}), "split_seed": cfg.data.split_seed,
        "target_accuracy": target_accuracy, "seconds": round(time.monotonic() - t0, 1), **extra,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: torch.save(model, tmp))
    atomic_write_text(output.with_suffix(".metrics.json"), json.dumps(metrics, indent=1) + "\n")
    return metrics


__all__ = ["COLUMNS", "PSEUDO_MARGIN", "choose_confident", "error_kinds", "evaluate", "fit_laterality", "fit_parameters",
           "fit_weights", "measure_records", "pseudo_labelled", "stored_photos"]

"""``dr-train fit-quality``: fit the gradability model (:mod:`training.quality`) and choose its thresholds.

The samples, per real photo of the configured sources (at most ``per_source`` photos of each, drawn with the seed):

* the photo itself: gradable;
* one *mild* degradation (:mod:`training.degrade`): still gradable;
* two different *severe* degradations: ungradable, each with its reason;
* one non-fundus picture (generated, or this photo transformed beyond recognition): ``not_fundus``.

Photos are split by patient with the configured split (:func:`training.data.split.configured_split`), so a
photo, its degradations and its patient's other eye stay on one side. The network is fitted on ``train``;
the per-reason thresholds are chosen on ``val`` (:func:`choose_thresholds`): every non-fundus picture caught, and at
most ``target_false_ungradable`` of the real gradable photos called ungradable, as many degraded photos caught as
that allows; the numbers on ``test`` are what MODEL_CARD.md quotes.

The colour rule (:func:`training.quality.blue_over_red`) is set last: its limit is the largest share of the field
where blue exceeds red in any real photo of ``train`` and ``val``, plus :data:`COLOUR_MARGIN` (never above 1), so
that no real photo seen in fitting would be refused by it. Its measurement is cached beside the others
(``colour.npz``).

Measurements are cached (``<cache_dir>/quality/measurements.npz``, keyed by file, variant and the code's version), so
a rerun measures only what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from training.common import atomic_write, atomic_write_text
from training.config import TrainingConfig
from training.data.records import Record
from training.degrade import DEGRADATIONS, FROM_PHOTOS, NOT_FUNDUS, VERSIONS, degrade, jpeg, not_fundus
from training.quality import FEATURE_NAMES, REASONS, blue_over_red, measure, pack_model, verdicts

log = logging.getLogger(__name__)

SAMPLES_VERSION = "1"  # bump when the sample plan changes (a changed degradation bumps its training.degrade.VERSIONS)
WORK_SIDE = 768  # photos are degraded at this long side at most (sizes scale with the field, so nothing is lost)
COLOUR_MARGIN = 0.05  # the colour rule's limit above the highest share of blue over red among real fitting photos
COLOUR_NAMES = ("blue_over_red",)


@dataclass(frozen=True)
class Sample:
    """One picture to measure: a real photo, a degradation of it, or a non-fundus picture."""

    key: str  # unique and stable: cache key
    record: Record
    kind: str  # "photo" | "mild" | "severe" | "not_fundus"
    variant: str  # degradation or non-fundus kind ("" for the photo)
    seed: int

    @property
    def reasons(self) -> tuple[str, ...]:
        if self.kind == "severe":
            return (DEGRADATIONS[self.variant][0],)
        if self.kind == "not_fundus":
            return ("not_fundus",)
        return ()


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:4], "little")


def plan_samples(records: Sequence[Record], seed: int = 0) -> list[Sample]:
    """The samples of :mod:`this module's docstring <training.fit_quality>` for ``records``, deterministic per photo."""
    out: list[Sample] = []
    names = sorted(DEGRADATIONS)
    for rec in records:
        base = f"{rec.source}|{rec.image.name}|{SAMPLES_VERSION}|{seed}"
        rng = np.random.default_rng(_seed(base))
        out.append(Sample(f"{base}|photo", rec, "photo", "", _seed(base, "photo")))
        mild = names[int(rng.integers(len(names)))]
        out.append(Sample(f"{base}|mild|{mild}|v{VERSIONS.get(mild, 1)}", rec, "mild", mild, _seed(base, "mild")))
        for name in rng.choice(names, 2, replace=False):
            out.append(Sample(f"{base}|severe|{name}|v{VERSIONS.get(str(name), 1)}", rec, "severe", str(name),
                              _seed(base, "severe", str(name))))
        rng.random()  # an earlier plan drew here whether to add one: drawing still keeps its pictures (and their cache)
        kind = NOT_FUNDUS[int(rng.integers(len(NOT_FUNDUS)))]
        out.append(Sample(f"{base}|not_fundus|{kind}|v{VERSIONS.get(kind, 1)}", rec, "not_fundus", kind, _seed(base, "nf", kind)))
    return out


def read_photo(path: Path, side: int = WORK_SIDE) -> np.ndarray:
    """A training photo as the worker would see it, at most ``side`` on its long side (RGB uint8)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not decode {path}; remove it from the source or export it again")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    if max(h, w) > side:
        scale = side / max(h, w)
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return rgb


def render(sample: Sample, photo: np.ndarray) -> np.ndarray:
    """The picture a sample stands for."""
    rng = np.random.default_rng(sample.seed)
    if sample.kind == "photo":  # half re-encoded, so that a second JPEG pass does not tell degraded pictures apart
        return jpeg(photo, rng) if rng.random() < 0.5 else photo
    if sample.kind in ("mild", "severe"):
        return degrade(photo, sample.variant, rng, severe=sample.kind == "severe")
    if sample.kind == "not_fundus":
        return not_fundus(sample.variant, rng, photo if sample.variant in FROM_PHOTOS else None)
    raise ValueError(f"unknown sample kind {sample.kind!r}")


class MeasurementCache:
    """Measurements by sample key, in one npz file; saved every ``every`` new samples and at the end."""

    def __init__(self, path: Path, every: int = 200, names: Sequence[str] = FEATURE_NAMES) -> None:
        self.path = path
        self.every = every
        self.names = tuple(names)
        self.values: dict[str, np.ndarray] = {}
        self._new = 0
        version = self._version()
        if path.is_file():
            with np.load(path, allow_pickle=False) as data:
                if str(data["version"]) == version:
                    self.values = {str(k): v for k, v in zip(data["keys"], data["values"])}

    def _version(self) -> str:
        return hashlib.sha256(("|".join(self.names) + SAMPLES_VERSION).encode()).hexdigest()[:16]

    def get(self, key: str) -> np.ndarray | None:
        return self.values.get(key)

    def put(self, key: str, value: np.ndarray) -> None:
        self.values[key] = value
        self._new += 1
        if self._new >= self.every:
            self.save()

    def save(self) -> None:
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(self.values))
        values = np.stack([self.values[k] for k in keys]) if len(keys) else np.zeros((0, len(self.names)))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, version=np.array(self._version()), keys=keys, values=values)

        atomic_write(self.path, write, durable=False)
        self._new = 0


def measure_samples(samples: Sequence[Sample], cache: MeasurementCache, progress: bool = True,
                    fn: Callable[[np.ndarray], np.ndarray] = measure,
                    also: Sequence[tuple[MeasurementCache, Callable[[np.ndarray], np.ndarray]]] = ()) -> np.ndarray:
    """(N, F) measurements (``fn``, :func:`training.quality.measure` by default; F = the cache's names) of
    ``samples``, from the cache where possible; each photo is decoded once and each picture rendered once: the
    ``also`` caches get their own measurement of the same rendered picture (read them back with
    ``measure_samples(samples, that_cache, fn=that_fn)``, which then finds everything cached)."""
    by_photo: dict[Path, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_photo[s.record.image].append(i)
    out = np.zeros((len(samples), len(cache.names)))
    pairs = [(cache, fn), *also]
    todo = 0
    t0 = time.monotonic()
    for n, (path, idx) in enumerate(by_photo.items()):
        missing = [i for i in idx if any(c.get(samples[i].key) is None for c, _ in pairs)]
        if missing:
            photo = read_photo(path)
            for i in missing:
                picture = render(samples[i], photo)
                for c, f in pairs:
                    if c.get(samples[i].key) is None:
                        c.put(samples[i].key, f(picture))
                todo += 1
        for i in idx:
            value = cache.get(samples[i].key)
            assert value is not None
            out[i] = value
        if progress and missing and n % 100 == 0:
            log.info("measured %d new pictures (%d/%d photos, %.0f s)", todo, n + 1, len(by_photo), time.monotonic() - t0)
    for c, _ in pairs:
        c.save()
    return out


def _colour(rgb: np.ndarray) -> np.ndarray:
    return np.array([blue_over_red(rgb)])


def labels_of(samples: Sequence[Sample]) -> np.ndarray:
    """(N, len(REASONS)) 0/1 targets."""
    y = np.zeros((len(samples), len(REASONS)), np.int64)
    for i, s in enumerate(samples):
        for r in s.reasons:
            y[i, REASONS.index(r)] = 1
    return y


def fit_network(x: np.ndarray, y: np.ndarray, hidden: int = 32, alpha: float = 1e-3, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Standardise and fit a one-hidden-layer multi-label network; returns (mean, scale, weights, biases)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    net = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=600, random_state=seed,
                        early_stopping=False, learning_rate_init=1e-3)
    net.fit(scaler.transform(x), y)
    return scaler.mean_, scaler.scale_, [np.asarray(w) for w in net.coefs_], [np.asarray(b) for b in net.intercepts_]


def _flagged(probs: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    t = np.array([thresholds[r] for r in REASONS])
    return np.asarray(probs >= t[None, :])


def choose_thresholds(probs: np.ndarray, samples: Sequence[Sample], target_false_ungradable: float,
                      floor: float = 0.1) -> dict[str, float]:
    """Per-reason thresholds on validation.

    ``not_fundus``: refusing a real photo is the worse error (a gradable photo lost; issue 13 started from dark
    EyePACS photos refused as "not a fundus photo"), so no real validation photo may reach it: the lowest value
    that catches every non-fundus picture, raised above the highest real photo's score if needed, and never above
    0.5 (a picture the network calls more likely not a fundus photo is refused). Non-fundus pictures below it are
    usually still ungradable for another reason (both rates are in the metrics). The other reasons share one
    quantile ``q`` of the gradable photos' scores (real photos and mild degradations): each threshold is the
    ``1 - q`` quantile of its reason's score on them, at least ``floor``; ``q`` is the largest for which at most
    ``target_false_ungradable`` of the *real* gradable photos get any reason (``not_fundus`` included).
    """
    kinds = np.array([s.kind for s in samples])
    nf = kinds == "not_fundus"
    real = kinds == "photo"
    gradable = real | (kinds == "mild")
    k_nf = REASONS.index("not_fundus")
    t_nf = 0.5 if not nf.any() else float(min(0.5, probs[nf, k_nf].min() * 0.999))
    if real.any() and probs[real, k_nf].max() >= t_nf:
        t_nf = float(min(0.5, probs[real, k_nf].max() * 1.001 + 1e-6))
    others = [r for r in REASONS if r != "not_fundus"]

    def at(q: float) -> dict[str, float]:
        # just above the quantile: a photo scoring exactly the highest gradable score is not flagged at q = 0
        t = {r: float(max(floor, np.nextafter(np.quantile(probs[gradable, REASONS.index(r)], 1 - q), 1.0))) for r in others}
        t["not_fundus"] = t_nf
        return t

    def false_rate(t: dict[str, float]) -> float:
        return float(_flagged(probs[real], t).any(axis=1).mean()) if real.any() else 0.0

    lo, hi = 0.0, 0.5
    for _ in range(40):
        mid = (lo + hi) / 2
        if false_rate(at(mid)) <= target_false_ungradable:
            lo = mid
        else:
            hi = mid
    return at(lo)


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def colour_limit(shares: np.ndarray, samples: Sequence[Sample]) -> float:
    """The colour rule's limit: :data:`COLOUR_MARGIN` above the largest blue-over-red share of the real photos among
    ``samples`` (the fitting splits), at most 1."""
    real = np.array([s.kind == "photo" for s in samples])
    if not real.any():
        raise ValueError("no real photos to set the colour rule on")
    return float(min(1.0, shares[real].max() + COLOUR_MARGIN))


def evaluate(probs: np.ndarray, samples: Sequence[Sample], thresholds: dict[str, float], n_boot: int = 1000,
             blue_shares: np.ndarray | None = None, colour_max: float | None = None) -> dict[str, Any]:
    """The gradability targets on one split: real gradable photos called ungradable (with a patient-bootstrap 95 %
    interval, and per source), degraded photos caught (any reason; the right reason) per degradation, non-fundus
    pictures refused (as ``not_fundus``, by the network or the colour rule; flagged at all) per kind, mild
    degradations called ungradable. ``blue_shares`` and ``colour_max``: the colour rule, when the model has one."""
    from training.metrics import grouped_bootstrap_ci

    flagged = _flagged(probs, thresholds)
    k_nf = REASONS.index("not_fundus")
    by_rule = np.zeros(len(samples), bool)
    if blue_shares is not None and colour_max is not None:
        by_rule = np.asarray(blue_shares[:, 0] > colour_max) & ~flagged[:, k_nf]
        flagged[:, k_nf] |= by_rule
    any_flag: np.ndarray = np.asarray(flagged.any(axis=1))
    kinds = np.array([s.kind for s in samples])
    variants = np.array([s.variant for s in samples])
    sources = np.array([s.record.source for s in samples])
    patients = np.array([f"{s.record.source}|{s.record.patient_id}" for s in samples])
    out: dict[str, Any] = {"thresholds": thresholds, "colour_rule": {"blue_over_red_max": colour_max}}

    real = kinds == "photo"
    value = _rate(any_flag[real])
    ci = grouped_bootstrap_ci(lambda f: float(np.mean(f)), patients[real], any_flag[real], n_boot=n_boot) if real.any() else None
    out["gradable_called_ungradable"] = {
        "rate": value, "ci95": list(ci) if ci else None, "photos": int(real.sum()), "called_ungradable": int(any_flag[real].sum()),
        "rejected_not_fundus": int(flagged[real, k_nf].sum()),
        "by_source": {src: {"rate": _rate(any_flag[real & (sources == src)]), "photos": int((real & (sources == src)).sum())}
                      for src in sorted(set(sources[real]))},
        "reasons_given": {r: int(flagged[real, k].sum()) for k, r in enumerate(REASONS)},
    }
    severe = kinds == "severe"
    right = np.array([bool(flagged[i, REASONS.index(s.reasons[0])]) if s.kind == "severe" else False for i, s in enumerate(samples)])
    ci = grouped_bootstrap_ci(lambda f: float(np.mean(f)), patients[severe], any_flag[severe], n_boot=n_boot) if severe.any() else None
    out["degraded_caught"] = {
        "rate": _rate(any_flag[severe]), "ci95": list(ci) if ci else None, "pictures": int(severe.sum()),
        "right_reason": _rate(right[severe]),
        "by_degradation": {v: {"caught": _rate(any_flag[severe & (variants == v)]), "right_reason": _rate(right[severe & (variants == v)]),
                               "pictures": int((severe & (variants == v)).sum())} for v in sorted(DEGRADATIONS)},
    }
    nf = kinds == "not_fundus"
    out["not_fundus_refused"] = {
        "rate": _rate(flagged[nf, k_nf]), "flagged_ungradable_at_all": _rate(any_flag[nf]), "pictures": int(nf.sum()),
        "by_colour_rule_only": int(by_rule[nf].sum()), "real_photos_refused_by_colour_rule": int(by_rule[real].sum()),
        "by_kind": {v: {"refused": _rate(flagged[nf & (variants == v), k_nf]), "pictures": int((nf & (variants == v)).sum())}
                    for v in NOT_FUNDUS},
    }
    mild = kinds == "mild"
    out["mild_called_ungradable"] = {"rate": _rate(any_flag[mild]), "pictures": int(mild.sum()),
                                     "by_degradation": {v: _rate(any_flag[mild & (variants == v)]) for v in sorted(DEGRADATIONS)}}
    return out


def fit_quality(cfg: TrainingConfig, output: Path, per_source: int = 800, target_false_ungradable: float = 0.015,
                seed: int = 0, hidden: int = 32, progress: bool = True) -> dict[str, Any]:
    """Build the samples, fit on train, choose thresholds on val, evaluate on test; write ``output`` and
    ``<output stem>.metrics.json`` beside it. Returns the metrics."""
    from training.data.sources import load_all
    from training.data.split import configured_split

    records = load_all(cfg.data)
    split = configured_split(cfg.data, records)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[Record]] = {}
    for side, recs in split.items():
        by_source: dict[str, list[Record]] = defaultdict(list)
        for r in recs:
            by_source[r.source].append(r)
        share = {"train": 1 - cfg.data.val_fraction - cfg.data.test_fraction, "val": cfg.data.val_fraction,
                 "test": cfg.data.test_fraction}[side]
        cap = max(1, round(per_source * share))
        picked: list[Record] = []
        for src in sorted(by_source):
            rs = by_source[src]
            idx = rng.permutation(len(rs))[:cap] if len(rs) > cap else np.arange(len(rs))
            picked += [rs[i] for i in sorted(idx)]
        chosen[side] = picked
    cache = MeasurementCache(Path(cfg.data.cache_dir).parent / "quality" / "measurements.npz")
    colour_cache = MeasurementCache(cache.path.with_name("colour.npz"), names=COLOUR_NAMES)
    samples = {side: plan_samples(recs, seed) for side, recs in chosen.items()}
    x = {side: measure_samples(s, cache, progress, also=[(colour_cache, _colour)]) for side, s in samples.items()}
    y_train = labels_of(samples["train"])
    mean, scale, weights, biases = fit_network(x["train"], y_train, hidden=hidden, seed=seed)
    provisional = pack_model(mean, scale, weights, biases, {r: 0.5 for r in REASONS}, {}, {})
    from training.quality import scores

    probs = {side: scores(provisional, x[side]) for side in x}
    thresholds = choose_thresholds(probs["val"], samples["val"], target_false_ungradable)
    shares = {side: measure_samples(s, colour_cache, progress, _colour) for side, s in samples.items()}
    colour_max = colour_limit(np.r_[shares["train"], shares["val"]][:, 0], [*samples["train"], *samples["val"]])
    metrics = {side: evaluate(probs[side], samples[side], thresholds, blue_shares=shares[side], colour_max=colour_max)
               for side in ("val", "test")}
    metrics["samples"] = {side: {"photos": len(chosen[side]), "pictures": len(samples[side])} for side in samples}
    provenance = {
        "kind": "real", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": sorted({r.source for recs in chosen.values() for r in recs}), "per_source": per_source, "seed": seed,
        "split_seed": cfg.data.split_seed, "hidden": hidden, "target_false_ungradable": target_false_ungradable,
        "samples_version": SAMPLES_VERSION,
    }
    model = pack_model(mean, scale, weights, biases, thresholds, {"test": _headline(metrics["test"]),
                                                                  "val": _headline(metrics["val"])}, provenance)
    model["colour_rule"] = {"blue_over_red_max": colour_max}
    assert verdicts(model, x["test"][:1])  # the stored model applies
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: torch.save(model, tmp))
    atomic_write_text(output.with_suffix(".metrics.json"), json.dumps(metrics, indent=1) + "\n")
    return metrics


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers the model file carries (the full metrics go to the JSON beside it)."""
    return {
        "gradable called ungradable": m["gradable_called_ungradable"]["rate"],
        "gradable called ungradable 95% CI": m["gradable_called_ungradable"]["ci95"],
        "degraded caught": m["degraded_caught"]["rate"],
        "degraded caught 95% CI": m["degraded_caught"]["ci95"],
        "not fundus refused": m["not_fundus_refused"]["rate"],
    }


__all__ = ["COLOUR_MARGIN", "Sample", "choose_thresholds", "colour_limit", "evaluate", "fit_network", "fit_quality",
           "labels_of", "measure_samples", "plan_samples", "render"]

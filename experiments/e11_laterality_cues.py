"""E11 (experiments/README.md): is there an orientation cue besides the fovea's tilt? Issue 13's laterality target
(>= 97 % of the photos that name their eye, every photo answered) fails on EyePACS, whose cameras invert whole
patients: whether a photo is upright is read from the fovea lying a little below the disc. This script measures, on
the **train and validation splits only** (the test split is not read), how well other cues tell an upright photo
from an inverted one, alone and with the tilt:

* ``tilt``: the shipped landmarks' tilt (:func:`training.laterality.landmarks`, 256 px);
* ``tilt_512``: the same angle from landmarks refined at 512 px: the disc as the best disc-sized bright blob (a
  centre-minus-ring filter on the vessel-closed luminance) within a disc diameter of the coarse one, the fovea as
  the best fovea-sized dark blob on the vessel-closed green channel;
* ``disc_height``: the disc's height in the field (field radii, > 0 below the centre): a macula-centred photo puts
  the fovea at the centre, so the disc sits a little above it in an upright photo;
* ``vessel_tilt``: the angle of the vessel pixels' centre of mass 2-4 disc diameters temporal of the disc (the
  arcades are symmetric about the disc-fovea line);
* ``rim_top_bottom``: the bottom rim's brightness minus the top's (the upper lid shades the top of an upright photo).

Labels: srahim photos are upright (its cameras never invert); an EyePACS photo is upright when its disc lies on the
side its stated eye puts it (mirrored photos, about 3 % of EyePACS, count as inverted here: no cue can see them).
Prints one JSON document: each cue's orientation AUC on EyePACS, the share of srahim photos on the wrong side of
zero, and logistic combinations fitted on train and scored on validation as the laterality they give.

    .venv/bin/python experiments/e11_laterality_cues.py [--config experiments/quality.toml] [--out e11.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from training.common import FUNDUS_THRESHOLD
from training.config import load_training_config
from training.data.sources import load_all
from training.data.split import configured_split
from training.data.transforms import crop_square, resize_square
from training.fit_quality import read_photo
from training.laterality import SIDE, landmarks

BIG = 512
_YY, _XX = np.mgrid[0:BIG, 0:BIG].astype(np.float32)
CUES = ("tilt", "tilt_512", "disc_height", "vessel_tilt", "rim_top_bottom")


def _centre_minus_ring(r_in: float, r_out: float) -> np.ndarray:
    half = int(np.ceil(r_out))
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    rr = np.hypot(x, y)
    inner, ring = (rr <= r_in).astype(np.float32), ((rr > r_in) & (rr <= r_out)).astype(np.float32)
    return inner / inner.sum() - ring / ring.sum()


def _relative(channel: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The channel over its local illumination (vessels closed away first), 1 outside the field."""
    closed = cv2.morphologyEx(channel, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15)))
    f = field.astype(np.float32)
    norm = np.maximum(cv2.GaussianBlur(f, (0, 0), 50), 1e-3)
    local = np.maximum(cv2.GaussianBlur(closed.astype(np.float32) * f, (0, 0), 50) / norm, 1.0)
    return np.where(field, closed / local, 1.0).astype(np.float32)


def cues(square: np.ndarray) -> dict[str, float]:
    """The :data:`CUES` of one square fundus crop (``BIG`` px, RGB uint8)."""
    lm = landmarks(square)
    k = BIG / SIDE
    cx, cy, rad = lm.centre[0] * k, lm.centre[1] * k, lm.radius * k
    xd, yd = lm.disc[0] * k, lm.disc[1] * k
    dd = 0.28 * rad  # a disc diameter, as the landmarks take it
    field = square.max(axis=2) > FUNDUS_THRESHOLD
    inside = np.hypot(_XX - cx, _YY - cy) / rad

    bright = cv2.filter2D(_relative(square.astype(np.float32).mean(axis=2), field), -1, _centre_minus_ring(0.5 * dd, 0.9 * dd))
    near = (np.hypot(_XX - xd, _YY - yd) < dd) & field
    y2, x2 = np.unravel_index(int(np.argmax(np.where(near, bright, -np.inf))), bright.shape)
    dark = cv2.filter2D(_relative(square[..., 1].astype(np.float32), field), -1, _centre_minus_ring(0.5 * dd, 1.1 * dd))
    dist = np.hypot(_XX - x2, _YY - y2)
    angle = np.degrees(np.arctan2(np.abs(_YY - y2), np.abs(_XX - x2)))
    window = (dist > 1.8 * dd) & (dist < 3.4 * dd) & (angle < 25) & field & (inside < 0.9)
    if abs(x2 - cx) / rad > 0.35:
        window &= (np.abs(_XX - cx) < 0.35 * rad) & (np.abs(_YY - cy) < 0.35 * rad)
    tilt_512 = 0.0
    if window.sum() >= 20:
        yf, xf = np.unravel_index(int(np.argmin(np.where(window, dark, np.inf))), dark.shape)
        tilt_512 = float(np.degrees(np.arctan2(yf - y2, max(abs(xf - x2), 1e-6))))

    green = cv2.createCLAHE(2.0, (8, 8)).apply(np.ascontiguousarray(square[..., 1]))
    hat = cv2.morphologyEx(green, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (21, 21))).astype(np.float32)
    inner = field & (inside < 0.92)
    vessels = inner & (hat > np.percentile(hat[inner], 88))
    temporal = 1.0 if xd < cx else -1.0
    dx, dy = (_XX - xd) * temporal, _YY - yd
    arcades = vessels & (np.hypot(dx, dy) > 2 * dd) & (np.hypot(dx, dy) < 4 * dd) & (dx > 0)
    vessel_tilt = float(np.degrees(np.arctan2((dy[arcades] * hat[arcades]).sum(), (dx[arcades] * hat[arcades]).sum()))) \
        if arcades.sum() > 10 else 0.0

    lum = square.astype(np.float32).mean(axis=2)
    top, bottom = field & (_YY < cy - 0.6 * rad), field & (_YY > cy + 0.6 * rad)
    rim = float((lum[bottom].mean() - lum[top].mean()) / np.median(lum[field])) if top.any() and bottom.any() else 0.0
    return {"tilt": lm.tilt, "tilt_512": tilt_512, "disc_height": (yd - cy) / rad, "vessel_tilt": vessel_tilt,
            "rim_top_bottom": rim, "disc_right": float(lm.disc_offset > 0)}


def measure(config: Path) -> dict[str, dict[str, np.ndarray]]:
    cfg = load_training_config(config)
    split = configured_split(cfg.data, load_all(cfg.data))
    out: dict[str, dict[str, np.ndarray]] = {}
    for side in ("train", "val"):
        recs = [r for r in split[side] if r.eye in ("L", "R")]
        rows = [cues(resize_square(crop_square(read_photo(r.image)), BIG)) for r in recs]
        cols = {c: np.array([row[c] for row in rows]) for c in (*CUES, "disc_right")}
        cols["srahim"] = np.array(["srahim" in r.source for r in recs])
        cols["right"] = np.array([r.eye == "R" for r in recs])
        cols["upright"] = np.where(cols["srahim"], True, (cols["disc_right"] > 0) == cols["right"])
        out[side] = cols
    return out


def summarise(data: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    result: dict[str, Any] = {"photos": {s: int(len(d["right"])) for s, d in data.items()}, "cues": {}, "combined": {}}
    for cue in CUES:
        entry = {}
        for side, d in data.items():
            eyepacs = ~d["srahim"]
            auc = roc_auc_score(d["upright"][eyepacs], d[cue][eyepacs])
            entry[side] = {"eyepacs_orientation_auc": round(float(max(auc, 1 - auc)), 3),
                           "sign": "+" if auc >= 0.5 else "-"}
            if cue.startswith("tilt"):
                entry[side]["srahim_at_or_above_the_disc"] = round(float((d[cue][d["srahim"]] <= 0).mean()), 3)
        result["cues"][cue] = entry
    tr, va = data["train"], data["val"]
    for names in (("tilt",), ("tilt", "disc_height"), ("tilt", "vessel_tilt"), ("tilt", "rim_top_bottom"),
                  ("tilt", "tilt_512"), CUES):
        fit = LogisticRegression(max_iter=2000).fit(np.column_stack([tr[n] for n in names]), tr["upright"])
        entry = {}
        for side, d in (("train", tr), ("val", va)):
            p_up = fit.predict_proba(np.column_stack([d[n] for n in names]))[:, 1]
            right = np.where(d["disc_right"] > 0, p_up, 1 - p_up) >= 0.5  # the disc's side, read through the orientation
            ok = right == d["right"]
            entry[side] = {"laterality": round(float(ok.mean()), 3), "srahim": round(float(ok[d["srahim"]].mean()), 3),
                           "eyepacs": round(float(ok[~d["srahim"]].mean()), 3)}
        result["combined"][" + ".join(names)] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("quality.toml"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.monotonic()
    result = summarise(measure(args.config))
    result["seconds"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

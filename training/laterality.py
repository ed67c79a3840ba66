"""Which eye a fundus photo shows, read from the photo itself, with a confidence.

Anatomy: the optic disc lies nasal to the macula, so in an upright, macula-centred photo of a **right** eye the
disc is on the image's **right** (checked on the labelled sets: srahim 359 of 360 photos with the brightness
locator below). Two things get in the way:

* some cameras and exports show the fundus *inverted* (rotated 180 degrees, as seen through a condensing lens):
  ../shared/data/README.md warns of it for EyePACS, where the disc is on the "wrong" side for whole patients
  (both eyes: 35 % of the patients here). Such a photo is told from an upright one by the fovea: it lies a little
  *below* the disc in an upright photo (the blind spot is 1.5 degrees below fixation), about 8 degrees down the
  disc-fovea line (srahim: median +8.9 degrees), and above it in an inverted one (EyePACS "swapped" patients:
  median -8.4 degrees);
* landmarks are found by brightness, so a photo with a bright artefact, heavy exudates or no visible fovea can
  mislead them; hence the confidence, which knows how far to trust the fovea (below).

:func:`landmarks` finds the disc (the brightest blob at disc scale relative to the local illumination, inside
the central 82 % of the field, away from rim glare) and the fovea (the darkest vessel-free spot 1.8-3.2 disc
diameters from the disc, within 25 degrees of horizontal, near the field's centre when the disc is off-centre as
in a macula-centred view). The eye is then

    P(right eye) = P(disc on the image's right) * P(upright) + P(disc on the left) * P(inverted)

with P(disc right) = sigmoid(side_gain * disc offset / field radius). P(upright) comes from the tilt as a mixture
likelihood (format 2): a fovea found where it is gives a tilt near +tilt_mean in an upright photo and -tilt_mean in
an inverted one (normal, sd ``tilt_sd``), but with probability ``miss = sigmoid(miss_bias - miss_depth_gain *
fovea depth)`` the "fovea" is some other dark spot and the tilt says nothing (uniform over -25..25 degrees):

    P(upright | tilt) = prior L_up / (prior L_up + (1 - prior) L_inv),  L = (1 - miss) N(tilt; +-mean, sd) + miss / 50

So a shallow fovea, or a tilt far outside the anatomical range, leaves P(upright) near the prior instead of making
the answer confident (the logistic of format 1 grew *more* confident the larger a wrong tilt was). The six numbers
are fitted by maximum likelihood on the training split of the sets that name the eye (``dr-train fit-laterality``,
:mod:`training.fit_laterality`); below the confidence threshold the model abstains: the worker files the photo
under its stated eye and says "eye not confirmed", or refuses a photo that states none. The worker can be told that
its cameras never invert (``[screening] photo_orientation = "upright"``): then P(upright) = 1.

Format 3 adds a second reader of the same question (E12, experiments/README.md): the chirality network of
:mod:`training.chirality`, trained to name the eye whatever way up the photo is (a rotation keeps the eye, a mirror
swaps it), so it reads orientation from more than the fovea's tilt. Its logit and the landmarks' log-odds are joined
by two weights fitted on the validation split (:func:`combine`), in ``detect`` mode only.

The fitted model is a dict of numbers and, in format 3, the network's half-precision tensors (weights_only-safe);
the landmarks need no torch, the network does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from training.checkpoint import CheckpointError, load_fitted
from training.common import FUNDUS_THRESHOLD

LATERALITY_FORMAT = "dr-laterality-3"
READABLE_FORMATS = ("dr-laterality-2", LATERALITY_FORMAT)  # 2: the landmarks alone; 3 may add the chirality network
TILT_RANGE = 50.0  # degrees: the fovea window spans 25 degrees either side of the disc's horizontal
SIDE = 256  # landmarks are found on the square fundus crop at this size
Orientation = Literal["detect", "upright"]

_YY, _XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)


@dataclass(frozen=True)
class Landmarks:
    """Disc and fovea in the :data:`SIDE` px square crop; ``fovea`` None when no candidate was found."""

    centre: tuple[float, float]  # the field's centre (x, y)
    radius: float  # the field's radius (half its width)
    disc: tuple[float, float]
    disc_contrast: float  # how much brighter the disc is than the field's median (relative units)
    fovea: tuple[float, float] | None
    fovea_depth: float  # how much darker the fovea is than its search window's median

    @property
    def disc_offset(self) -> float:
        """The disc's horizontal position from the field's centre, in field radii: > 0 on the image's right."""
        return (self.disc[0] - self.centre[0]) / self.radius

    @property
    def tilt(self) -> float:
        """Degrees by which the fovea lies below the disc along the disc-fovea line (0 when no fovea was found):
        about +8 in an upright photo, -8 in an inverted one."""
        if self.fovea is None:
            return 0.0
        dx, dy = abs(self.fovea[0] - self.disc[0]), self.fovea[1] - self.disc[1]
        return float(np.degrees(np.arctan2(dy, max(dx, 1e-6))))


def _square(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] != rgb.shape[1]:
        raise ValueError(f"expected the square fundus crop (S, S, 3), got {rgb.shape}")
    if rgb.shape[0] == SIDE:
        return rgb
    interp = cv2.INTER_AREA if rgb.shape[0] > SIDE else cv2.INTER_LINEAR
    return cv2.resize(rgb, (SIDE, SIDE), interpolation=interp)


def landmarks(square: np.ndarray) -> Landmarks:
    """Disc and fovea of the square fundus crop (the worker's preprocessed photo, any size; RGB uint8)."""
    sq = _square(square)
    field = np.maximum(np.maximum(sq[..., 0], sq[..., 1]), sq[..., 2]) > FUNDUS_THRESHOLD
    if field.sum() < 100:
        field = np.ones(field.shape, bool)
    ys, xs = np.nonzero(field)
    cx, cy = (float(xs.min()) + float(xs.max())) / 2, (float(ys.min()) + float(ys.max())) / 2
    rad = max((float(xs.max()) - float(xs.min())) / 2, 1.0)
    f = field.astype(np.float32)
    norm = np.maximum(cv2.GaussianBlur(f, (0, 0), 25), 1e-3)
    r = np.hypot(_XX - cx, _YY - cy) / rad

    lum = sq.astype(np.float32).mean(axis=2)
    rel = np.where(field, lum / np.maximum(cv2.GaussianBlur(lum * f, (0, 0), 25) / norm, 1.0), 0)
    smooth = cv2.GaussianBlur(rel, (0, 0), 6)
    inner = field & (r < 0.82)
    if not inner.any():
        inner = field
    score = np.where(inner, smooth, -np.inf)
    yd, xd = np.unravel_index(int(np.argmax(score)), score.shape)
    contrast = float(smooth[yd, xd] - np.median(smooth[inner]))

    # the fovea: dark once the (thin, dark) vessels are closed away
    green = cv2.morphologyEx(sq[..., 1], cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))).astype(np.float32)
    relg = np.where(field, green / np.maximum(cv2.GaussianBlur(green * f, (0, 0), 25) / norm, 1.0), 2.0)
    darkness = cv2.GaussianBlur(relg, (0, 0), 5)
    dd = 0.28 * rad  # a disc diameter: ~0.14 of a 45-degree field's diameter
    dist = np.hypot(_XX - xd, _YY - yd)
    angle = np.degrees(np.arctan2(np.abs(_YY - yd), np.abs(_XX - xd)))
    window = (dist > 1.8 * dd) & (dist < 3.2 * dd) & (angle < 25) & field & (r < 0.9)
    if abs(xd - cx) / rad > 0.35:  # macula-centred view: the fovea is near the field's centre
        window &= (np.abs(_XX - cx) < 0.3 * rad) & (np.abs(_YY - cy) < 0.3 * rad)
    fovea: tuple[float, float] | None = None
    depth = 0.0
    if window.sum() >= 20:
        values = np.where(window, darkness, np.inf)
        yf, xf = np.unravel_index(int(np.argmin(values)), values.shape)
        fovea = (float(xf), float(yf))
        depth = float(np.median(darkness[window]) - darkness[yf, xf])
    return Landmarks((cx, cy), rad, (float(xd), float(yd)), contrast, fovea, depth)


# --------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class LateralityPrediction:
    eye: Literal["L", "R"]
    confidence: float  # P(the predicted eye), 0.5-1
    confident: bool  # at or above the model's threshold (chosen on validation)
    disc_side: Literal["left", "right"]  # where the disc is in the image as shown
    upright: float  # P(the photo is upright, not inverted)
    landmarks: Landmarks

    def describe(self) -> str:
        """In words, for the report (one level of brackets: the report's notes wrap it in a sentence)."""
        eye = "right" if self.eye == "R" else "left"
        how = f"optic disc on the image's {self.disc_side}"
        if self.upright < 0.5:
            how += "; the photo seems upside down" + (", its fovea above the disc" if self.landmarks.fovea is not None
                                                      and self.landmarks.tilt < 0 else "")
        elif self.landmarks.fovea is None:
            how += ", no fovea found"
        return f"looks like a {eye} eye ({how}; confidence {self.confidence:.0%})"


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(x, -50.0, 50.0))))


def _normal(x: float, mean: float, sd: float) -> float:
    return float(np.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)))


def p_upright(model: dict[str, Any], tilt: float, depth: float, has_fovea: bool = True) -> float:
    """P(the photo is upright) from the tilt (degrees) and the fovea's depth (module docstring)."""
    if not has_fovea:
        return float(model["upright_prior"])
    miss = _sigmoid(float(model["miss_bias"]) - float(model["miss_depth_gain"]) * depth)
    mean, sd = float(model["tilt_mean"]), float(model["tilt_sd"])
    up = (1 - miss) * _normal(tilt, mean, sd) + miss / TILT_RANGE
    inv = (1 - miss) * _normal(tilt, -mean, sd) + miss / TILT_RANGE
    prior = float(model["upright_prior"])
    return prior * up / (prior * up + (1 - prior) * inv)


def probability_right(model: dict[str, Any], offset: float, tilt: float, orientation: Orientation = "detect",
                      depth: float = 1.0, has_fovea: bool = True) -> tuple[float, float]:
    """(P(right eye), P(upright)) for a disc offset (field radii), a tilt (degrees) and the fovea's depth (the default
    1.0 is a clear fovea)."""
    p_disc_right = _sigmoid(float(model["side_gain"]) * offset)
    up = 1.0 if orientation == "upright" else p_upright(model, tilt, depth, has_fovea)
    return p_disc_right * up + (1 - p_disc_right) * (1 - up), up


def log_odds(p: Any) -> Any:
    """log(p / (1 - p)), p clipped away from 0 and 1 (a float or an array)."""
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


def combine(model: dict[str, Any], p_landmarks: float, cnn_logit: float) -> float:
    """P(right eye) from the landmarks' P(right eye) and the chirality network's logit (format 3): a logistic in
    both log-odds, its two weights fitted on the validation split (``dr-train fit-laterality``)."""
    z = float(model["landmark_weight"]) * float(log_odds(p_landmarks)) + float(model["chirality_weight"]) * cnn_logit
    return _sigmoid(z)


def predict(model: dict[str, Any], square: np.ndarray, orientation: Orientation = "detect") -> LateralityPrediction:
    """The eye of one photo (the square fundus crop) under ``model`` (:func:`load_laterality_model`). With the
    chirality network (format 3) and ``orientation = "detect"``, its answer joins the landmarks' (:func:`combine`);
    a site whose photos are always upright reads the disc's side alone, which the network cannot better there."""
    lm = landmarks(square)
    p_right, p_upright = probability_right(model, lm.disc_offset, lm.tilt, orientation, lm.fovea_depth,
                                           lm.fovea is not None)
    net = model.get("_net")
    if net is not None and orientation == "detect":
        from training.chirality import chirality_logit

        p_right = combine(model, p_right, chirality_logit(net, _square(square)))
        if abs(_sigmoid(float(model["side_gain"]) * lm.disc_offset) - 0.5) > 0.4:
            # the disc is clearly on one side: the photo is upright when that side is the one the eye puts it on
            p_upright = p_right if lm.disc_offset >= 0 else 1 - p_right
    eye: Literal["L", "R"] = "R" if p_right >= 0.5 else "L"
    confidence = max(p_right, 1 - p_right)
    return LateralityPrediction(eye, confidence, confidence >= float(model["confident"]),
                                "right" if lm.disc_offset >= 0 else "left", p_upright, lm)


PARAMETERS = ("side_gain", "tilt_mean", "tilt_sd", "miss_bias", "miss_depth_gain", "upright_prior")


def pack_model(params: dict[str, float], confident: float, metrics: dict[str, Any], provenance: dict[str, Any],
               chirality: dict[str, Any] | None = None, weights: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """The model file's content: the six :data:`PARAMETERS`, the confidence threshold, metrics and provenance; with
    ``chirality`` (:func:`training.chirality.pack_net`) also the network and the (landmark, chirality) weights of
    :func:`combine`."""
    missing = [k for k in PARAMETERS if k not in params]
    if missing:
        raise ValueError(f"laterality parameters missing: {missing}")
    if not (float(params["tilt_sd"]) > 0 and 0 < float(params["upright_prior"]) < 1):
        raise ValueError(f"tilt_sd must be > 0 and upright_prior in (0, 1), got {params}")
    model = {"format": LATERALITY_FORMAT, **{k: float(params[k]) for k in PARAMETERS}, "confident": float(confident),
             "metrics": metrics, "provenance": provenance}
    if chirality is not None:
        model.update(chirality=chirality, landmark_weight=float(weights[0]), chirality_weight=float(weights[1]))
    return model


class LateralityModelError(CheckpointError):
    """The laterality model file is missing, unreadable or not one this code can apply."""


def load_laterality_model(path: str | Path) -> dict[str, Any]:
    """Read and check a file written by ``dr-train fit-laterality``."""
    path = Path(path)
    model = load_fitted(path, what="laterality", command="fit-laterality", setting="laterality_model",
                        error=LateralityModelError)
    if not isinstance(model, dict) or model.get("format") not in READABLE_FORMATS:
        found = model.get("format") if isinstance(model, dict) else None
        raise LateralityModelError(f"{path}: not a laterality model of format {' or '.join(map(repr, READABLE_FORMATS))} "
                                   f"(found {found!r}); refit it with `dr-train fit-laterality`")
    needed = (*PARAMETERS, "confident") + (("landmark_weight", "chirality_weight") if "chirality" in model else ())
    for key in needed:
        if not isinstance(model.get(key), (int, float)):
            raise LateralityModelError(f"{path}: '{key}' is missing or not a number; refit it with `dr-train fit-laterality`")
    model = dict(model)
    if "chirality" in model:
        from training.chirality import unpack_net

        try:
            model["_net"] = unpack_net(model["chirality"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise LateralityModelError(f"{path}: its chirality network cannot be rebuilt ({exc}); refit it with "
                                       "`dr-train fit-laterality`") from exc
    return model


__all__ = [
    "LATERALITY_FORMAT", "PARAMETERS", "SIDE", "TILT_RANGE", "LateralityModelError", "LateralityPrediction", "Landmarks",
    "Orientation", "READABLE_FORMATS", "combine", "landmarks", "log_odds", "load_laterality_model", "p_upright", "pack_model", "predict",
    "probability_right",
]

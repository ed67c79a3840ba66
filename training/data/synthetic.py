"""Synthetic colour fundus photographs with exact lesion masks and consistent DR / DME grades.

For tests and demos only: nothing here resembles real pathology closely enough to train a
screening model. What it does guarantee is internal consistency:

* ``masks`` are exactly the pixels each lesion was painted on (before the final slight blur and
  camera noise), in ``training.model.LESIONS`` order (MA, HE, EX, SE, OD), values {0, 1};
* ``dr_grade`` follows ICDR-like rules from the lesions actually drawn (``dr_grade_from_lesions``);
* ``dme_grade`` follows the IDRiD definition and is measured on the drawn hard-exudate mask:
  0 no hard exudates, 1 exudates but none within one disc diameter of the fovea centre, 2 otherwise.

Coordinates are (x, y) pixel floats. ``eye == "R"`` puts the optic disc on the right of the image
(nasal side of a right eye seen from the front), ``"L"`` on the left.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from training.data.sources import MANIFEST_MASK_COLUMNS
from training.model import LESION_CODES, LESIONS

MA, HE, EX, SE, OD = range(5)  # mask channels, in LESION_CODES order
Point = tuple[float, float]  # (x, y)
Strokes = dict[int, list[np.ndarray]]  # line thickness -> polylines to draw at it
SEVERE_HAEMORRHAGES = 20  # >= this many haemorrhages -> severe NPDR (the "4" of the 4-2-1 rule, simplified)
SEVERE_SOFT_EXUDATES = 6  # >= this many cotton-wool spots -> severe NPDR
CSV_COLUMNS = ("image", "patient_id", "eye", "dr_grade", "dme_grade", *MANIFEST_MASK_COLUMNS)


@dataclass
class SyntheticFundus:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (H, W, 5) uint8 {0, 1}, LESIONS order
    dr_grade: int
    dme_grade: int
    eye: str  # "L" or "R"
    fovea: tuple[float, float]  # (x, y)
    disc_center: tuple[float, float]  # (x, y)
    disc_diameter: float  # pixels; the DME distance unit
    fov_center: tuple[float, float]
    fov_radius: float
    lesion_counts: dict[str, int] = field(default_factory=dict)  # lesion name -> number of lesions drawn
    neovascularisation: bool = False


def dr_grade_from_lesions(n_ma: int, n_he: int, n_ex: int, n_se: int, neovascularisation: bool) -> int:
    """ICDR-like grade from lesion content (counts of drawn lesions)."""
    if neovascularisation:
        return 4
    if n_he >= SEVERE_HAEMORRHAGES or n_se >= SEVERE_SOFT_EXUDATES:
        return 3
    if n_he > 0 or n_ex > 0 or n_se > 0:
        return 2
    if n_ma > 0:
        return 1
    return 0


def dme_grade_from_mask(ex_mask: np.ndarray, fovea: tuple[float, float], disc_diameter: float) -> int:
    """IDRiD DME grade from a hard-exudate mask: any exudate pixel within one disc diameter of the fovea -> 2."""
    ys, xs = np.nonzero(ex_mask)
    if ys.size == 0:
        return 0
    d2 = (xs - fovea[0]) ** 2 + (ys - fovea[1]) ** 2
    return 2 if float(d2.min()) <= disc_diameter**2 else 1


# --------------------------------------------------------------------------------------------- drawing


def _walk(
    rng: np.random.Generator, start: Point | np.ndarray, theta: float, n_steps: int, step: float, turn: float, noise: float,
) -> np.ndarray:
    """Points of a random walk with a constant turn rate (radians/step) and angular noise."""
    t = theta + np.cumsum(turn + rng.normal(0.0, noise, n_steps))
    pts = np.empty((n_steps + 1, 2), np.float64)
    pts[0] = start
    pts[1:, 0] = start[0] + np.cumsum(step * np.cos(t))
    pts[1:, 1] = start[1] + np.cumsum(step * np.sin(t))
    return pts


def _polyline(strokes: Strokes, pts: np.ndarray, thickness: float) -> None:
    """Queue a polyline; ``_draw_strokes`` draws each thickness group with one cv2.polylines call."""
    strokes.setdefault(max(1, int(round(thickness))), []).append(np.round(pts).astype(np.int32).reshape(-1, 1, 2))


def _draw_strokes(strokes: Strokes, shape: tuple[int, int]) -> np.ndarray:
    layer = np.zeros(shape, np.uint8)
    for thickness, lines in strokes.items():
        cv2.polylines(layer, lines, False, 255, thickness, cv2.LINE_AA)
    return layer


def _vessel_tree(
    rng: np.random.Generator, layer: Strokes, start: Point | np.ndarray, theta: float, length: float, thickness: float,
    step: float, turn: float, depth: int,
) -> None:
    """A vessel tapering along its course with side branches, queued on ``layer`` (a strokes dict)."""
    n = max(2, int(length / step))
    pts = _walk(rng, start, theta, n, step, turn, 0.08)
    h = n // 2  # taper
    _polyline(layer, pts[: h + 1], thickness)
    _polyline(layer, pts[h:], thickness * 0.7)
    if depth <= 0:
        return
    for _ in range(int(rng.integers(2, 4) if depth > 1 else rng.integers(1, 3))):
        i = int(rng.integers(n // 5, max(n // 5 + 1, n - 2)))
        seg = pts[i + 1] - pts[i]
        base = math.atan2(seg[1], seg[0])
        sign = rng.choice((-1.0, 1.0))
        _vessel_tree(
            rng, layer, pts[i], base + sign * rng.uniform(0.5, 1.0), length * rng.uniform(0.25, 0.5),
            max(1.0, thickness * 0.6), step, rng.normal(0.0, 0.03), depth - 1,
        )


_NOISE_POOL: dict[int, np.ndarray] = {}


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal camera noise: a random window of a fixed pool (deterministic, much faster than fresh draws)."""
    n = int(np.prod(shape))
    pool = _NOISE_POOL.get(n)
    if pool is None:
        pool = _NOISE_POOL[n] = np.random.default_rng(12345).standard_normal(2 * n, dtype=np.float32)
    off = int(rng.integers(0, n))
    return pool[off : off + n].reshape(shape)


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n_vertices: int = 10) -> np.ndarray:
    ang = np.sort(rng.uniform(0, 2 * np.pi, n_vertices))
    rad = r * rng.uniform(0.65, 1.25, n_vertices)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)


class _Placer:
    """Rejection sampling of lesion centres inside the retina, away from the disc and other lesions."""

    def __init__(self, rng: np.random.Generator, size: int, fov_c: Point, fov_r: float, disc_c: Point, disc_r: float) -> None:
        self.rng, self.size = rng, size
        self.fov_c, self.fov_r = fov_c, fov_r
        self.disc_c, self.disc_r = disc_c, disc_r
        self.occupied = np.zeros((size, size), bool)

    def free(self, x: float, y: float, r: float, margin: int = 2) -> bool:
        if math.hypot(x - self.fov_c[0], y - self.fov_c[1]) > self.fov_r * 0.93 - r:
            return False
        if math.hypot(x - self.disc_c[0], y - self.disc_c[1]) < self.disc_r * 1.25 + r + margin:
            return False
        e = int(math.ceil(r)) + margin
        x0, y0 = max(0, int(x) - e), max(0, int(y) - e)
        return not self.occupied[y0 : int(y) + e + 1, x0 : int(x) + e + 1].any()

    def take(self, x: float, y: float, r: float, margin: int = 1) -> None:
        e = int(math.ceil(r)) + margin
        x0, y0 = max(0, int(x) - e), max(0, int(y) - e)
        self.occupied[y0 : int(y) + e + 1, x0 : int(x) + e + 1] = True

    def sample(
        self, r: float, quadrant: int | None = None, max_radius: float = 0.9, tries: int = 200, near: Point | None = None,
        near_r: float = 0.0, avoid: Point | None = None, avoid_r: float = 0.0,
    ) -> Point | None:
        for _ in range(tries):
            if near is not None:
                a, d = self.rng.uniform(0, 2 * np.pi), near_r * math.sqrt(self.rng.uniform())
                x, y = near[0] + d * math.cos(a), near[1] + d * math.sin(a)
            else:
                lo, hi = (0.0, 2 * np.pi) if quadrant is None else (quadrant * np.pi / 2, (quadrant + 1) * np.pi / 2)
                a = self.rng.uniform(lo, hi)
                d = self.fov_r * max_radius * math.sqrt(self.rng.uniform(0.02, 1.0))
                x, y = self.fov_c[0] + d * math.cos(a), self.fov_c[1] + d * math.sin(a)
            if avoid is not None and math.hypot(x - avoid[0], y - avoid[1]) <= avoid_r + r + 2:
                continue
            if self.free(x, y, r):
                return x, y
        return None


def _plan(rng: np.random.Generator, grade: int, dme: int | None) -> dict[str, int]:
    """How many lesions of each kind to draw for a target DR grade (and DME target, for grade >= 2)."""
    if grade < 2:
        if dme not in (None, 0):
            raise ValueError(f"DR grade {grade} has no exudates, so dme_grade must be 0, got {dme}")
        return {"ma": 0 if grade == 0 else int(rng.integers(1, 7)), "he": 0, "se": 0, "ex_dme": 0, "neo": False}
    if dme is None:
        dme = int(rng.choice(3, p=(0.35, 0.3, 0.35)))
    plan = {"ma": int(rng.integers(3, 16)), "ex_dme": dme, "neo": grade == 4}
    if grade == 2 or (grade == 4 and rng.uniform() < 0.5):
        plan["he"] = int(rng.integers(1 if dme == 0 else 0, 12))
        plan["se"] = int(rng.integers(0, 3))
        if plan["he"] == 0 and dme == 0:
            plan["he"] = 1
    elif rng.uniform() < 0.7:  # severe by haemorrhages in every quadrant
        plan["he"] = int(rng.integers(SEVERE_HAEMORRHAGES, 36))
        plan["se"] = int(rng.integers(0, 6))
    else:  # severe by plentiful cotton-wool spots
        plan["he"] = int(rng.integers(3, 15))
        plan["se"] = int(rng.integers(SEVERE_SOFT_EXUDATES, 10))
    plan["ma"] += plan["he"] // 2
    return plan


def make_fundus(
    rng: np.random.Generator,
    size: int = 256,
    dr_grade: int | None = None,
    *,
    dme_grade: int | None = None,
    eye: str | None = None,
) -> SyntheticFundus:
    """One synthetic fundus. ``dr_grade`` None draws a random grade; ``dme_grade`` is an optional target
    (only meaningful with grade >= 2); ``eye`` None picks L/R at random. The returned grades are always
    measured from what was drawn, and equal the requested ones when given."""
    if eye not in (None, "L", "R"):
        raise ValueError(f"eye must be 'L', 'R' or None, got {eye!r}")
    if dr_grade is not None and dr_grade not in range(5):
        raise ValueError(f"dr_grade must be 0-4 or None, got {dr_grade}")
    if dme_grade is not None and dme_grade not in range(3):
        raise ValueError(f"dme_grade must be 0-2 or None, got {dme_grade}")
    if dme_grade and dr_grade is not None and dr_grade < 2:
        raise ValueError(f"DR grade {dr_grade} has no exudates, so dme_grade must be 0, got {dme_grade}")
    for _ in range(50):  # lesion placement can fall short of the plan (rarely); then draw again
        f = _make_fundus_once(rng, size, dr_grade, dme_grade, eye)
        if (dr_grade is None or f.dr_grade == dr_grade) and (dme_grade is None or f.dme_grade == dme_grade):
            return f
    raise RuntimeError(f"could not draw a fundus with dr_grade={dr_grade}, dme_grade={dme_grade} at size {size}")


def _make_fundus_once(
    rng: np.random.Generator, size: int, dr_grade: int | None, dme_grade: int | None, eye: str | None,
) -> SyntheticFundus:
    target = int(rng.integers(2 if dme_grade else 0, 5)) if dr_grade is None else dr_grade
    s = size / 256.0
    H = W = size

    # --- geometry
    fov_c = (W / 2 + rng.normal(0, 2 * s), H / 2 + rng.normal(0, 2 * s))
    fov_r = size * rng.uniform(0.45, 0.48)
    if eye is None:
        eye = "R" if rng.uniform() < 0.5 else "L"
    side = 1.0 if eye == "R" else -1.0
    disc_r = fov_r * rng.uniform(0.115, 0.135)  # disc diameter ~ 1/8 of the field diameter (45 degrees)
    dd = 2 * disc_r
    fovea = (fov_c[0] - side * fov_r * rng.uniform(0.05, 0.15), fov_c[1] + rng.normal(0, 3 * s))
    disc_dist = 2.5 * dd * rng.uniform(0.92, 1.08)
    disc_ang = rng.normal(-0.12, 0.08)  # disc slightly above the fovea
    disc_c = (fovea[0] + side * disc_dist * math.cos(disc_ang), fovea[1] + disc_dist * math.sin(disc_ang))

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    r2_fov = ((xx - fov_c[0]) ** 2 + (yy - fov_c[1]) ** 2) * np.float32(1.0 / fov_r**2)
    fov = r2_fov <= 1.0

    # --- background retina: orange-red, radial falloff, low-frequency texture (all smooth, so at 1/4
    # resolution and resized), darker macula (in its own window)
    base = np.array([rng.uniform(190, 225), rng.uniform(80, 110), rng.uniform(30, 55)], np.float32)
    light_c = (fov_c[0] + rng.normal(0, 0.1 * fov_r), fov_c[1] + rng.normal(0, 0.1 * fov_r))
    q = max(1, size // 64)
    ly, lx = yy[::q, ::q], xx[::q, ::q]
    r2_light = ((lx - light_c[0]) ** 2 + (ly - light_c[1]) ** 2) * np.float32(1.0 / fov_r**2)
    texture = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), lx.shape[::-1], interpolation=cv2.INTER_CUBIC)
    shade = (1.0 - rng.uniform(0.4, 0.55) * np.minimum(r2_light, 1.3)) * (1.0 + 0.06 * texture)
    shade = cv2.resize(shade, (W, H), interpolation=cv2.INTER_LINEAR)
    e = int(1.7 * dd)
    mx0, mx1 = max(0, int(fovea[0]) - e), min(W, int(fovea[0]) + e)
    my0, my1 = max(0, int(fovea[1]) - e), min(H, int(fovea[1]) + e)
    d2_fov = (xx[my0:my1, mx0:mx1] - fovea[0]) ** 2 + (yy[my0:my1, mx0:mx1] - fovea[1]) ** 2
    shade[my0:my1, mx0:mx1] *= 1.0 - 0.35 * np.exp(-d2_fov / (2 * (0.55 * dd) ** 2)) - 0.15 * np.exp(-d2_fov / (2 * (0.12 * dd) ** 2))
    img = shade[..., None] * base

    # --- optic disc: bright yellowish, slightly vertical oval, brighter cup
    masks = np.zeros((5, H, W), np.uint8)
    axes = (disc_r * rng.uniform(0.92, 1.0), disc_r * rng.uniform(1.0, 1.08))
    cv2.ellipse(masks[OD], (int(round(disc_c[0])), int(round(disc_c[1]))), (int(round(axes[0])), int(round(axes[1]))), 0, 0, 360, 1, -1)
    e = int(disc_r * 3.5)
    bx0, bx1 = max(0, int(disc_c[0]) - e), min(W, int(disc_c[0]) + e)
    by0, by1 = max(0, int(disc_c[1]) - e), min(H, int(disc_c[1]) + e)
    roi = img[by0:by1, bx0:bx1]
    d2_disc = ((xx[by0:by1, bx0:bx1] - disc_c[0]) / axes[0]) ** 2 + ((yy[by0:by1, bx0:bx1] - disc_c[1]) / axes[1]) ** 2
    od = masks[OD, by0:by1, bx0:bx1]
    disc_alpha = (od * (0.75 + 0.2 * np.exp(-d2_disc / 0.5)))[..., None]
    disc_col = np.array([250, 215, 150], np.float32) * rng.uniform(0.95, 1.02)
    roi = roi * (1 - disc_alpha) + disc_col * disc_alpha
    cup = (np.exp(-(d2_disc / 0.35**2)) * 0.5)[..., None]
    roi = roi * (1 - cup) + np.array([255, 245, 215], np.float32) * cup
    roi += (np.exp(-d2_disc / 2.5) * 25 * (1 - od))[..., None] * np.array([1.0, 0.8, 0.4], np.float32)  # peripapillary glow
    img[by0:by1, bx0:bx1] = roi

    # --- vessels: four arcades (artery + vein each) from the disc, curving around the macula
    arteries: Strokes = {}
    veins: Strokes = {}
    step = 4.0 * s
    for up in (-1.0, 1.0):
        for temporal in (True, False):
            if temporal:
                th0, turn, length = math.pi + up * rng.uniform(1.05, 1.35), -up * rng.uniform(0.032, 0.045), fov_r * rng.uniform(1.2, 1.5)
            else:
                th0, turn, length = up * rng.uniform(0.9, 1.3), -up * rng.uniform(0.0, 0.02), fov_r * rng.uniform(0.8, 1.0)
            for layer, thick, off in ((veins, 2.8 * s, 0.15), (arteries, 2.0 * s, -0.15)):
                th = th0 + off * up * (1 if temporal else -1)
                if side < 0:  # mirror horizontally for a left eye
                    th, t = math.pi - th, -turn
                else:
                    t = turn
                _vessel_tree(rng, layer, disc_c, th, length, thick, step, t, depth=2)
    # small twigs toward the macula, stopping short of the avascular fovea
    for _ in range(int(rng.integers(4, 8))):
        a = rng.uniform(0, 2 * np.pi)
        start = (fovea[0] + 1.8 * dd * math.cos(a), fovea[1] + 1.8 * dd * math.sin(a))
        pts = _walk(rng, start, a + math.pi + rng.normal(0, 0.3), int(1.1 * dd / (2 * s)), 2 * s, 0.0, 0.25)
        _polyline(arteries if rng.uniform() < 0.5 else veins, pts, 1)
    neo = target == 4
    if neo:  # neovascularisation: tangles of thin irregular vessels at / next to the disc
        for _ in range(int(rng.integers(2, 5))):
            angle, d = rng.uniform(0, 2 * np.pi), disc_r * rng.uniform(0.3, 1.8)
            c = (disc_c[0] + d * math.cos(angle), disc_c[1] + d * math.sin(angle))
            for _ in range(int(rng.integers(8, 15))):
                pts = _walk(rng, c, rng.uniform(0, 2 * np.pi), int(rng.integers(6, 14)), 1.6 * s, rng.normal(0, 0.3), 0.7)
                _polyline(veins, pts, 1)
    for layer, col, strength in ((veins, (120, 22, 18), 0.75), (arteries, (165, 45, 30), 0.6)):
        alpha = _draw_strokes(layer, (H, W)).astype(np.float32) * np.float32(strength / 255.0)
        img += (np.array(col, np.float32) * (shade * alpha)[..., None] - img * alpha[..., None])

    # --- lesions
    plan = _plan(rng, target, dme_grade)
    placer = _Placer(rng, size, fov_c, fov_r, disc_c, disc_r)
    placer.take(fovea[0], fovea[1], 0.12 * dd)  # keep the foveal pit itself clear of blots
    counts = dict.fromkeys(LESIONS[:4], 0)

    n_he = plan["he"]
    quadrants = [q for q in range(4) for _ in range(5)] if n_he >= SEVERE_HAEMORRHAGES else []
    for i in range(n_he):
        r = rng.uniform(3.0, 7.5) * s
        pos = placer.sample(r, quadrant=quadrants[i] if i < len(quadrants) else None)
        if pos is None:
            continue
        x, y = pos
        if rng.uniform() < 0.35:  # flame-shaped
            cv2.ellipse(masks[HE], (int(x), int(y)), (max(2, int(r * 1.5)), max(1, int(r * 0.55))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:  # dot-blot
            cv2.fillPoly(masks[HE], [_blob(rng, x, y, r)], 1)
        placer.take(x, y, r * 1.5)
        counts["haemorrhages"] += 1

    for _ in range(plan["ma"]):
        r = rng.uniform(1.0, 2.6) * s
        pos = placer.sample(r, max_radius=0.75)
        if pos is None:
            continue
        cv2.circle(masks[MA], (int(round(pos[0])), int(round(pos[1]))), max(1, int(round(r))), 1, -1)
        placer.take(pos[0], pos[1], r)
        counts["microaneurysms"] += 1

    for _ in range(plan["se"]):
        r = rng.uniform(5.0, 9.0) * s
        pos = placer.sample(r, max_radius=0.7)
        if pos is None:
            continue
        cv2.fillPoly(masks[SE], [_blob(rng, pos[0], pos[1], r, 14)], 1)
        placer.take(pos[0], pos[1], r * 1.3)
        counts["soft_exudates"] += 1

    if plan["ex_dme"] > 0:
        n_clusters = int(rng.integers(1, 4))
        for k in range(n_clusters):
            if k == 0 and plan["ex_dme"] == 2:
                centre = placer.sample(2 * s, near=fovea, near_r=0.7 * dd, tries=400)
            else:
                centre = placer.sample(6 * s, max_radius=0.8, avoid=fovea, avoid_r=dd + 10 * s)
            if centre is None:
                continue
            spread = rng.uniform(4, 10) * s
            for _ in range(int(rng.integers(3, 13))):
                r = rng.uniform(1.0, 3.0) * s
                pos = placer.sample(r, near=centre, near_r=spread, tries=20, avoid=None if k == 0 and plan["ex_dme"] == 2 else fovea, avoid_r=dd + 2)
                if pos is None:
                    continue
                cv2.fillPoly(masks[EX], [_blob(rng, pos[0], pos[1], r, 7)], 1)
                placer.take(pos[0], pos[1], r, margin=0)
                counts["hard_exudates"] += 1

    # --- paint the lesions exactly on their masks
    m = masks[HE].astype(bool) | masks[MA].astype(bool)
    img[m] *= np.array([0.6, 0.3, 0.36], np.float32)
    if masks[SE].any():
        se = masks[SE].astype(np.float32)
        soft = cv2.GaussianBlur(se, (0, 0), 2.5 * s) * se  # fluffy: strongest in the middle, fading to the edge
        soft = (0.2 + 0.55 * soft / max(float(soft.max()), 1e-6)) * se
        img = img * (1 - soft[..., None]) + np.array([240, 232, 205], np.float32) * soft[..., None]
    ex = masks[EX].astype(bool)
    img[ex] = 0.15 * img[ex] + 0.85 * np.array([245, 222, 95], np.float32) * rng.uniform(0.9, 1.0)

    # --- camera: global brightness / contrast / hue jitter, slight blur, noise, dark surround
    gain = np.array([rng.uniform(0.92, 1.08), rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)], np.float32)
    mean = float(img[::4, ::4][fov[::4, ::4]].mean()) * gain  # per channel
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(0.88, 1.1)
    img = img * (gain * contrast) + mean * (brightness - contrast)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9) * s)
    noise = _noise(rng, (H, W, 3))
    img += noise * np.float32(rng.uniform(1.5, 3.5))
    edge = np.clip((1.0 - np.sqrt(r2_fov)) * np.float32(fov_r / 1.5), 0, 1)[..., None]  # ~1.5 px soft rim
    img = img * edge + (2.5 + np.abs(noise[..., :1])) * (1 - edge)
    image = np.clip(img, 0, 255).astype(np.uint8)

    n_ex = counts["hard_exudates"]
    grade = dr_grade_from_lesions(counts["microaneurysms"], counts["haemorrhages"], n_ex, counts["soft_exudates"], neo)
    dme = dme_grade_from_mask(masks[EX], fovea, dd)
    return SyntheticFundus(
        image=image,
        masks=np.ascontiguousarray(masks.transpose(1, 2, 0)),
        dr_grade=grade,
        dme_grade=dme,
        eye=eye,
        fovea=(float(fovea[0]), float(fovea[1])),
        disc_center=(float(disc_c[0]), float(disc_c[1])),
        disc_diameter=float(dd),
        fov_center=(float(fov_c[0]), float(fov_c[1])),
        fov_radius=float(fov_r),
        lesion_counts=counts,
        neovascularisation=neo,
    )


# --------------------------------------------------------------------------------------------- dataset


def write_synthetic_dataset(folder: Path, n: int, size: int = 256, seed: int = 0, with_masks: bool = True) -> Path:
    """Write ``n`` synthetic images (two eyes per patient) plus IDRiD-style masks and ``labels.csv``.

    Layout: ``images/PatientNNN_{L,R}.jpg``, ``masks/PatientNNN_{L,R}_{MA,HE,EX,SE,OD}.png`` (single
    channel, 0/255; written only for lesions present in the image), ``labels.csv`` with
    ``CSV_COLUMNS``, all paths relative to ``folder``; mask cells are empty when the lesion is absent
    (or when ``with_masks`` is False). DR grades are balanced across 0-4. Returns the CSV path.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if with_masks:
        (folder / "masks").mkdir(parents=True, exist_ok=True)
    grades = np.random.default_rng([seed, 1]).permutation(np.arange(n) % 5)
    rows = []
    for i in range(n):
        patient = f"Patient{i // 2 + 1:03d}"
        eye = "LR"[i % 2]
        rng = np.random.default_rng([seed, 0, i])
        f = make_fundus(rng, size, int(grades[i]), eye=eye)
        stem = f"{patient}_{eye}"
        image_rel = f"images/{stem}.jpg"
        cv2.imwrite(str(folder / image_rel), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        row = {"image": image_rel, "patient_id": patient, "eye": eye, "dr_grade": f.dr_grade, "dme_grade": f.dme_grade}
        for k, (code, col) in enumerate(zip(LESION_CODES, MANIFEST_MASK_COLUMNS)):
            row[col] = ""
            if with_masks and f.masks[..., k].any():
                rel = f"masks/{stem}_{code}.png"
                cv2.imwrite(str(folder / rel), f.masks[..., k] * np.uint8(255))
                row[col] = rel
        rows.append(row)
    csv_path = folder / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return csv_path

"""Realistic ways a fundus photo becomes ungradable, and pictures that are not fundus photos, made in code.

Why: the real data sets here hold gradable photos only (Messidor-2's ``gradable`` column is 1 throughout), so the
gradability model (:mod:`training.quality`) learns the ungradable side from degradations of those real photos, each
with the reason a grader would give, and from generated non-fundus pictures. Every degradation has a *severe*
range (the photo is ungradable for that reason) and a *mild* range (still gradable: the model must not reject the
dim, slightly soft or slightly decentred photos that clinics send every day); the gap between the two keeps the
labels honest. Sizes scale with the field's diameter, so the same severity means the same thing at any resolution.

All functions take and return (H, W, 3) uint8 RGB frames and draw from the ``numpy`` generator they are given.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from training.common import FUNDUS_THRESHOLD

Rng = np.random.Generator


def _diameter(rgb: np.ndarray) -> float:
    lit = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > FUNDUS_THRESHOLD
    cols = np.flatnonzero(lit.mean(axis=0) > 0.01)
    rows = np.flatnonzero(lit.mean(axis=1) > 0.01)
    if cols.size < 2:
        return float(min(rgb.shape[:2]))
    return float(max(cols[-1] - cols[0], rows[-1] - rows[0] if rows.size > 1 else 0, 1))


def _field_mask(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > FUNDUS_THRESHOLD, np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(np.rint(x), 0, 255), np.uint8)


def _smooth_field(shape: tuple[int, int], rng: Rng, scale: float) -> np.ndarray:
    """A smooth random field in [0, 1] varying over ``scale`` of the image (uneven veils, shadows)."""
    h, w = shape
    small = rng.random((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    big = cv2.GaussianBlur(big, (0, 0), max(h, w) / 12)
    return np.asarray((big - big.min()) / max(float(big.max() - big.min()), 1e-6), np.float32)


def jpeg(rgb: np.ndarray, rng: Rng, quality: tuple[int, int] = (80, 96)) -> np.ndarray:
    """Re-encode as a camera would (the degraded photos must not differ from the real ones by their compression)."""
    q = int(rng.integers(quality[0], quality[1] + 1))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if decoded is None:
        raise RuntimeError("JPEG decoding failed")
    return np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


# ----------------------------------------------------------------------------------------------- degradations


def defocus(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """Out of focus: a disc (pillbox) blur, radius 0.7-2.5 % of the field's diameter when ungradable, <= 0.15 % when mild."""
    d = _diameter(rgb)
    radius = d * (rng.uniform(0.007, 0.025) if severe else rng.uniform(0.0, 0.0015))
    if radius < 0.5:
        return rgb
    k = int(np.ceil(radius)) * 2 + 1
    kernel = np.zeros((k, k), np.float32)
    cv2.circle(kernel, (k // 2, k // 2), max(1, int(round(radius))), 1.0, -1)
    return cv2.filter2D(rgb, -1, kernel / kernel.sum(), borderType=cv2.BORDER_CONSTANT)


def motion(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """The eye or camera moved: a line blur of 2-6 % of the diameter (ungradable) or <= 0.4 % (mild), any direction."""
    d = _diameter(rgb)
    length = d * (rng.uniform(0.02, 0.06) if severe else rng.uniform(0.0, 0.004))
    if length < 1.5:
        return rgb
    k = int(np.ceil(length)) | 1
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, rot, (k, k)), np.float32)
    return cv2.filter2D(rgb, -1, kernel / max(float(kernel.sum()), 1e-6), borderType=cv2.BORDER_CONSTANT)


def _sensor_noise(x: np.ndarray, rng: Rng, sigma: float) -> np.ndarray:
    return x + rng.normal(0, sigma, x.shape).astype(np.float32)


def under_exposed(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """Too little light: gain 0.04-0.14 with sensor noise (ungradable), 0.45-0.8 (mild: dim but readable)."""
    gain = rng.uniform(0.04, 0.14) if severe else rng.uniform(0.45, 0.8)
    gamma = rng.uniform(1.0, 1.4) if severe else 1.0
    x = 255.0 * (rgb.astype(np.float32) / 255.0) ** gamma * gain
    return _to_uint8(_sensor_noise(x, rng, rng.uniform(0.5, 2.0)))


def over_exposed(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """Too much light: gain 2.2-4.5 with a whitish flare, the bright field clipped (ungradable), 1.1-1.35 (mild)."""
    field = _field_mask(rgb)[..., None]
    x = rgb.astype(np.float32)
    if severe:
        x = np.asarray(x * rng.uniform(2.2, 4.5) + field * rng.uniform(20, 80), np.float32)
    else:
        x = x * rng.uniform(1.1, 1.35)
    return _to_uint8(x * field + rgb.astype(np.float32) * (1 - field))


def haze(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """A media opacity (cataract) or dirty lens: a milky, often yellowish veil of uneven density over a softened
    image; veil 55-85 % (ungradable) or <= 18 % (mild)."""
    field = _field_mask(rgb)[..., None]
    d = _diameter(rgb)
    x = rgb.astype(np.float32)
    if severe:
        x = np.asarray(cv2.GaussianBlur(x, (0, 0), d * rng.uniform(0.002, 0.006)), np.float32)
    density = (rng.uniform(0.55, 0.85) if severe else rng.uniform(0.0, 0.18))
    uneven = 0.75 + 0.5 * _smooth_field(rgb.shape[:2], rng, 4)[..., None]
    alpha = np.clip(density * uneven, 0, 0.95)
    level = float(np.percentile(x[field[..., 0] > 0], 75)) if field.any() else 128.0
    tint = np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.6, 0.95)], np.float32) * min(255.0, level * rng.uniform(1.0, 1.4))
    out = x * (1 - alpha) + tint * alpha
    return _to_uint8(out * field + rgb.astype(np.float32) * (1 - field))


def _shift(rgb: np.ndarray, dx: float, dy: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    m = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    return np.asarray(cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_CONSTANT), np.uint8)


def decentred(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """The field is cut off by the frame or shrunk (small pupil, wrong working distance): 35-60 % of the field
    left in the frame, or the lit field shrunk to 40-60 % of its diameter with a dark ring (ungradable); a shift of
    <= 4 % of the diameter (mild)."""
    h, w = rgb.shape[:2]
    d = _diameter(rgb)
    if not severe:
        dx, dy = rng.uniform(-0.04, 0.04, 2) * d
        return _shift(rgb, dx, dy)
    if rng.random() < 0.6:  # shifted out of the frame
        keep = rng.uniform(0.35, 0.6)
        shift = (1 - keep) * d
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = shift * np.cos(angle), shift * np.sin(angle)
        return _shift(rgb, dx, dy)
    # small pupil: only a central spot lit, fading to dark
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = _field_mask(rgb)
    ys, xs = np.nonzero(field)
    cy, cx = (ys.mean(), xs.mean()) if ys.size else (h / 2, w / 2)
    cx += rng.uniform(-0.1, 0.1) * d
    cy += rng.uniform(-0.1, 0.1) * d
    r = np.hypot(xx - cx, yy - cy) / (d / 2)
    keep_r = rng.uniform(0.4, 0.6)
    fade = np.clip((keep_r + 0.12 - r) / 0.12, 0, 1)[..., None]
    return _to_uint8(rgb.astype(np.float32) * fade)


def obscured(rgb: np.ndarray, rng: Rng, severe: bool) -> np.ndarray:
    """Eyelashes, a drooping lid or the pupil edge: a dark, soft-edged band or crescent from the rim over 32-55 %
    of the field's diameter, sometimes with bright eyelash streaks, or an orange-white edge reflex (ungradable);
    the same over <= 12 % (mild: real gradable photos often carry such a rim shadow or glare crescent)."""
    h, w = rgb.shape[:2]
    d = _diameter(rgb)
    field = _field_mask(rgb)
    ys, xs = np.nonzero(field)
    cy, cx = (ys.mean(), xs.mean()) if ys.size else (h / 2, w / 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    along = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / (d / 2)  # -1 .. 1 across the field
    cover = rng.uniform(0.32, 0.55) if severe else rng.uniform(0.0, 0.12)
    edge = 1 - 2 * cover  # covers the part of the field beyond this line (roughly ``cover`` of the diameter)
    curve = rng.uniform(-0.3, 0.3) * (((xx - cx) * -np.sin(angle) + (yy - cy) * np.cos(angle)) / (d / 2)) ** 2
    soft = rng.uniform(0.03, 0.12)
    shade = np.clip((along + curve - edge) / soft, 0, 1)
    x = rgb.astype(np.float32)
    if rng.random() < 0.3:  # bright edge reflex instead of a shadow
        reflex = np.array([255, rng.uniform(150, 230), rng.uniform(60, 160)], np.float32)
        out = x * (1 - 0.85 * shade[..., None]) + reflex * 0.85 * shade[..., None]
    else:
        out = x * (1 - rng.uniform(0.75, 0.97) * shade[..., None])
        if severe and rng.random() < 0.5:  # eyelash streaks across the shadow
            lashes = np.zeros((h, w), np.float32)
            for _ in range(int(rng.integers(4, 12))):
                p0 = (int(cx + rng.uniform(-0.5, 0.5) * d), int(cy + rng.uniform(-0.5, 0.5) * d))
                p1 = (int(p0[0] + rng.uniform(-0.4, 0.4) * d), int(p0[1] + rng.uniform(-0.4, 0.4) * d))
                cv2.line(lashes, p0, p1, 1.0, max(1, int(d * rng.uniform(0.004, 0.012))))
            lashes = cv2.GaussianBlur(lashes, (0, 0), max(1.0, d * 0.006)) * shade
            out = out + lashes[..., None] * rng.uniform(60, 160)
    return _to_uint8(out * field[..., None] + x * (1 - field[..., None]))


VERSIONS: dict[str, int] = {"obscured": 2, "zoomed_patch": 3, "recoloured": 2}
"""The version of each degradation and non-fundus kind whose definition changed (1 when absent): part of the key
under which ``dr-train fit-quality`` caches a picture's measurements."""

DEGRADATIONS: dict[str, tuple[str, Callable[[np.ndarray, Rng, bool], np.ndarray]]] = {
    "defocus": ("blurred", defocus),
    "motion": ("blurred", motion),
    "under_exposed": ("too_dark", under_exposed),
    "over_exposed": ("over_exposed", over_exposed),
    "haze": ("haze", haze),
    "decentred": ("field", decentred),
    "obscured": ("obscured", obscured),
}
"""Degradation name -> (the reason a grader gives, the function)."""


def degrade(rgb: np.ndarray, name: str, rng: Rng, severe: bool) -> np.ndarray:
    """``rgb`` through the degradation ``name`` (:data:`DEGRADATIONS`), then re-encoded as JPEG."""
    return jpeg(DEGRADATIONS[name][1](rgb, rng, severe), rng)


# ------------------------------------------------------------------------------------------ not fundus photos


def _canvas(rng: Rng) -> tuple[int, int]:
    side = int(rng.integers(256, 700))
    aspect = rng.uniform(0.66, 1.5)
    return max(128, int(side / np.sqrt(aspect))), max(128, int(side * np.sqrt(aspect)))


def _reddish(rng: Rng) -> np.ndarray:
    return np.array([rng.uniform(120, 255), rng.uniform(20, 140), rng.uniform(0, 80)], np.float32)


def flat_colour(rng: Rng) -> np.ndarray:
    h, w = _canvas(rng)
    colour = _reddish(rng) if rng.random() < 0.6 else rng.uniform(0, 255, 3).astype(np.float32)
    return _to_uint8(np.broadcast_to(colour, (h, w, 3)) + rng.normal(0, rng.uniform(0, 3), (h, w, 3)))


def gradient(rng: Rng) -> np.ndarray:
    h, w = _canvas(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        t = (xx * np.cos(a := rng.uniform(0, np.pi)) + yy * np.sin(a)) / max(h, w)
    else:
        t = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = _reddish(rng), _reddish(rng) * rng.uniform(0.2, 1.0)
    return _to_uint8(c0 * (1 - t[..., None]) + c1 * t[..., None])


def disc_on_black(rng: Rng) -> np.ndarray:
    """A red or orange disc on black: the shape and colour of a fundus photo with none of its content."""
    h, w = _canvas(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = min(h, w) * rng.uniform(0.3, 0.55)
    cy, cx = h / 2 + rng.uniform(-0.1, 0.1) * h, w / 2 + rng.uniform(-0.1, 0.1) * w
    r = np.hypot(xx - cx, yy - cy) / radius
    colour = _reddish(rng)
    shading = 1 - rng.uniform(0, 0.5) * r ** 2  # optional vignetting
    if rng.random() < 0.4:  # a brighter spot, like a disc
        sx, sy = cx + rng.uniform(-0.5, 0.5) * radius, cy + rng.uniform(-0.3, 0.3) * radius
        shading = shading + rng.uniform(0.2, 0.6) * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * (0.08 * radius) ** 2))
    img = colour * shading[..., None] * (r <= 1)[..., None]
    img = img + rng.normal(0, rng.uniform(0, 4), img.shape) * (r <= 1)[..., None]
    return _to_uint8(img)


def document(rng: Rng) -> np.ndarray:
    """Text on a light page (a scanned letter, a screenshot of a form)."""
    h, w = _canvas(rng)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(200, 256, 3).astype(np.uint8)
    words = ("Patient", "Date", "Visual acuity", "Referral", "Diabetes", "OD", "OS", "Dr.", "HbA1c", "Report", "Clinic")
    y = int(rng.integers(15, 40))
    while y < h - 10:
        x = int(rng.integers(5, 40))
        line = " ".join(str(rng.choice(words)) for _ in range(int(rng.integers(2, 8))))
        ink = tuple(float(v) for v in rng.uniform(0, 90, 3))
        cv2.putText(img, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.4, 1.0), ink, int(rng.integers(1, 3)))
        y += int(rng.integers(18, 40))
    if rng.random() < 0.5:
        cv2.rectangle(img, (10, 10), (w - 10, h - 10), (40, 40, 40), 2)
    return img


def texture(rng: Rng) -> np.ndarray:
    """A natural-looking random texture: 1/f noise in colour with a few soft shapes (foliage, skin, fabric...)."""
    h, w = _canvas(rng)
    out = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        spec = np.fft.fft2(rng.normal(size=(h, w)))
        fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
        f = np.sqrt(fx ** 2 + fy ** 2)
        f[0, 0] = 1.0
        field = np.real(np.fft.ifft2(spec / f ** rng.uniform(0.8, 1.6)))
        field = (field - field.mean()) / max(float(field.std()), 1e-6)
        out[..., c] = rng.uniform(60, 190) + field * rng.uniform(15, 60)
    for _ in range(int(rng.integers(0, 6))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, w // 3)), int(rng.integers(10, h // 3)))
        cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360, tuple(float(v) for v in rng.uniform(0, 255, 3)), -1)
    return _to_uint8(cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 2.0)))


def scrambled(rgb: np.ndarray, rng: Rng) -> np.ndarray:
    """A fundus photo cut into tiles and shuffled: its colours and fine texture, none of its anatomy."""
    h, w = rgb.shape[:2]
    tile = max(8, int(min(h, w) * rng.uniform(0.04, 0.2)))
    ny, nx = h // tile, w // tile
    tiles = [rgb[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] for y in range(ny) for x in range(nx)]
    order = rng.permutation(len(tiles))
    out = np.zeros((ny * tile, nx * tile, 3), np.uint8)
    for k, idx in enumerate(order):
        y, x = divmod(k, nx)
        out[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] = np.rot90(tiles[idx], int(rng.integers(0, 4)))
    return out


def zoomed_patch(rgb: np.ndarray, rng: Rng) -> np.ndarray:
    """A small piece of the inner fundus (5-20 % of the field's diameter, centred within 70 % of its radius)
    enlarged to fill the frame (a crop, a screenshot of a detail)."""
    field = _field_mask(rgb)
    ys, xs = np.nonzero(field)
    if ys.size == 0:
        return scrambled(rgb, rng)
    d = _diameter(rgb)
    side = max(8, int(d * rng.uniform(0.05, 0.2)))
    inner = np.hypot(ys - ys.mean(), xs - xs.mean()) < 0.35 * d
    if inner.any():
        ys, xs = ys[inner], xs[inner]
    k = int(rng.integers(0, ys.size))
    y0 = int(np.clip(ys[k] - side // 2, 0, rgb.shape[0] - side))
    x0 = int(np.clip(xs[k] - side // 2, 0, rgb.shape[1] - side))
    patch = rgb[y0:y0 + side, x0:x0 + side]
    return cv2.resize(patch, (512, 512), interpolation=cv2.INTER_CUBIC)


def recoloured(rgb: np.ndarray, rng: Rng) -> np.ndarray:
    """A fundus photo whose colours are no longer a colour fundus photo's: grey (red-free), negative, or blue where red
    should be. (Not a red-green swap: real photos with a strong green or yellow cast exist, see EyePACS 768_left.)"""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        grey = rgb[..., 1] if rng.random() < 0.5 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return np.repeat(grey[..., None], 3, axis=2)
    if kind == 1:
        return 255 - rgb
    perm = ([2, 1, 0], [1, 2, 0])[int(rng.integers(0, 2))]
    return np.ascontiguousarray(rgb[..., perm])


_GENERATORS = {"flat_colour": flat_colour, "gradient": gradient, "disc_on_black": disc_on_black, "document": document,
               "texture": texture}
_TRANSFORMS = {"scrambled": scrambled, "zoomed_patch": zoomed_patch, "recoloured": recoloured}
GENERATED = tuple(_GENERATORS)
FROM_PHOTOS = tuple(_TRANSFORMS)
NOT_FUNDUS = GENERATED + FROM_PHOTOS


def not_fundus(name: str, rng: Rng, photo: np.ndarray | None = None) -> np.ndarray:
    """One non-fundus picture of kind ``name`` (:data:`NOT_FUNDUS`); the ``FROM_PHOTOS`` kinds transform ``photo``."""
    if name in _TRANSFORMS:
        if photo is None:
            raise ValueError(f"{name} transforms a fundus photo; pass one")
        img = _TRANSFORMS[name](photo, rng)
    elif name in _GENERATORS:
        img = _GENERATORS[name](rng)
    else:
        raise ValueError(f"unknown non-fundus kind {name!r}; expected one of {NOT_FUNDUS}")
    return jpeg(img, rng)


__all__ = ["DEGRADATIONS", "VERSIONS", "FROM_PHOTOS", "GENERATED", "NOT_FUNDUS", "degrade", "jpeg", "not_fundus"]

"""Preprocessing cache: each record's fundus crop + masks at one size, stored once as a ``.npz``.

The file name carries a hash of (absolute image path, its size and mtime, each mask file's path,
size and mtime, the target size, :data:`PREPROCESS_VERSION`). Changing an input file, the size or
the preprocessing code (bump the version) therefore gives a new key and the entry is rebuilt;
unchanged inputs reuse the stored arrays. Writes go to a temporary file that is then
``os.replace``-d into place, so concurrent DataLoader workers and interrupted runs never leave a
half-written entry. Stale entries are simply no longer used (delete ``cache_dir`` to reclaim space).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from training.common import atomic_write
from training.data.records import Record
from training.data.transforms import preprocess_fundus
from training.model import LESIONS

# Bump whenever preprocess_fundus or the reading below changes what ends up in the cache.
PREPROCESS_VERSION = 1
NUM_LESIONS = len(LESIONS)


class ImageReadError(ValueError):
    """An image or mask file is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class CachedImage:
    """One preprocessed record: ``image`` (S, S, 3) uint8 RGB; ``masks`` (S, S, 5) uint8 {0, 1} or None."""

    image: np.ndarray
    masks: np.ndarray | None

    @classmethod
    def load(cls, path: str | Path) -> "CachedImage":
        with np.load(path, allow_pickle=False) as data:
            image = data["image"]
            masks = data["masks"] if "masks" in data.files else None
        return cls(image=image, masks=masks)

    def save(self, path: str | Path) -> None:
        """Atomic write (:func:`training.common.atomic_write`; not fsynced: the cache can be rebuilt)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"image": self.image} if self.masks is None else {"image": self.image, "masks": self.masks}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: savez would append ".npz" to a name
                np.savez_compressed(fh, allow_pickle=False, **arrays)

        atomic_write(path, write, durable=False)


# ------------------------------------------------------------------------------------------- reading


def _read_bytes(path: Path, what: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read {what} {path}: {exc}") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; error naming the file when missing or not a decodable image."""
    path = Path(path)
    data = _read_bytes(path, "image")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"cannot decode image {path}: the file is empty, truncated or not an image; replace or remove it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 {0, 1}: any non-zero value in any colour channel (alpha ignored) is lesion."""
    path = Path(path)
    data = _read_bytes(path, "mask")
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ImageReadError(f"cannot decode mask {path}: the file is empty, truncated or not an image; replace or remove it")
    lesion = np.asarray(mask != 0)
    if lesion.ndim == 3:
        lesion = np.any(lesion[..., :3], axis=2) if lesion.shape[2] >= 3 else lesion[..., 0]
    return lesion.astype(np.uint8)


def read_masks(record: Record, shape: tuple[int, int]) -> np.ndarray | None:
    """(H, W, 5) uint8 for a record with masks (absent lesion -> zeros); None when it has none."""
    if record.masks is None:
        return None
    if len(record.masks) != NUM_LESIONS:
        raise ImageReadError(f"{record.image}: record has {len(record.masks)} mask entries, expected {NUM_LESIONS} ({LESIONS})")
    out = np.zeros((*shape, NUM_LESIONS), dtype=np.uint8)
    for k, mask_path in enumerate(record.masks):
        if mask_path is None:
            continue
        mask = read_mask(mask_path)
        if mask.shape != shape:
            raise ImageReadError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {record.image} is "
                f"{shape[1]}x{shape[0]}; masks must match their image's size"
            )
        out[..., k] = mask
    return out


def preprocess_record(record: Record, size: int) -> CachedImage:
    """Read a record's image and masks and run :func:`preprocess_fundus` (no caching)."""
    image = read_rgb(record.image)
    masks = read_masks(record, image.shape[:2])
    image, masks = preprocess_fundus(image, size, masks)
    return CachedImage(image=np.ascontiguousarray(image, dtype=np.uint8), masks=None if masks is None else masks.astype(np.uint8))


# ------------------------------------------------------------------------------------------------ keys


def _file_stamp(path: Path) -> list[object]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageReadError(f"file not found: {path} (listed by the data source; was it moved or deleted?)") from None
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(record: Record, size: int) -> str:
    """Hex digest identifying the inputs and settings of one cache entry."""
    payload = {
        "version": PREPROCESS_VERSION,
        "size": int(size),
        "image": _file_stamp(Path(record.image)),
        "masks": None if record.masks is None else [None if m is None else _file_stamp(Path(m)) for m in record.masks],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(record: Record, size: int, cache_dir: str | Path) -> Path:
    """Where the entry for (record, size) lives: ``<cache_dir>/<size>/<stem>-<hash>.npz``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(record.image).stem)[:60]
    return Path(cache_dir) / str(size) / f"{stem}-{cache_key(record, size)[:24]}.npz"


# ------------------------------------------------------------------------------------------------- API


def ensure_cached(record: Record, size: int, cache_dir: str | Path) -> Path:
    """Build the entry for (record, size) unless a valid one exists; return its path."""
    path = cache_path(record, size, cache_dir)
    if not path.is_file():
        preprocess_record(record, size).save(path)
    return path


def load_record(record: Record, size: int, cache_dir: str | Path) -> CachedImage:
    """The cached arrays for a record, building (or rebuilding an unreadable entry) when needed."""
    path = ensure_cached(record, size, cache_dir)
    try:
        return CachedImage.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        entry = preprocess_record(record, size)
        entry.save(path)
        return entry


def build_cache(records: Sequence[Record], size: int, cache_dir: str | Path, progress: bool = True) -> list[Path]:
    """Preprocess every record not yet cached at ``size``; return each record's entry path (input order)."""
    paths = []
    for record in tqdm(records, desc=f"preprocessing to {size}px", unit="img", disable=not progress):
        paths.append(ensure_cached(record, size, cache_dir))
    return paths

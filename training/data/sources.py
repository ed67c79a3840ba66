"""Readers turning each supported data layout into :class:`~training.data.records.Record` lists.

Layouts (see ``config.toml`` ``[data].sources``):

* ``idrid-segmentation``: the official IDRiD "A. Segmentation" folder. One record per image with
  five lesion masks; a missing mask file means that lesion is absent (the official convention).
* ``idrid-grading``: the official IDRiD "B. Disease Grading" folder (label CSV + images).
* ``kaggle``: ``<root>/<split>/images/*`` with ``<root>/<split>/annotations.csv``.
* ``manifest``: a CSV with ``image, patient_id, eye, dr_grade, <dme column>`` and optional mask
  columns; paths are relative to the CSV's folder.

Every reader fails with :class:`DataSourceError` naming the file or folder and what was expected.
CSVs are read with the :mod:`csv` module (pandas is not a declared dependency). Header cells are
whitespace-normalised and matched case-insensitively; empty trailing columns (IDRiD's quirk) are ignored.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from training.config import (
    DataSettings,
    IdridGradingSource,
    IdridSegmentationSource,
    KaggleSource,
    ManifestSource,
)
from training.data.records import DME_PRESENT, DME_UNKNOWN, DR_UNKNOWN, Record
from training.labels import LESION_KEYS
from training.model import LESION_CODES

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png", ".bmp", ".gif", ".jpg", ".jpeg")
DR_VALUES: frozenset[int] = frozenset(range(5))
DME_VALUES: frozenset[int] = frozenset(range(3))
BINARY_VALUES: frozenset[int] = frozenset((0, 1))

# Official IDRiD lesion folder names, in LESION_CODES order, with accepted spellings (normalised).
IDRID_LESION_FOLDERS: tuple[str, ...] = (
    "1. Microaneurysms", "2. Haemorrhages", "3. Hard Exudates", "4. Soft Exudates", "5. Optic Disc",
)
_LESION_ALIASES: tuple[frozenset[str], ...] = (
    frozenset({"microaneurysms", "microaneurysm", "ma"}),
    frozenset({"haemorrhages", "hemorrhages", "haemorrhage", "hemorrhage", "he"}),
    frozenset({"hardexudates", "hardexudate", "ex"}),
    frozenset({"softexudates", "softexudate", "se"}),
    frozenset({"opticdisc", "od"}),
)
# Manifest mask columns, in LESION_CODES order.
MANIFEST_MASK_COLUMNS: tuple[str, ...] = tuple(f"{key}_mask" for key in LESION_KEYS)
IDRID_GRADING_COLUMNS: tuple[str, ...] = ("Image name", "Retinopathy grade", "Risk of macular edema")
KAGGLE_COLUMNS: tuple[str, ...] = IDRID_GRADING_COLUMNS
_EYES: dict[str, str] = {"l": "L", "left": "L", "os": "L", "r": "R", "right": "R", "od": "R"}
_EYE_SUFFIX = re.compile(r"^(?P<patient>.+?)[_-](?P<eye>left|right|L|R|OD|OS)$", re.IGNORECASE)

SourceSettings = Union[IdridSegmentationSource, IdridGradingSource, KaggleSource, ManifestSource]


class DataSourceError(ValueError):
    """A data source is missing, malformed or inconsistent; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------- helpers


def _normalise_header(cell: str) -> str:
    return " ".join(cell.replace("\ufeff", "").replace("\xa0", " ").split())


def _norm_name(name: str) -> str:
    """'2. Haemorrhages' -> 'haemorrhages': drops a leading number and all non-letters."""
    name = re.sub(r"^\s*[0-9a-z]\s*[.)]\s*", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z]", "", name.lower())


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else None
        hint = f"; {parent} holds {found}" if found is not None else f"; {parent} does not exist either"
        raise DataSourceError(f"{what}: folder not found: {path}{hint}. Check the source's 'path' in the config file (--config).")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataSourceError(f"{what}: file not found: {path}. Check the source's 'path' in the config file (--config).")
    return path


def _find_child_dir(parent: Path, names: Sequence[str], what: str) -> Path:
    """The sub-folder of ``parent`` named one of ``names`` (exactly, else by normalised name)."""
    require_dir(parent, what)
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    wanted = {_norm_name(n) for n in names}
    for child in sorted(parent.iterdir()):
        if child.is_dir() and _norm_name(child.name) in wanted:
            return child
    found = sorted(p.name for p in parent.iterdir() if p.is_dir())
    raise DataSourceError(
        f"{what}: no folder named {list(names)} in {parent} (found sub-folders {found}). "
        "Is 'path' pointing at the right folder of the official layout?"
    )


def _list_files(folder: Path, extensions: Iterable[str]) -> list[Path]:
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


@dataclass(frozen=True)
class CsvTable:
    """Rows of a CSV keyed by normalised header; ``line`` numbers are 1-based file lines for messages."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]


def read_csv(path: Path, required: Sequence[str], what: str, optional: Sequence[str] = ()) -> CsvTable:
    """Read a CSV, dropping empty header columns and blank rows; check ``required`` columns are present.

    Returned row dicts are keyed by the given spelling for ``required`` and ``optional`` columns
    (matched case-insensitively after whitespace normalisation) and by the normalised header otherwise.
    """
    require_file(path, what)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{what}: CSV {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                              "UTF-8 (in a spreadsheet: 'CSV UTF-8') and try again") from None
    except (OSError, csv.Error) as exc:
        raise DataSourceError(f"{what}: cannot read CSV {path}: {exc}") from None
    if not lines:
        raise DataSourceError(f"{what}: CSV {path} is empty; expected a header with columns {list(required)}")
    header = [_normalise_header(c) for c in lines[0]]
    by_lower = {h.lower(): i for i, h in enumerate(header) if h}
    canonical = {r.lower(): r for r in (*optional, *required)}
    missing = [r for r in required if r.lower() not in by_lower]
    if missing:
        found = [h for h in header if h]
        raise DataSourceError(
            f"{what}: CSV {path} lacks column(s) {missing}; found columns {found}. "
            f"Expected at least {list(required)} (header matching ignores case and extra spaces)."
        )
    keys = {i: canonical.get(h.lower(), h) for h, i in by_lower.items()}
    rows: list[tuple[int, dict[str, str]]] = []
    for lineno, cells in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        rows.append((lineno, {k: (cells[i].strip() if i < len(cells) else "") for i, k in keys.items()}))
    return CsvTable(path, tuple(keys.values()), tuple(rows))


def parse_label(value: str, allowed: frozenset[int], where: str, column: str) -> int | None:
    """An integer label from a CSV cell; ``None`` for an empty cell; error naming file/line otherwise."""
    value = value.strip()
    if value == "" or value.lower() in {"na", "nan", "none", "unknown"}:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number or number != int(number) or int(number) not in allowed:
        raise DataSourceError(f"{where}: column '{column}' has {value!r}; expected one of {sorted(allowed)} or empty")
    return int(number)


def _dme_code(value: str, binary: bool, where: str, column: str) -> int:
    label = parse_label(value, BINARY_VALUES if binary else DME_VALUES, where, column)
    if label is None:
        return DME_UNKNOWN
    if binary:
        # A binary maculopathy flag cannot tell risk 1 from risk 2: 1 -> "present, grade unknown".
        return DME_PRESENT if label == 1 else 0
    return label


def _dr_code(value: str, where: str, column: str) -> int:
    label = parse_label(value, DR_VALUES, where, column)
    return DR_UNKNOWN if label is None else label


def _report_missing(missing: Sequence[str], what: str, skip_missing: bool) -> None:
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    if skip_missing:
        warnings.warn(f"{what}: skipped {len(missing)} listed image(s) not found: {shown}", stacklevel=3)
        return
    raise DataSourceError(
        f"{what}: {len(missing)} listed image(s) not found: {shown}. "
        "Place the images there, fix the CSV, or load with skip_missing=True to skip them with a warning."
    )


class _ImageIndex:
    """File lookup in one folder by exact name or by stem (CSV names often omit the extension)."""

    def __init__(self, folder: Path) -> None:
        files = _list_files(folder, IMAGE_EXTENSIONS) if folder.is_dir() else []
        self.by_name = {p.name.lower(): p for p in files}
        self.by_stem: dict[str, Path] = {}
        for p in files:
            self.by_stem.setdefault(p.stem.lower(), p)

    def find(self, name: str) -> Path | None:
        key = name.strip().lower()
        return self.by_name.get(key) or self.by_stem.get(key)


# ------------------------------------------------------------------------------------ IDRiD segmentation


def _lesion_folders(gt_subset: Path) -> list[Path]:
    folders = []
    children = [c for c in sorted(gt_subset.iterdir()) if c.is_dir()]
    for official, aliases in zip(IDRID_LESION_FOLDERS, _LESION_ALIASES):
        match = gt_subset / official if (gt_subset / official).is_dir() else None
        match = match or next((c for c in children if _norm_name(c.name) in aliases), None)
        if match is None:
            raise DataSourceError(
                f"IDRiD segmentation: no '{official}' mask folder in {gt_subset} "
                f"(found {[c.name for c in children]}). Expected one folder per lesion: {list(IDRID_LESION_FOLDERS)}."
            )
        folders.append(match)
    return folders


def _mask_index(folder: Path) -> dict[str, Path]:
    return {p.stem.lower(): p for p in _list_files(folder, MASK_EXTENSIONS)}


def load_idrid_segmentation(settings: IdridSegmentationSource) -> list[Record]:
    """One record per image in ``1. Original Images/<subset>``; masks from ``2. All Segmentation Groundtruths``."""
    root = require_dir(Path(settings.path), "IDRiD segmentation")
    images_dir = _find_child_dir(_find_child_dir(root, ["1. Original Images"], "IDRiD segmentation"), [settings.subset], "IDRiD segmentation images")
    gt_dir = _find_child_dir(
        _find_child_dir(root, ["2. All Segmentation Groundtruths"], "IDRiD segmentation"), [settings.subset], "IDRiD segmentation masks"
    )
    indexes = [_mask_index(f) for f in _lesion_folders(gt_dir)]
    images = _list_files(images_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DataSourceError(f"IDRiD segmentation: no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    records = []
    for image in images:
        masks = tuple(idx.get(f"{image.stem}_{code}".lower()) for idx, code in zip(indexes, LESION_CODES))
        records.append(Record(image=image, patient_id=image.stem, source="idrid-segmentation", masks=masks))
    return records


# ----------------------------------------------------------------------------------------- IDRiD grading


def _grading_csv(gt_dir: Path, subset: str) -> Path:
    word = "training" if subset == "train" else "testing"
    found = [p for p in sorted(gt_dir.glob("*.csv")) if word in p.name.lower()]
    if not found:
        raise DataSourceError(
            f"IDRiD grading: no '{word}' labels CSV in {gt_dir} (found {[p.name for p in gt_dir.glob('*')]}); "
            f"expected e.g. '{'a' if subset == 'train' else 'b'}. IDRiD_Disease Grading_{word.title()} Labels.csv'"
        )
    return found[0]


def load_idrid_grading(settings: IdridGradingSource, skip_missing: bool = False) -> list[Record]:
    """Records from the official grading CSV; images from ``1. Original Images/<a. Training|b. Testing> Set``.

    A listed image that is absent is an error naming it, unless ``skip_missing`` (then a warning).
    """
    root = require_dir(Path(settings.path), "IDRiD grading")
    gt_dir = _find_child_dir(root, ["2. Groundtruths"], "IDRiD grading")
    csv_path = _grading_csv(gt_dir, settings.subset)
    table = read_csv(csv_path, IDRID_GRADING_COLUMNS, "IDRiD grading")
    subset_name = "a. Training Set" if settings.subset == "train" else "b. Testing Set"
    images_dir = root / "1. Original Images" / subset_name
    if not images_dir.is_dir():
        message = (
            f"IDRiD grading: images folder not found: {images_dir}; {csv_path.name} lists {len(table.rows)} images "
            "that should be there. Download the IDRiD grading images into it"
        )
        if not skip_missing:
            raise DataSourceError(message + ", or load with skip_missing=True to skip them with a warning.")
        warnings.warn(message + "; skipping all of them.", stacklevel=2)
        return []
    index = _ImageIndex(images_dir)
    records, missing = [], []
    for lineno, row in table.rows:
        where = f"{csv_path}, line {lineno}"
        name = row["Image name"]
        image = index.find(name)
        if image is None:
            missing.append(str(images_dir / f"{name}.jpg"))
            continue
        records.append(Record(
            image=image, patient_id=image.stem, source="idrid-grading",
            dr_grade=_dr_code(row["Retinopathy grade"], where, "Retinopathy grade"),
            dme_grade=_dme_code(row["Risk of macular edema"], False, where, "Risk of macular edema"),
        ))
    _report_missing(missing, "IDRiD grading", skip_missing)
    return records


# -------------------------------------------------------------------------------------------------- Kaggle


def patient_and_eye(stem: str) -> tuple[str, str | None]:
    """'10_left' -> ('10', 'L'); names without an eye suffix are their own patient."""
    m = _EYE_SUFFIX.match(stem)
    return (m["patient"], _EYES[m["eye"].lower()]) if m else (stem, None)


def load_kaggle(settings: KaggleSource, skip_missing: bool = False) -> list[Record]:
    """Records from ``<root>/<split>/annotations.csv`` + ``<root>/<split>/images`` for each configured split.

    The source's own splits are *not* kept: :func:`training.data.split.split_by_patient` splits by patient.
    """
    root = require_dir(Path(settings.path), "Kaggle")
    records: list[Record] = []
    for split in settings.splits:
        split_dir = require_dir(root / split, f"Kaggle split '{split}'")
        images_dir = require_dir(split_dir / "images", f"Kaggle split '{split}'")
        csv_path = split_dir / "annotations.csv"
        table = read_csv(csv_path, KAGGLE_COLUMNS, f"Kaggle split '{split}'")
        index = _ImageIndex(images_dir)
        missing = []
        for lineno, row in table.rows:
            where = f"{csv_path}, line {lineno}"
            image = index.find(row["Image name"])
            if image is None:
                missing.append(str(images_dir / row["Image name"]))
                continue
            patient, eye = patient_and_eye(image.stem)
            records.append(Record(
                image=image, patient_id=patient, eye=eye, source="kaggle",
                dr_grade=_dr_code(row["Retinopathy grade"], where, "Retinopathy grade"),
                dme_grade=_dme_code(row["Risk of macular edema"], False, where, "Risk of macular edema"),
            ))
        _report_missing(missing, f"Kaggle split '{split}'", skip_missing)
    return records


# ------------------------------------------------------------------------------------------------ manifest


def _manifest_masks(row: dict[str, str], mask_columns: Sequence[str], base: Path, where: str) -> tuple[Path | None, ...] | None:
    """Mask paths of a row; ``None`` when every mask cell is empty (an image is never annotated with no optic disc)."""
    if not mask_columns:
        return None
    cells = [row.get(c, "") for c in MANIFEST_MASK_COLUMNS]
    if not any(cells):
        return None
    masks: list[Path | None] = []
    for column, cell in zip(MANIFEST_MASK_COLUMNS, cells):
        if not cell:
            masks.append(None)
            continue
        path = base / cell
        if not path.is_file():
            raise DataSourceError(f"{where}: mask in column '{column}' not found: {path}")
        masks.append(path)
    return tuple(masks)


def _eye_code(value: str, where: str) -> str | None:
    """'L'/'R' from L, R, OS, OD, left, right (any case); None for an empty cell."""
    value = value.strip()
    if not value:
        return None
    try:
        return _EYES[value.lower()]
    except KeyError:
        raise DataSourceError(f"{where}: column 'eye' has {value!r}; expected L, R, OD, OS, left, right or empty") from None


def _gradable(value: str, where: str) -> bool | None:
    label = parse_label(value, BINARY_VALUES, where, "gradable")
    return None if label is None else bool(label)


def load_manifest(settings: ManifestSource, skip_missing: bool = False) -> list[Record]:
    """Records from a manifest CSV (``image, [patient_id], [eye], dr_grade, [<dme_column>], [gradable], [*_mask]``).

    Empty label cells mean unknown. With ``dme_binary`` the DME column is a present/absent flag:
    1 -> ``DME_PRESENT`` (risk present, grade unknown), 0 -> 0. Without ``patient_id`` each image
    is its own patient (its file stem). A CSV without the default ``dme_grade`` column has no DME
    labels (EyePACS publishes none); a ``dme_column`` named in the config must exist. ``eye`` is
    normalised to L/R; ``gradable`` (0/1) is the graders' verdict where published.
    """
    csv_path = Path(settings.path)
    what = f"manifest {csv_path.parent.name}"
    dme_required = settings.dme_column != "dme_grade"
    required = ("image", "dr_grade", settings.dme_column) if dme_required else ("image", "dr_grade")
    table = read_csv(csv_path, required, what,
                     optional=("patient_id", "eye", "gradable", "dme_grade", *MANIFEST_MASK_COLUMNS))
    has_dme = settings.dme_column in table.columns
    mask_columns = [c for c in MANIFEST_MASK_COLUMNS if c in table.columns]
    base = csv_path.parent
    records, missing = [], []
    for lineno, row in table.rows:
        where = f"{csv_path}, line {lineno}"
        if not row["image"]:
            raise DataSourceError(f"{where}: empty 'image' cell")
        image = base / row["image"]
        if not image.is_file():
            missing.append(str(image))
            continue
        records.append(Record(
            image=image,
            patient_id=row.get("patient_id") or image.stem,
            eye=_eye_code(row.get("eye", ""), where),
            source=settings.source_name,
            dr_grade=_dr_code(row["dr_grade"], where, "dr_grade"),
            dme_grade=(_dme_code(row[settings.dme_column], settings.dme_binary, where, settings.dme_column)
                       if has_dme else DME_UNKNOWN),
            masks=_manifest_masks(row, mask_columns, base, where),
            gradable=_gradable(row.get("gradable", ""), where),
        ))
    _report_missing(missing, what, skip_missing)
    return records


# ---------------------------------------------------------------------------------------------- dispatch


def load_records(source: SourceSettings) -> list[Record]:
    """Records of one configured source (strict: a listed but absent image is an error)."""
    if isinstance(source, IdridSegmentationSource):
        return load_idrid_segmentation(source)
    if isinstance(source, IdridGradingSource):
        return load_idrid_grading(source)
    if isinstance(source, KaggleSource):
        return load_kaggle(source)
    if isinstance(source, ManifestSource):
        return load_manifest(source)
    raise TypeError(f"unsupported data source settings {type(source).__name__}")


def load_all(data: DataSettings) -> list[Record]:
    """Records of every configured source, in config order; an image listed twice is an error."""
    if not data.sources:
        raise DataSourceError("no data sources configured: add entries to [data].sources in the config file (--config)")
    records: list[Record] = []
    seen: dict[Path, str] = {}
    for source in data.sources:
        listed = load_records(source)
        if not listed:  # a header-only manifest: 'cached 0 images', then 'add sources' with a source configured
            raise DataSourceError(f"the {source.kind} source {getattr(source, 'path', '')} lists no images: add its rows "
                                  "or remove it from [data].sources")
        for rec in listed:
            key = rec.image.resolve()
            if key in seen and seen[key] == rec.source:
                raise DataSourceError(f"image {rec.image} is listed twice by {rec.source}: remove the repeated row from its CSV")
            if key in seen:
                raise DataSourceError(
                    f"image {rec.image} is listed by two sources ({seen[key]} and {rec.source}); "
                    "remove one of them from [data].sources or from its CSV"
                )
            seen[key] = rec.source
            records.append(rec)
    return records

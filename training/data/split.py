"""Patient-level train/val/test split, stratified by each patient's worst label.

All images of one patient land on the same side (two eyes of one person are not independent).
Patients are grouped into strata by (worst DR grade, worst DME code, has lesion masks); within a
stratum they are shuffled with the seed, then dealt out along one running quota so every split gets
its share of each stratum and the overall patient counts match the fractions (rounded).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from training.data.records import Record

if TYPE_CHECKING:
    from training.config import DataSettings

SPLITS: tuple[str, str, str] = ("train", "val", "test")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")


def group_by_patient(records: Sequence[Record]) -> dict[str, list[int]]:
    """Record indices per patient id, in first-seen order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[rec.patient_id].append(i)
    return dict(groups)


def patient_stratum(records: Sequence[Record]) -> tuple[int, int, bool]:
    """Worst DR grade, worst DME code (-1 unknown) and whether any image has lesion masks."""
    return (
        max(r.dr_grade for r in records),
        max(r.dme_grade for r in records),
        any(r.has_masks for r in records),
    )


def split_by_patient(
    records: Sequence[Record], val_fraction: float, test_fraction: float, seed: int,
    pinned: Mapping[str, str] | None = None,
) -> dict[str, list[Record]]:
    """Split records into ``train``/``val``/``test`` with no patient on two sides; same seed, same split.

    The result does not depend on the input order. Records keep their input order within each split.
    ``pinned`` maps patient ids to the side they must stay on (an earlier split this one extends); the
    other patients are dealt out as usual.
    """
    _check_fractions(val_fraction, test_fraction)
    pinned = dict(pinned or {})
    bad = sorted({v for v in pinned.values() if v not in SPLITS})
    if bad:
        raise ValueError(f"pinned split names must be one of {SPLITS}, got {bad}")
    groups = group_by_patient(records)
    strata: dict[tuple[int, int, bool], list[str]] = defaultdict(list)
    for patient, idx in groups.items():
        if patient not in pinned:
            strata[patient_stratum([records[i] for i in idx])].append(patient)

    rng = random.Random(seed)
    assignment: dict[str, str] = {p: side for p, side in pinned.items() if p in groups}
    # Running quotas start at 0.5 so that each split gets round(n * fraction) patients overall.
    quota = {"test": 0.5, "val": 0.5}
    for key in sorted(strata):
        patients = sorted(strata[key])
        rng.shuffle(patients)
        for patient in patients:
            quota["test"] += test_fraction
            quota["val"] += val_fraction
            if quota["test"] >= 1.0:
                quota["test"] -= 1.0
                assignment[patient] = "test"
            elif quota["val"] >= 1.0:
                quota["val"] -= 1.0
                assignment[patient] = "val"
            else:
                assignment[patient] = "train"

    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for rec in records:
        out[assignment[rec.patient_id]].append(rec)
    return out


def pinned_sides(split: Mapping[str, Sequence[Record]]) -> dict[str, str]:
    """Patient id -> side of an existing split (for ``split_by_patient(..., pinned=...)``)."""
    return {r.patient_id: side for side, recs in split.items() for r in recs}


def configured_split(
    data: "DataSettings", records: Sequence[Record] | None = None, val_fraction: float | None = None,
    test_fraction: float | None = None, seed: int | None = None,
) -> dict[str, list[Record]]:
    """The split of ``[data]``'s sources (or of ``records``), honouring ``[data] pin_split``.

    Fractions and seed default to the settings' (a checkpoint passes the ones it recorded). A pinned config's
    own split is rebuilt the same way (its own pin included), and its patients keep their side here.
    """
    from training.config import load_training_config
    from training.data.sources import load_all

    records = load_all(data) if records is None else records
    pinned: dict[str, str] = {}
    if data.pin_split is not None:
        other = load_training_config(data.pin_split).data
        pinned = pinned_sides(configured_split(other))
    return split_by_patient(
        records, data.val_fraction if val_fraction is None else val_fraction,
        data.test_fraction if test_fraction is None else test_fraction, data.split_seed if seed is None else seed,
        pinned,
    )

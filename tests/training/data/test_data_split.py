"""Patient-level split: no leakage, reproducible, proportions roughly right, seg-only images split too."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data.records import Record
from training.data.split import split_by_patient


def _records() -> list[Record]:
    recs = []
    for p in range(60):
        for eye in ("L", "R"):
            recs.append(Record(image=Path(f"/x/P{p}_{eye}.jpg"), patient_id=f"P{p}", source="m", eye=eye, dr_grade=p % 5, dme_grade=p % 2))
    for i in range(20):
        recs.append(Record(image=Path(f"/x/IDRiD_{i}.jpg"), patient_id=f"IDRiD_{i}", source="seg", masks=(None,) * 5))
    return recs


def test_no_patient_on_two_sides_and_everything_assigned() -> None:
    recs = _records()
    split = split_by_patient(recs, 0.15, 0.15, seed=13)
    patients = {k: {r.patient_id for r in v} for k, v in split.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"] or patients["val"] & patients["test"])
    assert sorted(map(str, (r.image for v in split.values() for r in v))) == sorted(str(r.image) for r in recs)
    n_patients = 80
    for name, frac in (("val", 0.15), ("test", 0.15)):
        assert abs(len(patients[name]) - frac * n_patients) <= 1
    for name in ("train", "val", "test"):  # seg-only images reach every split
        assert any(r.has_masks for r in split[name]), name
    assert {r.dr_grade for r in split["train"] if r.has_grade} == {0, 1, 2, 3, 4}


def test_reproducible_and_order_independent() -> None:
    recs = _records()
    a = split_by_patient(recs, 0.2, 0.1, seed=7)
    b = split_by_patient(list(reversed(recs)), 0.2, 0.1, seed=7)
    assert {k: {r.image for r in v} for k, v in a.items()} == {k: {r.image for r in v} for k, v in b.items()}
    c = split_by_patient(recs, 0.2, 0.1, seed=8)
    assert {r.image for r in a["test"]} != {r.image for r in c["test"]}


def test_bad_fractions_rejected() -> None:
    with pytest.raises(ValueError, match="below 1"):
        split_by_patient(_records(), 0.6, 0.5, seed=0)

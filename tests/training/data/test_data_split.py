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


def test_pinned_patients_keep_their_side_and_the_rest_are_dealt() -> None:
    recs = _records()
    pinned = {"P0": "test", "P1": "val", "P2": "train", "IDRiD_3": "test"}
    split = split_by_patient(recs, 0.15, 0.15, seed=13, pinned=pinned)
    side = {r.patient_id: name for name, part in split.items() for r in part}
    assert all(side[p] == s for p, s in pinned.items())
    assert sum(len(v) for v in split.values()) == len(recs)
    assert abs(len({r.patient_id for r in split["test"]}) - 0.15 * 80) <= 2
    with pytest.raises(ValueError, match="pinned split names"):
        split_by_patient(recs, 0.15, 0.15, seed=13, pinned={"P0": "holdout"})


def test_configured_split_pins_the_split_of_another_config(tmp_path: Path, synth) -> None:
    from training.config import load_training_config
    from training.data.split import configured_split

    for p in range(12):
        synth.write_rgb(tmp_path / f"P{p}.jpg", synth.fundus(64, 64))
    (tmp_path / "old.csv").write_text("image,patient_id,dr_grade,dme_grade\n" + "".join(f"P{p}.jpg,P{p},{p % 5},0\n" for p in range(6)))
    (tmp_path / "new.csv").write_text("image,patient_id,dr_grade,dme_grade\n" + "".join(f"P{p}.jpg,P{p},{p % 5},0\n" for p in range(6, 12)))
    (tmp_path / "old.toml").write_text('[data]\nsources = [{ kind = "manifest", path = "old.csv" }]\nval_fraction = 0.3\ntest_fraction = 0.3\nsplit_seed = 1\n')
    (tmp_path / "new.toml").write_text('[data]\nsources = [{ kind = "manifest", path = "old.csv" }, { kind = "manifest", path = "new.csv", name = "new" }]\n'
                                       'pin_split = "old.toml"\nsplit_seed = 99\n')
    old = configured_split(load_training_config(tmp_path / "old.toml").data)
    new = configured_split(load_training_config(tmp_path / "new.toml").data)
    old_side = {r.patient_id: s for s, part in old.items() for r in part}
    new_side = {r.patient_id: s for s, part in new.items() for r in part}
    assert all(new_side[p] == s for p, s in old_side.items())
    assert set(new_side) == {f"P{p}" for p in range(12)}

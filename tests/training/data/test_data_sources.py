"""Source readers on synthetic trees mimicking the real layouts and their quirks."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from training.config import (
    DataSettings,
    IdridGradingSource,
    IdridSegmentationSource,
    KaggleSource,
    ManifestSource,
    load_training_config,
)
from training.data.records import DME_PRESENT, DME_UNKNOWN, DR_UNKNOWN
from training.data.sources import (
    DataSourceError,
    load_all,
    load_idrid_grading,
    load_idrid_segmentation,
    load_kaggle,
    load_manifest,
    load_records,
)
from training.data.split import configured_split

# ------------------------------------------------------------------------------------------ IDRiD seg


def test_idrid_segmentation_reads_masks_and_missing_lesion(make_idrid_seg) -> None:
    root = make_idrid_seg(n_images=2)
    recs = load_idrid_segmentation(IdridSegmentationSource(kind="idrid-segmentation", path=root))
    assert [r.patient_id for r in recs] == ["IDRiD_01", "IDRiD_02"]
    assert all(r.has_masks and not r.has_grade and r.dme_grade == DME_UNKNOWN for r in recs)
    assert all(m is not None for m in recs[0].masks)
    assert recs[1].masks[3] is None  # no SE file -> lesion absent, image still annotated
    assert recs[1].masks[4].name == "IDRiD_02_OD.tif"


def test_idrid_segmentation_missing_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "A. Segmentation"
    with pytest.raises(DataSourceError, match="folder not found") as exc:
        load_idrid_segmentation(IdridSegmentationSource(kind="idrid-segmentation", path=missing))
    assert str(missing) in str(exc.value)


def test_idrid_segmentation_missing_lesion_folder_is_named(make_idrid_seg) -> None:
    root = make_idrid_seg(n_images=1)
    shutil.rmtree(root / "2. All Segmentation Groundtruths" / "a. Training Set" / "4. Soft Exudates")
    with pytest.raises(DataSourceError, match="4. Soft Exudates"):
        load_idrid_segmentation(IdridSegmentationSource(kind="idrid-segmentation", path=root))


# -------------------------------------------------------------------------------------- IDRiD grading


def _grading_tree(tmp_path: Path, synth, with_images: bool = True) -> Path:
    root = tmp_path / "B. Disease Grading"
    gt = root / "2. Groundtruths"
    gt.mkdir(parents=True)
    # The real file: CRLF, trailing empty columns, a header with odd spacing.
    (gt / "a. IDRiD_Disease Grading_Training Labels.csv").write_bytes(
        b"Image name,Retinopathy grade,Risk of macular edema ,,,,\r\n"
        b"IDRiD_001,3,2,,,,\r\nIDRiD_002,0,0,,,,\r\n,,,,,,\r\n"
    )
    if with_images:
        for name in ("IDRiD_001", "IDRiD_002"):
            synth.write_rgb(root / "1. Original Images" / "a. Training Set" / f"{name}.jpg", synth.fundus())
    return root


def test_idrid_grading_csv_with_trailing_empty_columns(tmp_path: Path, synth) -> None:
    root = _grading_tree(tmp_path, synth)
    recs = load_idrid_grading(IdridGradingSource(kind="idrid-grading", path=root))
    assert [(r.patient_id, r.dr_grade, r.dme_grade, r.has_masks) for r in recs] == [
        ("IDRiD_001", 3, 2, False), ("IDRiD_002", 0, 0, False),
    ]


def test_idrid_grading_missing_image_is_named_or_skipped(tmp_path: Path, synth) -> None:
    root = _grading_tree(tmp_path, synth)
    (root / "1. Original Images" / "a. Training Set" / "IDRiD_002.jpg").unlink()
    source = IdridGradingSource(kind="idrid-grading", path=root)
    with pytest.raises(DataSourceError, match="IDRiD_002") as exc:
        load_idrid_grading(source)
    assert "skip_missing" in str(exc.value)
    with pytest.warns(UserWarning, match="IDRiD_002"):
        assert [r.patient_id for r in load_idrid_grading(source, skip_missing=True)] == ["IDRiD_001"]


def test_idrid_grading_missing_images_folder_is_named(tmp_path: Path, synth) -> None:
    root = _grading_tree(tmp_path, synth, with_images=False)
    with pytest.raises(DataSourceError, match="images folder not found") as exc:
        load_idrid_grading(IdridGradingSource(kind="idrid-grading", path=root))
    assert "a. Training Set" in str(exc.value)


# --------------------------------------------------------------------------------------------- Kaggle


def _kaggle_tree(tmp_path: Path, synth) -> Path:
    root = tmp_path / "kaggle"
    rows = {"train": [("10_left.png", 2, 1), ("10_right.png", 3, 2)], "valid": [("11_left", 0, 0)]}
    for split, items in rows.items():
        lines = ["Image name,Retinopathy grade,Risk of macular edema,Caption"]
        for name, dr, dme in items:
            file_name = name if "." in name else f"{name}.png"
            synth.write_rgb(root / split / "images" / file_name, synth.fundus())
            lines.append(f'{name},{dr},{dme},"a caption, with a comma"')
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "annotations.csv").write_text("\n".join(lines) + "\n")
    return root


def test_kaggle_layout(tmp_path: Path, synth) -> None:
    root = _kaggle_tree(tmp_path, synth)
    recs = load_kaggle(KaggleSource(kind="kaggle", path=root, splits=("train", "valid")))
    assert [(r.image.name, r.patient_id, r.eye, r.dr_grade, r.dme_grade) for r in recs] == [
        ("10_left.png", "10", "L", 2, 1), ("10_right.png", "10", "R", 3, 2), ("11_left.png", "11", "L", 0, 0),
    ]


def test_kaggle_missing_split_folder_is_named(tmp_path: Path, synth) -> None:
    root = _kaggle_tree(tmp_path, synth)
    with pytest.raises(DataSourceError, match="Kaggle split 'test'.*folder not found") as exc:
        load_kaggle(KaggleSource(kind="kaggle", path=root))
    assert str(root / "test") in str(exc.value)


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_binary_dme_and_masks(tmp_path: Path, synth) -> None:
    folder = tmp_path / "srahim"
    for name in ("P1_L.jpg", "P1_R.jpg", "P2_L.jpg"):
        synth.write_rgb(folder / "img" / name, synth.fundus())
    synth.write_mask(folder / "masks" / "P2_L_OD.png", synth.fundus()[..., 0] > 0)
    (folder / "labels.csv").write_text(
        "image,patient_id,eye,dr_grade,maculopathy,aded,ma_mask,od_mask\n"
        "img/P1_L.jpg,P1,L,0,0,0,,\n"
        "img/P1_R.jpg,P1,R,3,1,1,,\n"
        "img/P2_L.jpg,P2,L,,,0,,masks/P2_L_OD.png\n"
    )
    source = ManifestSource(kind="manifest", path=folder / "labels.csv", dme_column="maculopathy", dme_binary=True)
    recs = load_records(source)
    assert [(r.patient_id, r.eye, r.dr_grade, r.dme_grade) for r in recs] == [
        ("P1", "L", 0, 0), ("P1", "R", 3, DME_PRESENT), ("P2", "L", DR_UNKNOWN, DME_UNKNOWN),
    ]
    assert recs[0].masks is None and recs[2].masks is not None
    assert recs[2].masks[:4] == (None, None, None, None) and recs[2].masks[4] == folder / "masks" / "P2_L_OD.png"
    assert recs[1].referable == 1


def test_manifest_without_patient_id_uses_stem(tmp_path: Path, synth) -> None:
    synth.write_rgb(tmp_path / "IDRiD_NAR_001.jpg", synth.fundus())
    (tmp_path / "labels.csv").write_text("image,dr_grade,dme_grade\nIDRiD_NAR_001.jpg,0,0\n")
    (rec,) = load_manifest(ManifestSource(kind="manifest", path=tmp_path / "labels.csv"))
    assert (rec.patient_id, rec.dr_grade, rec.dme_grade, rec.eye) == ("IDRiD_NAR_001", 0, 0, None)


def test_manifest_without_dme_column_eye_spellings_and_gradable(tmp_path: Path, synth) -> None:
    # EyePACS publishes no DME column; Messidor-2 has 'gradable'; eyes come as L/R, OD/OS or left/right
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        synth.write_rgb(tmp_path / name, synth.fundus())
    (tmp_path / "labels.csv").write_text(
        "image,patient_id,eye,dr_grade,gradable\na.jpg,P1,left,2,1\nb.jpg,P1,OD,0,0\nc.jpg,P2,,1,\n")
    recs = load_manifest(ManifestSource(kind="manifest", path=tmp_path / "labels.csv"))
    assert [(r.eye, r.dr_grade, r.dme_grade, r.gradable) for r in recs] == [
        ("L", 2, DME_UNKNOWN, True), ("R", 0, DME_UNKNOWN, False), (None, 1, DME_UNKNOWN, None)]
    (tmp_path / "labels.csv").write_text("image,patient_id,eye,dr_grade\na.jpg,P1,middle,2\n")
    with pytest.raises(DataSourceError, match=r"line 2: column 'eye' has 'middle'"):
        load_manifest(ManifestSource(kind="manifest", path=tmp_path / "labels.csv"))
    (tmp_path / "labels.csv").write_text("image,dr_grade,gradable\na.jpg,2,maybe\n")
    with pytest.raises(DataSourceError, match=r"column 'gradable' has 'maybe'"):
        load_manifest(ManifestSource(kind="manifest", path=tmp_path / "labels.csv"))


def test_manifest_bad_columns_message_names_file_missing_and_found(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,patient_id,dr_grade,dme\nx.jpg,P,0,1\n")
    with pytest.raises(DataSourceError) as exc:  # a DME column named in the config must exist
        load_manifest(ManifestSource(kind="manifest", path=csv_path, dme_column="maculopathy"))
    msg = str(exc.value)
    assert str(csv_path) in msg and "['maculopathy']" in msg and "dme" in msg and "found columns" in msg


def test_manifest_bad_label_value_names_line(tmp_path: Path, synth) -> None:
    synth.write_rgb(tmp_path / "a.jpg", synth.fundus())
    (tmp_path / "labels.csv").write_text("image,dr_grade,dme_grade\na.jpg,7,0\n")
    with pytest.raises(DataSourceError, match=r"line 2: column 'dr_grade' has '7'"):
        load_manifest(ManifestSource(kind="manifest", path=tmp_path / "labels.csv"))


def test_manifest_missing_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image,dr_grade,dme_grade\ngone.jpg,1,0\n")
    with pytest.raises(DataSourceError, match="gone.jpg"):
        load_manifest(ManifestSource(kind="manifest", path=tmp_path / "labels.csv"))


def test_load_all_concatenates_and_rejects_duplicates(tmp_path: Path, synth, make_idrid_seg) -> None:
    root = make_idrid_seg(n_images=2)
    synth.write_rgb(tmp_path / "m" / "a.jpg", synth.fundus())
    (tmp_path / "m" / "labels.csv").write_text("image,dr_grade,dme_grade\na.jpg,1,0\n")
    seg = IdridSegmentationSource(kind="idrid-segmentation", path=root)
    man = ManifestSource(kind="manifest", path=tmp_path / "m" / "labels.csv")
    assert len(load_all(DataSettings(sources=(seg, man)))) == 3
    with pytest.raises(ValidationError, match="listed twice in"):
        DataSettings(sources=(man, man))
    (tmp_path / "m" / "labels.csv").write_text("image,dr_grade,dme_grade\na.jpg,1,0\na.jpg,1,0\n")
    with pytest.raises(DataSourceError, match="listed twice by manifest:m: remove the repeated row"):
        load_all(DataSettings(sources=(man,)))




def test_two_manifests_of_one_source_name_are_refused_unless_named(tmp_path: Path) -> None:
    """Both were named manifest:<folder> and merged into one source in per-source metrics and weights (an ML
    engineer's check); a name of their own keeps them apart."""
    first = ManifestSource(kind="manifest", path=tmp_path / "data" / "a.csv")
    second = ManifestSource(kind="manifest", path=tmp_path / "data" / "b.csv")
    elsewhere = ManifestSource(kind="manifest", path=tmp_path / "other" / "data" / "c.csv")
    for pair in ((first, second), (first, elsewhere)):
        with pytest.raises(ValidationError, match="would share the source name 'manifest:data'.*name of its own"):
            DataSettings(sources=pair)
    named = ManifestSource(kind="manifest", path=tmp_path / "data" / "b.csv", name="site-b")
    assert [s.source_name for s in DataSettings(sources=(first, named)).sources] == ["manifest:data", "manifest:site-b"]
    with pytest.raises(ValidationError):
        ManifestSource(kind="manifest", path=tmp_path / "x.csv", name="../escape")

# ------------------------------------------------------------------------------------------ real data


def test_real_configured_sources(shared_data: Path, project_root: Path) -> None:
    cfg = load_training_config(project_root / "config.toml")
    recs = load_all(cfg.data)
    by_source: dict[str, list] = {}
    for r in recs:
        by_source.setdefault(r.source, []).append(r)
    assert len(by_source["idrid-segmentation"]) == 34
    assert len(by_source["manifest:srahim"]) == 360
    assert len(by_source["manifest:idrid-nar"]) == 89
    seg = by_source["idrid-segmentation"]
    assert any(r.masks[3] is None for r in seg)  # some images have no soft-exudate mask
    assert all(r.masks[4] is not None for r in seg)  # every image has an optic disc
    assert len({r.patient_id for r in by_source["manifest:srahim"]}) == 180
    assert {r.dme_grade for r in by_source["manifest:srahim"]} <= {0, DME_PRESENT}


def test_real_idrid_grading_training_set_loads_with_its_label_counts(shared_data: Path) -> None:
    source = IdridGradingSource(kind="idrid-grading", path=shared_data / "idrid" / "B. Disease Grading")
    recs = load_idrid_grading(source)
    assert len(recs) == 413
    assert Counter(r.dr_grade for r in recs) == {0: 134, 1: 20, 2: 136, 3: 74, 4: 49}  # shared/data/README.md
    assert Counter(r.dme_grade for r in recs) == {0: 177, 1: 41, 2: 195}
    # the test set's images are held back: its CSV parses, and the folder's absence is named
    test = IdridGradingSource(kind="idrid-grading", path=source.path, subset="test")
    with pytest.raises(DataSourceError, match="lists 103 images"):
        load_idrid_grading(test)


def test_real_v2_sources_load_with_their_quirks(shared_data: Path, project_root: Path) -> None:
    cfg = load_training_config(project_root / "experiments" / "v2-sources.toml")
    recs = load_all(cfg.data)
    by_source = Counter(r.source for r in recs)
    assert by_source["manifest:messidor2"] == 1249 and by_source["manifest:aptos"] == 2270
    assert by_source["manifest:eyepacs"] == 742 and by_source["idrid-grading"] == 413
    eyepacs = [r for r in recs if r.source == "manifest:eyepacs"]
    assert {r.eye for r in eyepacs} == {"L", "R"} and all(not r.has_dme for r in eyepacs)  # no DME column
    messidor = [r for r in recs if r.source == "manifest:messidor2"]
    assert all(r.gradable is True for r in messidor)  # this release dropped the ungradable ones
    assert {r.dme_grade for r in messidor} == {0, DME_PRESENT}  # binary DME: present, grade unknown
    assert len({r.patient_id for r in messidor}) == 626
    splits = configured_split(cfg.data, recs)
    sides = {}
    for side, part in splits.items():
        for r in part:
            assert sides.setdefault(r.patient_id, side) == side  # both eyes of a patient on one side

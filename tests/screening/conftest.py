"""Worker fixtures: a tiny random-init checkpoint, settings in tmp_path, synthetic fundus JPEGs, and a real
worker run over them (``worked``: results, pictures and draft PDFs on disk, for the review tests)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from screening.config import ScreeningSettings
from training.checkpoint import labels_dict, save_checkpoint
from training.model import ModelConfig, build_model

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def make_checkpoint(path: Path, kind: str = "synthetic", image_size: int = 64, backbone: str = "resnet18",
                    grade_inputs: str = "features", test_metrics: dict | None = None) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, image_size=image_size, decoder_channels=(16, 16, 16, 8, 8), grade_inputs=grade_inputs)
    model = build_model(cfg)
    return save_checkpoint(path, {
        "model_state": model.state_dict(), "model_config": cfg.to_dict(), "labels": labels_dict(),
        "thresholds": {"referable": 0.5, "lesion": 0.5}, "provenance": {"kind": kind},
        "metrics": {"validation": {"val_kappa": 0.5, "val_ref_auc": 0.75}, **({"test": test_metrics} if test_metrics else {})},
        "model_version": f"test-{kind}-v1",
    })


def make_quality_model(path: Path, always: tuple[str, ...] = ()) -> Path:
    """A gradability model (training.quality's format) whose verdict does not depend on the photo: every reason
    in ``always`` is given (probability ~1), no other (~0). Worker tests then know what the verdict will be."""
    from training.quality import FEATURE_NAMES, REASONS, pack_model

    n = len(FEATURE_NAMES)
    model = pack_model(np.zeros(n), np.ones(n), [np.zeros((n, 1)), np.zeros((1, len(REASONS)))],
                       [np.zeros(1), np.array([10.0 if r in always else -10.0 for r in REASONS])],
                       {r: 0.5 for r in REASONS}, {}, {"kind": "test"})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def make_laterality_model(path: Path, confident: float = 0.999, side_gain: float = 1.0) -> Path:
    """A laterality model that takes photos as upright. By default it is never confident (side_gain 1: at most
    ~73 %), so the synthetic photos' random eyes never contradict their names; pass side_gain=20, confident=0.8 for
    one that reads the eye from the disc side."""
    from training.laterality import pack_model

    path.parent.mkdir(parents=True, exist_ok=True)
    upright = {"side_gain": side_gain, "tilt_mean": 8.0, "tilt_sd": 4.0, "miss_bias": 50.0, "miss_depth_gain": 0.0,
               "upright_prior": 1 - 1e-9}  # the fovea never counts (miss = 1): P(upright) is the prior
    torch.save(pack_model(upright, confident, {}, {"kind": "test"}), path)
    return path


def write_fundus(path: Path, seed: int = 0, size: int = 256, eye: str | None = None, dr_grade: int | None = None) -> Path:
    """A synthetic fundus JPEG; pass ``dr_grade=0`` where the optic disc must be found by brightness (the
    laterality checks): bright synthetic exudates can outshine it."""
    from training.data.synthetic import make_fundus

    f = make_fundus(np.random.default_rng(seed), size=size, eye=eye, dr_grade=dr_grade)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    """:func:`make_checkpoint` for tests that need a variant (test modules cannot import conftest)."""
    return make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo.pt")


@pytest.fixture(scope="session")
def intake_models(tmp_path_factory) -> dict[str, Path]:
    """Quality models (always gradable, always one reason) and laterality models (never / often confident)."""
    folder = tmp_path_factory.mktemp("intake-models")
    return {
        "gradable": make_quality_model(folder / "gradable.pt"),
        "blurred": make_quality_model(folder / "blurred.pt", ("blurred",)),
        "dark_blurred": make_quality_model(folder / "dark_blurred.pt", ("too_dark", "blurred")),
        "not_fundus": make_quality_model(folder / "not_fundus.pt", ("not_fundus",)),
        "unsure_eye": make_laterality_model(folder / "unsure.pt"),
        "sure_eye": make_laterality_model(folder / "sure.pt", confident=0.8, side_gain=20.0),
    }


@pytest.fixture
def settings(tmp_path, tiny_checkpoint, intake_models) -> ScreeningSettings:
    return ScreeningSettings(
        inbox=tmp_path / "inbox", reports=tmp_path / "reports", archive=tmp_path / "archive",
        rejected=tmp_path / "rejected", work_dir=tmp_path / "work", database=f"sqlite:///{tmp_path / 'db.sqlite'}",
        checkpoint=tiny_checkpoint, stable_seconds=0.1, poll_interval=0.1, sweep_interval=0.5, batch_size=4,
        threads=1, device="cpu", quality_model=intake_models["gradable"], laterality_model=intake_models["unsure_eye"],
        # the suite runs one pytest worker per core, so an idle-class renderer would wait for the other worker's
        # tests; the default ("idle") is tested in test_renderer.py
        report_priority="normal",
    )


@pytest.fixture
def small_fs():
    """Mount a small tmpfs over a folder (``small_fs(folder, size="1m", readonly=False)``), to make a full or
    read-only disk for real; unmounted afterwards. Needs root (CI runs as root); skipped with the reason
    otherwise. ``small_fs.remount(folder, readonly)`` flips a mounted one."""
    import os
    import subprocess

    mounted: list[Path] = []

    def mount(folder: Path, size: str = "1m", readonly: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a full or read-only file system is made by mounting a small tmpfs, which needs root")
        folder.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    def remount(folder: Path, readonly: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if readonly else 'rw'}", str(folder)], check=True)

    mount.remount = remount  # type: ignore[attr-defined]
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
# ------------------------------------------------------------------------------------------------ DICOM files

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image


def write_dicom(
    path: Path, *, rgb: np.ndarray | None = None, jpeg: bytes | None = None, sop_class: str = OP_SOP_CLASS,
    patient_id: object = "P100", image_laterality: object = "R", laterality: object = None,
    acquisition: object = "20250301101500", study_date: object = None, manufacturer: object = "Topcon",
    model: object = "TRC-NW8", **extra: object,
) -> Path:
    """A DICOM Part 10 file made with pydicom, as a camera or PACS exports one: ``rgb`` uncompressed (explicit VR
    little endian, RGB), or ``jpeg`` bytes encapsulated as JPEG baseline (YBR_FULL_422), or neither (no pixel
    data). A tag given as None is left out; ``extra`` sets further elements by keyword."""
    from PIL import Image as PILImage
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg is not None else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OP" if sop_class == OP_SOP_CLASS else "OT"
    for keyword, value in (("PatientID", patient_id), ("ImageLaterality", image_laterality), ("Laterality", laterality),
                           ("AcquisitionDateTime", acquisition), ("StudyDate", study_date),
                           ("Manufacturer", manufacturer), ("ManufacturerModelName", model)):
        if value is not None:
            setattr(ds, keyword, value)
    if rgb is not None or jpeg is not None:
        if jpeg is not None:
            with PILImage.open(io.BytesIO(jpeg)) as im:
                width, height = im.size
        else:
            assert rgb is not None
            height, width = rgb.shape[:2]
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if jpeg is not None:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.PixelData = encapsulate([jpeg])
            ds["PixelData"].VR = "OB"
        else:
            assert rgb is not None
            ds.PhotometricInterpretation = "RGB"
            ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_tiff_pages(path: Path, pictures: list[np.ndarray], subfiles: list[int] | None = None) -> Path:
    """A multi-page TIFF, one page per RGB picture (``subfiles``: each page's NewSubfileType, 1 = a thumbnail)."""
    from PIL import Image as PILImage
    from PIL import TiffImagePlugin

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf) as tf:
        for rgb, subfile in zip(pictures, subfiles or [0] * len(pictures)):
            PILImage.fromarray(rgb).save(tf, "TIFF", tiffinfo={254: subfile})
            tf.newFrame()
    path.write_bytes(buf.getvalue())
    return path


WHITE_PAGE = np.full((200, 200, 3), 255, np.uint8)  # a scanned form: not a fundus photo


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Baseline JPEG of an RGB picture (what a camera puts in a JPEG-compressed DICOM)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def synthetic_fundus(seed: int = 0, size: int = 256) -> np.ndarray:
    from training.data.synthetic import make_fundus

    return make_fundus(np.random.default_rng(seed), size=size).image


@dataclasses.dataclass
class Worked:
    settings: ScreeningSettings
    factory: sessionmaker[Session]
    exams: dict[str, int]  # patient code -> exam id


def run_worker(settings: ScreeningSettings, photos: dict[str, int]) -> Worked:
    """Grade ``photos`` (file name -> synthetic seed) with the tiny checkpoint; reports rendered inline."""
    from sqlalchemy import select

    from screening.db import init_db, make_engine, make_session_factory, session_scope
    from screening.db.models import Patient
    from screening.inference import Predictor
    from screening.pipeline import Worker

    settings = settings.model_copy(update={"report_renderer": "inline"})
    for name, seed in photos.items():
        write_fundus(settings.inbox / name, seed=seed)
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    with Worker(settings, Predictor(settings.checkpoint, "cpu", 1), factory, TEMPLATES) as worker:
        out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.failed) == (len(photos), 0)
    with session_scope(factory) as s:
        exams = {p.code: p.exams[0].id for p in s.scalars(select(Patient))}
    return Worked(settings, factory, exams)


@pytest.fixture
def worked(settings) -> Worked:
    """P1: both eyes, P2: right eye only, graded and reported by the real worker."""
    return run_worker(settings, {"P1_R.jpg": 1, "P1_L.jpg": 2, "P2_R.jpg": 3})


@pytest.fixture
def worked_db(settings_db) -> Worked:
    """``worked`` on each supported database: the SQLite file, then a PostgreSQL database."""
    return run_worker(settings_db, {"P1_R.jpg": 1, "P1_L.jpg": 2, "P2_R.jpg": 3})


@pytest.fixture
def settings_db(settings, db_url) -> ScreeningSettings:
    """``settings`` on each supported database: the SQLite file, then a PostgreSQL database."""
    return settings.model_copy(update={"database": db_url})

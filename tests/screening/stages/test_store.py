"""The store stage alone: every output published in the work folder, the result row, then the archive; lesion
masks also at the original photo's size, where they overlay the clinic's own file."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Image, Result
from screening.inference import ImagePrediction
from screening.stages import Admitted, Filing, IntakeStage, StoreStage
from training.common import LESION_CODES

SPOT = (1650, 520)  # (x, y) on the original photo


@pytest.fixture
def stages(settings):
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    for folder in (settings.inbox, settings.archive, settings.rejected, settings.work_dir):
        folder.mkdir(parents=True, exist_ok=True)
    filing = Filing(settings, factory)
    predictor = SimpleNamespace(version="test-v1", meta={"checkpoint_sha256": "c" * 64}, device="cpu")
    return IntakeStage(settings, factory, filing, image_size=256), StoreStage(settings, factory, filing, predictor)


def _camera_photo(path):
    """2400x1600, the round field cut at top and bottom, a bright spot at SPOT: decoded at half size, cropped
    at the sides, padded above and below."""
    img = np.zeros((1600, 2400, 3), np.uint8)
    cv2.circle(img, (1300, 800), 900, (35, 80, 170), -1)  # BGR
    cv2.circle(img, SPOT, 14, (200, 255, 255), -1)
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path


def _prediction(job) -> ImagePrediction:
    """A lesion head that marks the bright pixels as haemorrhage and nothing else."""
    s = job.decoded.rgb.shape[0]
    masks = np.zeros((len(LESION_CODES), s, s), bool)
    masks[LESION_CODES.index("HE")] = job.decoded.rgb.min(axis=2) > 150
    return ImagePrediction(
        dr_grade=1, dr_probs=[0.1, 0.6, 0.1, 0.1, 0.1], dme_grade=0, dme_probs=[0.8, 0.1, 0.1], referable_score=0.2,
        referable=False, masks=masks, lesion_areas={code: float(m.mean()) for code, m in zip(LESION_CODES, masks)},
        dr_cam=np.zeros((s, s), np.float32), dme_cam=np.zeros((s, s), np.float32),
    )


def test_one_lossless_tiff_per_lesion_at_the_original_size_recorded_with_the_result(stages, settings):
    intake, store = stages
    outcome = intake.admit(_camera_photo(settings.inbox / "P5_R_20250301.jpg"))
    assert isinstance(outcome, Admitted) and outcome.job.decoded.decode_factor == 2
    job = outcome.job
    stored = store.save(job, _prediction(job), inference_ms=1.0)
    assert stored.archived_as is not None and stored.archived_as.is_file()
    with session_scope(store.factory) as s:
        image, result = s.get(Image, job.image_id), s.query(Result).one()
        size = (image.width, image.height)
        paths = dict(result.original_masks)
        folder = result.mask_dir
    assert size == (2400, 1600)
    assert sorted(paths) == sorted(LESION_CODES)
    for code, p in paths.items():
        with PILImage.open(p) as tif:  # any TIFF reader: the file is plain baseline TIFF
            assert tif.format == "TIFF" and tif.size == size and tif.mode == "L"
            assert tif.info.get("compression") == "packbits"  # lossless
            mask = np.asarray(tif)
        assert str(p).startswith(str(folder)) and p.endswith(f"mask_{code}.tif")  # beside the report's pictures
        if code == "HE":
            assert mask[SPOT[1], SPOT[0]] == 255  # the spot, where it is on the clinic's photo
            ys, xs = np.nonzero(mask)
            assert abs(xs.mean() - SPOT[0]) < 4 and abs(ys.mean() - SPOT[1]) < 4
        else:
            assert mask.max() == 0
    # the report frame's pictures are still there (the PDF uses them)
    for name in ("photo.jpg", "overlay.jpg", "mask_HE.png", "dr_cam.jpg", "dme_cam.jpg"):
        assert (settings.work_dir / job.sha256[:2] / job.sha256 / name).is_file()

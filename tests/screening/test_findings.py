"""A stored photo as the report shows it (screening/findings.py): here, which models checked it."""

from __future__ import annotations

import pytest

from screening.db.models import Image, ImageState, Result
from screening.findings import eye_finding, ungradable_finding

MODELS = {"gradability": "dr-quality-1 8dbfd5e6961d", "laterality": "dr-laterality-3 ce872d655c06"}


def _result() -> Result:
    return Result(model_version="v", checkpoint_sha256="0" * 64, dr_grade=1, dr_probs=[0.1, 0.6, 0.2, 0.05, 0.05],
                  dme_grade=0, dme_probs=[0.9, 0.05, 0.05], referable_score=0.2, referable=False, area_ma=0.0,
                  area_he=0.0, area_ex=0.0, area_se=0.0, area_od=0.02)


@pytest.mark.parametrize("stored, shown", [(MODELS, MODELS), (None, {})])
def test_the_check_models_reach_the_finding_graded_or_ungradable(stored, shown):
    """images.check_models becomes the finding's (what the report's model section lists); a photo checked before
    the column existed (NULL) has none, so the report counts it as not recorded."""
    graded = Image(eye="R", sha256="a" * 64, source_name="P1_R.jpg", state=ImageState.DONE.value, gradable=True,
                   check_models=stored)
    assert dict(eye_finding(graded, _result()).check_models) == shown
    ungradable = Image(eye="L", sha256="b" * 64, source_name="P1_L.jpg", state=ImageState.DONE.value, gradable=False,
                       quality_reasons=["blurred"], check_models=stored)
    assert dict(ungradable_finding(ungradable).check_models) == shown


@pytest.mark.parametrize("device", ["Topcon TRC-NW8", None])
def test_the_camera_reaches_the_finding_graded_or_ungradable(device):
    """images.device (a DICOM file's manufacturer and model) is printed beside the photo's name; None: not named."""
    graded = Image(eye="R", sha256="a" * 64, source_name="P1_R.dcm", state=ImageState.DONE.value, gradable=True,
                   device=device)
    assert eye_finding(graded, _result()).device == device
    ungradable = Image(eye="L", sha256="b" * 64, source_name="P1_L.dcm", state=ImageState.DONE.value, gradable=False,
                       quality_reasons=["blurred"], device=device)
    assert ungradable_finding(ungradable).device == device


def test_an_ungradable_photo_is_shown_without_loading_torch(project_root):
    """The review queue and `review list` show every ungradable photo's reasons: their words must not pull in the
    deep-learning stack (importing it cost `review list` about 7 seconds before its first line)."""
    import subprocess
    import sys

    code = ("import sys; from screening.db.models import Image, ImageState; from screening.findings import "
            "ungradable_finding; img = Image(id=1, eye='L', sha256='b' * 64, source_name='P1_L.jpg', "
            "state=ImageState.DONE.value, gradable=False, quality_reasons=['too_dark']); "
            "print(ungradable_finding(img).ungradable_reasons[0].split(' (')[0], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project_root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["too", "dark", "False"]

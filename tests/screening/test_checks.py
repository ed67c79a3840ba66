"""The intake checks on one decoded photo (screening/checks.py): refusals, ungradable verdicts, the eye."""

from __future__ import annotations

from dataclasses import replace

import pytest

from screening.checks import IntakeChecks
from screening.imaging import decode
from screening.intake import Identity
from screening.rejection import Rejection, RejectReason

from .conftest import write_fundus


@pytest.fixture
def photo(tmp_path):
    return decode(write_fundus(tmp_path / "x.jpg", seed=40, eye="R", dr_grade=0), 64)


def _checks(settings, intake_models, quality="gradable", eye="sure_eye"):
    return IntakeChecks.from_settings(settings.model_copy(update={
        "quality_model": intake_models[quality], "laterality_model": intake_models[eye]}))


def test_a_stated_eye_that_agrees_has_nothing_to_say(settings, intake_models, photo):
    verdict = _checks(settings, intake_models).check(photo, Identity("P1", "R", None, eye_from="file name"), "P1_R.jpg")
    assert verdict.gradable and verdict.eye.eye == "R" and verdict.eye.source == "name"
    assert not verdict.eye.mismatch and verdict.eye.confirmed and verdict.eye.note() is None


def test_an_unclear_photo_says_eye_not_confirmed_and_keeps_the_stated_eye(settings, intake_models, photo):
    """The model abstains below its confidence threshold: no mismatch is claimed, no eye guessed, the report says so."""
    verdict = _checks(settings, intake_models, eye="unsure_eye").check(
        photo, Identity("P1", "L", None, eye_from="file name"), "P1_L.jpg")
    assert verdict.eye.eye == "L" and not verdict.eye.mismatch and not verdict.eye.confirmed
    note = verdict.eye.note() or ""
    assert note.startswith("Eye not confirmed by the photo") and "Filed under the left eye the file name states" in note


def test_a_sidecar_or_dicom_eye_is_reported_as_such(settings, intake_models, photo):
    checks = _checks(settings, intake_models)
    verdict = checks.check(photo, Identity("P1", "L", None, eye_from="sidecar x.json"), "x.jpg")
    assert verdict.eye.source == "sidecar" and verdict.eye.mismatch
    assert "the sidecar x.json says left eye" in (verdict.eye.note() or "")
    assert checks.check(photo, Identity("P1", "R", None, eye_from="DICOM Image Laterality (0020,0062)"), "x.dcm").eye.source == "dicom"


def test_an_ungradable_photo_without_an_eye_is_refused_saying_both(settings, intake_models, photo):
    checks = _checks(settings, intake_models, quality="dark_blurred", eye="unsure_eye")
    with pytest.raises(Rejection) as exc:
        checks.check(photo, Identity("P1", None), "P1.jpg")
    assert exc.value.code == RejectReason.IDENTITY
    assert "the photo is ungradable (too dark" in exc.value.message and "name the file with the eye" in exc.value.message


def test_not_a_fundus_photo_is_refused_before_the_eye_is_looked_at(settings, intake_models, photo):
    with pytest.raises(Rejection) as exc:
        _checks(settings, intake_models, quality="not_fundus").check(photo, Identity("P1", None), "P1.jpg")
    assert exc.value.code == RejectReason.NOT_FUNDUS and "'P1.jpg'" in exc.value.message


def test_the_checks_need_the_whole_photo(settings, intake_models, photo):
    with pytest.raises(ValueError, match="whole decoded photo"):
        _checks(settings, intake_models).check(replace(photo, whole=None), Identity("P1", "R"), "P1_R.jpg")

"""The intake stage alone: one typed outcome per file, and nothing moved before it is recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from screening.checks import IntakeChecks
from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Drop, Event, Image
from screening.rejection import RejectReason
from screening.stages import Admitted, Duplicate, Filing, IntakeStage, Rejected, Vanished

from ..conftest import write_fundus


def make_stage(settings):
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    for folder in (settings.inbox, settings.archive, settings.rejected):
        folder.mkdir(parents=True, exist_ok=True)
    return IntakeStage(settings, factory, Filing(settings, factory), image_size=64, checks=IntakeChecks.from_settings(settings))


@pytest.fixture
def stage(settings):
    return make_stage(settings)


def test_admitted_is_recorded_but_stays_in_the_inbox(stage, settings):
    path = write_fundus(settings.inbox / "P1_R_20250102.jpg", seed=1)
    outcome = stage.admit(path)
    assert isinstance(outcome, Admitted)
    job = outcome.job
    assert job.path == path and job.decoded.rgb.shape == (64, 64, 3) and path.is_file()
    with session_scope(stage.factory) as s:
        image = s.get(Image, job.image_id)
        assert (image.state, image.eye, image.stored_path, image.exam_id) == ("received", "R", str(path), job.exam_id)
        assert image.exam.exam_date.isoformat() == "2025-01-02" and image.exam.patient.code == "P1"
        assert [d.outcome for d in s.scalars(select(Drop))] == ["new"]


def test_same_content_from_another_file_in_flight_is_a_duplicate(stage, settings):
    first = write_fundus(settings.inbox / "P2_R.jpg", seed=2)
    second = settings.inbox / "copy of P2.jpg"
    shutil.copy(first, second)
    admitted = stage.admit(first)
    assert isinstance(admitted, Admitted)
    outcome = stage.admit(second)
    assert isinstance(outcome, Duplicate) and outcome.image_id == admitted.job.image_id
    assert outcome.filed_as is not None and outcome.filed_as.parent.name == "duplicates" and outcome.filed_as.is_file()
    assert not second.exists() and first.is_file()  # the original waits for grading


@pytest.mark.parametrize("name, content, code, fragment", [
    ("P3_R.pdf", b"%PDF-1.4", RejectReason.UNSUPPORTED_TYPE, "unsupported file type"),
    ("holiday.jpg", None, RejectReason.IDENTITY, "no patient id"),
    ("P3_R.jpg", b"\xff\xd8\xff\xe0 not really", RejectReason.UNREADABLE, "export"),
])
def test_refusals_carry_a_code_and_a_message_and_are_filed(stage, settings, name, content, code, fragment):
    path = settings.inbox / name
    if content is None:
        write_fundus(path, seed=3)
    else:
        path.write_bytes(content)
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == code and fragment in outcome.message
    assert not path.exists() and outcome.filed_as is not None and outcome.filed_as.parent == settings.rejected
    reason = Path(str(outcome.filed_as) + ".reason.txt").read_text()
    assert outcome.message in reason and name in reason
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.image_id)
        assert (image.state, image.error, image.stored_path) == ("rejected", outcome.message, str(outcome.filed_as))


def test_a_file_gone_before_intake(stage, settings):
    assert stage.admit(settings.inbox / "gone.jpg") == Vanished(settings.inbox / "gone.jpg")


# ------------------------------------------------------------------------------------------- intake checks


def test_every_admitted_image_carries_its_checks(stage, settings):
    outcome = stage.admit(write_fundus(settings.inbox / "P10_L.jpg", seed=10))
    assert isinstance(outcome, Admitted) and outcome.job.gradable and outcome.job.decoded.frame is None
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.gradable, image.quality_reasons, image.eye_source, image.eye_mismatch) == (True, [], "name", False)
        assert set(image.quality_scores) >= {"blurred", "not_fundus"} and image.predicted_eye in ("L", "R")
        assert 0.5 <= image.eye_confidence <= 1 and image.eye_note is None


def test_an_ungradable_photo_is_admitted_with_its_reasons_not_refused(settings, intake_models):
    stage = make_stage(settings.model_copy(update={"quality_model": intake_models["dark_blurred"]}))
    path = write_fundus(settings.inbox / "P11_R.jpg", seed=11)
    outcome = stage.admit(path)
    assert isinstance(outcome, Admitted) and not outcome.job.gradable and path.is_file()
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert image.gradable is False and sorted(image.quality_reasons) == ["blurred", "too_dark"]
        assert [e.message for e in s.scalars(select(Event).where(Event.kind == "ungradable"))] == ["too_dark, blurred"]


def test_a_picture_that_is_not_a_fundus_photo_is_refused_with_the_reason(settings, intake_models):
    stage = make_stage(settings.model_copy(update={"quality_model": intake_models["not_fundus"]}))
    path = write_fundus(settings.inbox / "P12_R.jpg", seed=12)
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.NOT_FUNDUS
    assert "does not look like a colour fundus photo" in outcome.message and "P12_R.jpg" in outcome.message
    assert outcome.filed_as is not None and outcome.filed_as.parent == settings.rejected


def test_no_eye_in_the_name_and_an_unclear_photo_is_refused_saying_why(stage, settings):
    path = write_fundus(settings.inbox / "Patient13.jpg", seed=13)
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.IDENTITY
    assert "no eye" in outcome.message and "does not show it clearly enough" in outcome.message
    assert "Patient001_L.jpg" in outcome.message  # what to do


def test_no_eye_in_the_name_and_a_clear_photo_takes_the_photos_eye(settings, intake_models):
    stage = make_stage(settings.model_copy(update={"laterality_model": intake_models["sure_eye"]}))
    outcome = stage.admit(write_fundus(settings.inbox / "Patient14.jpg", seed=14, eye="L", dr_grade=0))
    assert isinstance(outcome, Admitted)
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.eye, image.eye_source, image.predicted_eye, image.eye_mismatch) == ("L", "image", "L", False)
        assert image.eye_note.startswith("Eye read from the photo") and "left eye" in image.eye_note


def test_a_name_that_contradicts_the_photo_is_flagged_never_corrected(settings, intake_models):
    stage = make_stage(settings.model_copy(update={"laterality_model": intake_models["sure_eye"]}))
    outcome = stage.admit(write_fundus(settings.inbox / "Patient15_R.jpg", seed=15, eye="L", dr_grade=0))
    assert isinstance(outcome, Admitted)
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.eye, image.eye_source, image.predicted_eye, image.eye_mismatch) == ("R", "name", "L", True)
        assert "Laterality mismatch" in image.eye_note and "says right eye" in image.eye_note
        assert image.eye_confidence >= 0.8
        assert [e.kind for e in s.scalars(select(Event).where(Event.kind == "eye_mismatch"))] == ["eye_mismatch"]

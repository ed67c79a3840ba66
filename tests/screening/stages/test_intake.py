"""The intake stage alone: one typed outcome per file, and nothing moved before it is recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Drop, Image
from screening.rejection import RejectReason
from screening.stages import Admitted, Duplicate, Filing, IntakeStage, Rejected, Vanished

from ..conftest import write_fundus


@pytest.fixture
def stage(settings):
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    for folder in (settings.inbox, settings.archive, settings.rejected):
        folder.mkdir(parents=True, exist_ok=True)
    return IntakeStage(settings, factory, Filing(settings, factory), image_size=64)


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

"""The intake stage alone: one typed outcome per file, and nothing moved before it is recorded."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from screening.checks import IntakeChecks
from screening.db import init_db, make_engine, make_session_factory, session_scope, tallies
from screening.db.models import Drop, Event, Image
from screening.imaging import decode, preprocess
from screening.intake import sweep
from screening.rejection import RejectReason
from screening.stages import Admitted, Deferred, Duplicate, Filing, IntakeStage, Rejected, Unreadable, Vanished
from training.api import load_laterality_model
from training.common import sha256_file

from ..conftest import SC_SOP_CLASS, jpeg_bytes, synthetic_fundus, write_dicom, write_fundus
from ..test_dicom import malformed_dicom


def make_stage(settings, **models):
    """An intake stage on a new database; ``models`` replaces settings, e.g. ``laterality_model=...``."""
    settings = settings.model_copy(update=models)
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
    ("P3_R.jpg", b"GIF89a not a photo format the worker reads", RejectReason.UNREADABLE, "export"),
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
    # local time with its offset (the audit counts UTC days; staff compare the two): 2026-12-01T23:48:39-10:00
    assert re.search(r"^Rejected: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", reason, re.M), reason
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.image_id)
        assert (image.state, image.error, image.stored_path) == ("rejected", outcome.message, str(outcome.filed_as))


def test_refused_then_dropped_again_under_a_good_name_takes_the_new_name(stage, settings):
    """The report names the image by ``source_name``: it read "10_right.jpg" for a photo graded as
    ``E10_OD_20251120.jpg``, because re-admitting a known image kept the name it had been refused under."""
    refused = write_fundus(settings.inbox / "10_right.jpg", seed=4)
    data = refused.read_bytes()
    first = stage.admit(refused)
    assert isinstance(first, Rejected) and first.code == RejectReason.IDENTITY
    renamed = settings.inbox / "E10_R_20251120.jpg"
    renamed.write_bytes(data)
    second = stage.admit(renamed)
    assert isinstance(second, Admitted) and second.job.image_id == first.image_id
    with session_scope(stage.factory) as s:
        image = s.get(Image, first.image_id)
        assert (image.source_name, image.eye, image.state) == ("E10_R_20251120.jpg", "R", "received")
        drops = {d.source_name: d for d in s.scalars(select(Drop))}
        assert sorted(drops) == ["10_right.jpg", "E10_R_20251120.jpg"]
        # it arrived for grading with the second drop: its turnaround and audit day start there, not at the refusal
        # (the refused arrival's time made a 13 s turnaround read 8 minutes)
        assert drops["E10_R_20251120.jpg"].received_at > drops["10_right.jpg"].received_at
        assert image.received_at == drops["E10_R_20251120.jpg"].received_at
        assert tallies.check(s) == []


def test_a_file_gone_before_intake(stage, settings):
    assert stage.admit(settings.inbox / "gone.jpg") == Vanished(settings.inbox / "gone.jpg")


# ------------------------------------------------------------------------------------------- intake checks


def test_every_admitted_image_carries_its_checks(stage, settings):
    outcome = stage.admit(write_fundus(settings.inbox / "P10_L.jpg", seed=10))
    assert isinstance(outcome, Admitted) and outcome.job.gradable and outcome.job.decoded.whole is None
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.gradable, image.quality_reasons, image.eye_source, image.eye_mismatch) == (True, [], "name", False)
        assert set(image.quality_scores) >= {"blurred", "not_fundus"} and image.predicted_eye in ("L", "R")
        assert 0.5 <= image.eye_confidence <= 1  # the test model is never confident: the eye is not confirmed
        assert image.eye_note.startswith("Eye not confirmed by the photo") and "Filed under the left eye the file name" in image.eye_note
        assert [e.kind for e in s.scalars(select(Event).where(Event.image_id == image.id, Event.kind.like("eye%")))] == [
            "eye_not_confirmed"]


def test_an_ungradable_photo_is_admitted_with_its_reasons_not_refused(settings, intake_models):
    stage = make_stage(settings, quality_model=intake_models["dark_blurred"])
    path = write_fundus(settings.inbox / "P11_R.jpg", seed=11)
    outcome = stage.admit(path)
    assert isinstance(outcome, Admitted) and not outcome.job.gradable and path.is_file()
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert image.gradable is False and sorted(image.quality_reasons) == ["blurred", "too_dark"]
        assert [e.message for e in s.scalars(select(Event).where(Event.kind == "ungradable"))] == ["too_dark, blurred"]


def test_a_picture_that_is_not_a_fundus_photo_is_refused_with_the_reason(settings, intake_models):
    stage = make_stage(settings, quality_model=intake_models["not_fundus"])
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
    stage = make_stage(settings, laterality_model=intake_models["sure_eye"])
    outcome = stage.admit(write_fundus(settings.inbox / "Patient14.jpg", seed=14, eye="L", dr_grade=0))
    assert isinstance(outcome, Admitted)
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.eye, image.eye_source, image.predicted_eye, image.eye_mismatch) == ("L", "image", "L", False)
        assert image.eye_note.startswith("Eye read from the photo") and "left eye" in image.eye_note


def test_a_name_that_contradicts_the_photo_is_flagged_never_corrected(settings, intake_models):
    stage = make_stage(settings, laterality_model=intake_models["sure_eye"])
    outcome = stage.admit(write_fundus(settings.inbox / "Patient15_R.jpg", seed=15, eye="L", dr_grade=0))
    assert isinstance(outcome, Admitted)
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.eye, image.eye_source, image.predicted_eye, image.eye_mismatch) == ("R", "name", "L", True)
        assert "Laterality mismatch" in image.eye_note and "says right eye" in image.eye_note
        assert image.eye_confidence >= 0.8
        assert [e.kind for e in s.scalars(select(Event).where(Event.kind == "eye_mismatch"))] == ["eye_mismatch"]
        # the flag names the models that raised it: their format and their files' own SHA-256
        assert image.check_models == {
            "gradability": f"dr-quality-1 {sha256_file(settings.quality_model)[:12]}",
            "laterality": f"{load_laterality_model(intake_models['sure_eye'])['format']} {sha256_file(intake_models['sure_eye'])[:12]}"}


# ------------------------------------------------------------------------------ hostile entries (issue 12)

def _aged(path: Path, seconds: float = 7200) -> Path:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)
    return path


def _reason(outcome) -> str:
    return Path(str(outcome.filed_as) + ".reason.txt").read_text()


def test_links_folders_pipes_and_left_behind_names_are_refused_with_a_reason(stage, settings, tmp_path):
    """Each used to lie in the inbox for ever, unrecorded; a link to a photo was even graded through the link."""
    photo = write_fundus(tmp_path / "elsewhere" / "P1_R.jpg", seed=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the worker")
    entries = {
        "passwd_R.jpg": lambda p: p.symlink_to(secret),
        "P1_R.jpg": lambda p: p.symlink_to(photo),
        "folder_of_photos": lambda p: (p.mkdir(), write_fundus(p / "P2_L.jpg", seed=2)),
        "P3_R.jpg": lambda p: os.mkfifo(p),
        "..P4_R.jpg": lambda p: (write_fundus(p, seed=4), _aged(p)),
        "scan.jpg.part": lambda p: (p.write_bytes(b"half"), _aged(p)),
        "lonely.json": lambda p: (p.write_text('{"patient_id": "P5"}'), _aged(p)),
    }
    for name, make in entries.items():
        make(settings.inbox / name)
    (settings.inbox / ".gitkeep").touch()  # the repository's own placeholder, old: never refused, never moved
    _aged(settings.inbox / ".gitkeep")
    listed = {p.name for p in sweep(settings.inbox, settings.abandoned_after)}
    assert listed == set(entries)
    codes = {}
    for name in entries:
        outcome = stage.admit(settings.inbox / name)
        assert isinstance(outcome, Rejected), (name, outcome)
        codes[name] = outcome.code
        assert not os.path.lexists(settings.inbox / name) and os.path.lexists(outcome.filed_as)
        assert name in _reason(outcome)
    assert codes == {"passwd_R.jpg": "not_a_file", "P1_R.jpg": "not_a_file", "folder_of_photos": "not_a_file",
                     "P3_R.jpg": "not_a_file", "..P4_R.jpg": "left_behind", "scan.jpg.part": "left_behind",
                     "lonely.json": "left_behind"}
    assert photo.is_file() and secret.read_text() == "not for the worker"  # links moved, never followed
    assert (settings.rejected.glob("*_P1_R.jpg")).__next__().is_symlink()
    with session_scope(stage.factory) as s:
        drops = s.scalars(select(Drop)).all()
        assert sorted(d.reason_code for d in drops) == sorted(codes.values())
        assert all(d.outcome == "rejected" and d.image_id is None for d in drops)
        assert s.scalars(select(Image)).all() == []  # nothing was read as a photo
    assert [p.name for p in settings.inbox.iterdir()] == [".gitkeep"]


def test_young_temporary_names_are_left_alone(settings):
    (settings.inbox).mkdir(parents=True, exist_ok=True)
    (settings.inbox / ".P6_R.jpg.tmp").write_bytes(b"a copy in progress")
    (settings.inbox / "P6_R.json").write_text('{"eye": "R"}')
    write_fundus(settings.inbox / "P6_R.jpg", seed=6)
    _aged(settings.inbox / "P6_R.json")  # old, but its photo is beside it: it travels with the photo
    assert [p.name for p in sweep(settings.inbox, settings.abandoned_after)] == ["P6_R.jpg"]


def test_an_incomplete_file_waits_while_it_may_still_arrive_then_is_refused(stage, settings):
    data = (write_fundus(settings.work_dir / "src.jpg", seed=7)).read_bytes()
    path = settings.inbox / "P7_R.jpg"
    path.write_bytes(data[: len(data) // 2])  # a slow copy, paused half way
    outcome = stage.admit(path)
    assert isinstance(outcome, Deferred) and outcome.code == RejectReason.INCOMPLETE
    assert path.is_file() and list(settings.rejected.iterdir()) == []
    with session_scope(stage.factory) as s:
        assert s.scalars(select(Drop)).all() == []  # nothing recorded while it may still arrive
    with open(path, "ab") as fh:  # the copy resumes
        fh.write(data[len(data) // 2:])
    admitted = stage.admit(path)
    assert isinstance(admitted, Admitted)
    import hashlib
    assert admitted.job.sha256 == hashlib.sha256(data).hexdigest()  # the bytes hashed are the bytes decoded
    stuck = settings.inbox / "P8_R.jpg"
    stuck.write_bytes(data[: len(data) // 2])
    _aged(stuck, settings.incomplete_grace + 60)  # unchanged for longer than the grace: refused
    refused = stage.admit(stuck)
    assert isinstance(refused, Rejected) and refused.code == RejectReason.INCOMPLETE
    reason = _reason(refused)
    assert "incomplete or corrupt" in reason and "copy or export the photo again" in reason
    assert "wait" not in reason  # refused because it stopped changing: waiting longer would not help
    assert "What to do: correct what the reason names (it says how), then drop the corrected file" in reason


def test_a_file_the_worker_may_not_read_is_reported_once_and_stays_until_it_can(stage, settings, monkeypatch, caplog):
    """Permissions are not the clinic's photo's fault, and fixing them is all it takes: nothing is refused or moved,
    one incident names the file and says what to do, and the log gives only the kind of error (issue: a
    PermissionError used to be retried forever, a traceback naming the file in every pass's log)."""
    import errno

    from screening.stages import intake as module

    path = write_fundus(settings.inbox / "P10_R.jpg", seed=10)
    real = module.read_content

    def denied(p, max_bytes):  # the suite runs as root, whom chmod 000 does not stop
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr(module, "read_content", denied)
    with caplog.at_level(logging.WARNING, logger="screening"):
        outcomes = [stage.admit(path) for _ in range(3)]  # three passes of the worker
    assert all(isinstance(o, Unreadable) for o in outcomes) and path.is_file()
    assert "P10_R.jpg" in outcomes[0].message and "permission to read it" in outcomes[0].message
    with session_scope(stage.factory) as s:
        events = s.scalars(select(Event).where(Event.code == "file_unreadable")).all()
        assert [e.message for e in events] == [outcomes[0].message]  # told once, not on every pass
        assert s.scalars(select(Drop)).all() == []
    assert "PermissionError [EACCES]" in caplog.text and "P10" not in caplog.text
    assert list(settings.rejected.iterdir()) == []
    again = make_stage(settings)  # another worker, or the next `run --once`: the incident is not told twice
    assert isinstance(again.admit(path), Unreadable)
    with session_scope(stage.factory) as s:
        assert len(s.scalars(select(Event).where(Event.code == "file_unreadable")).all()) == 1
    monkeypatch.setattr(module, "read_content", real)  # permissions fixed
    assert isinstance(stage.admit(path), Admitted)


def test_a_sidecar_the_worker_may_not_read_keeps_its_photo_waiting_not_refused(stage, settings, monkeypatch):
    """The sidecar holds the photo's identity: unreadable, it is as if the photo were, not a refusal for good."""
    import errno
    import json

    path = write_fundus(settings.inbox / "photo10.jpg", seed=10)
    sidecar = settings.inbox / "photo10.json"
    sidecar.write_text(json.dumps({"patient_id": "P10", "eye": "R", "exam_date": "2024-05-17"}))
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == sidecar:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    outcome = stage.admit(path)
    assert isinstance(outcome, Unreadable) and "'photo10.json' could not be read" in outcome.message
    assert path.is_file() and sidecar.is_file() and list(settings.rejected.iterdir()) == []
    monkeypatch.setattr(Path, "read_text", real)
    admitted = stage.admit(path)
    assert isinstance(admitted, Admitted)
    with session_scope(stage.factory) as s:
        assert s.get(Image, admitted.job.image_id).exam.patient.code == "P10"  # from the sidecar, now readable


def test_limits_on_bytes_and_an_empty_file(stage, settings):
    big = write_fundus(settings.inbox / "P9_R.jpg", seed=9)
    small = stage.settings.model_copy(update={"max_file_bytes": big.stat().st_size - 1})
    limited = IntakeStage(small, stage.factory, stage.filing, image_size=64)
    outcome = limited.admit(big)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.TOO_LARGE and "max_file_bytes" in outcome.message
    empty = settings.inbox / "P10_R.jpg"
    empty.write_bytes(b"")
    # still empty a moment after it appeared: a copy may have opened it and not written yet (it was refused, and
    # the photo written into it afterwards was found in rejected/ ungraded): left in the inbox
    outcome = stage.admit(empty)
    assert isinstance(outcome, Deferred) and outcome.code == RejectReason.EMPTY and empty.exists()
    for name in ("IM000101.dcm", "scan.jpg"):  # nor refused as not DICOM, or for its name, before it is written
        fresh = settings.inbox / name
        fresh.write_bytes(b"")
        outcome = stage.admit(fresh)
        assert isinstance(outcome, Deferred) and outcome.code == RejectReason.EMPTY, name
        fresh.unlink()
    old = time.time() - settings.incomplete_grace - 1  # empty for longer than incomplete_grace: refused
    os.utime(empty, (old, old))
    outcome = stage.admit(empty)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.EMPTY


def _graded(stage, path: Path) -> int:
    """Admit ``path`` and mark its image graded, as the store stage would (its file archived)."""
    from screening.db import repository as repo
    from screening.db.models import ImageState

    job = stage.admit(path).job
    with session_scope(stage.factory) as s:
        image = s.get(Image, job.image_id)
        repo.set_state(s, image, ImageState.DONE)
    stage.filing.archive_image(job.image_id, path, job.sha256)
    return job.image_id


def test_the_same_bytes_under_another_patient_are_a_recorded_conflict(stage, settings):
    """They used to be a silent duplicate: that patient got no exam, no report and no warning."""
    first = write_fundus(settings.inbox / "Patient143_L.jpg", seed=11)
    data = first.read_bytes()
    image_id = _graded(stage, first)
    for name, kind in (("patient143_l.JPG", Duplicate), ("Patient143_L_20250101.jpg", Duplicate),
                       ("Patient999_L.jpg", Rejected), ("Patient143_R.jpg", Rejected), ("no-name.jpg", Duplicate)):
        (settings.inbox / name).write_bytes(data)
        outcome = stage.admit(settings.inbox / name)
        assert isinstance(outcome, kind), name
        if kind is Rejected:
            assert outcome.code == RejectReason.IDENTITY_CONFLICT and f"image {image_id}" in outcome.message
            assert "Patient143" not in _reason(outcome).split("Reason:")[1]  # the other patient is not named
            if name == "Patient999_L.jpg":  # and so has "check which patient the photo belongs to"
                assert f"`dr-screen review move {image_id} --patient ID --reviewer NAME --reason TEXT`" in outcome.message
            if name == "Patient143_R.jpg":  # the answer to "check which eye it is" has a command
                assert f"`dr-screen review eye {image_id}=R --reviewer NAME --reason TEXT` sets it" in outcome.message
    with session_scope(stage.factory) as s:
        conflicts = s.scalars(select(Drop).where(Drop.reason_code == "identity_conflict")).all()
        assert sorted(d.source_name for d in conflicts) == ["Patient143_R.jpg", "Patient999_L.jpg"]
        assert all(d.image_id == image_id and d.outcome == "rejected" for d in conflicts)


def test_a_copy_of_a_photo_a_person_refiled_says_so(stage, settings):
    """A copy under the name a person corrected (here: the eye set to left after checking) read as if nobody had
    looked: the message says when it was refiled, where to see who and why, and how to confirm the filing stands."""
    from screening.db import repository as repo

    first = write_fundus(settings.inbox / "Patient150_R.jpg", seed=14)
    data = first.read_bytes()
    image_id = _graded(stage, first)
    with session_scope(stage.factory) as s:
        image = s.get(Image, image_id)
        repo.set_eye(s, image, "L", note="set by A. Clerk", message="eye set", at=datetime(2025, 5, 6, 7, 8, tzinfo=timezone.utc))
        exam_id = image.exam_id
    (settings.inbox / "Patient150_R.jpg").write_bytes(data)
    outcome = stage.admit(settings.inbox / "Patient150_R.jpg")
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.IDENTITY_CONFLICT
    assert (f"A person already checked and refiled the recorded photo (2025-05-06 07:08 UTC; `dr-screen review show "
            f"{exam_id}` says who and why)") in outcome.message
    assert f"`dr-screen review eye {image_id}=L --reviewer NAME --reason TEXT` confirms that the filing stands" in outcome.message


def test_patient_ids_are_case_folded(stage, settings):
    from screening.db.models import Patient

    a = stage.admit(write_fundus(settings.inbox / "Patient143_L.jpg", seed=12))
    b = stage.admit(write_fundus(settings.inbox / "patient143_r.JPG", seed=13))
    assert isinstance(a, Admitted) and isinstance(b, Admitted) and a.job.exam_id == b.job.exam_id
    with session_scope(stage.factory) as s:
        assert [p.code for p in s.scalars(select(Patient))] == ["Patient143"]  # the first spelling is kept


# ---------------------------------------------------------------------------------------------------- DICOM

SECRET = "SECRET-ID-4711"


def _no_identifier_anywhere(caplog, capfd, *outcomes):
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err
    for outcome in outcomes:
        assert SECRET not in repr(outcome)


def test_a_dicom_export_without_a_name_is_admitted_from_its_tags(stage, settings, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    rgb = synthetic_fundus(5)
    path = write_dicom(settings.inbox / "IM000001", jpeg=jpeg_bytes(rgb), patient_id=SECRET, image_laterality="L",
                       acquisition="20250301101500")
    outcome = stage.admit(path)
    assert isinstance(outcome, Admitted), outcome
    job = outcome.job
    assert np.abs(job.decoded.rgb.astype(int) - preprocess(rgb, (256, 256), 64).rgb).mean() < 3  # the JPEG's loss only
    with session_scope(stage.factory) as s:
        image = s.get(Image, job.image_id)
        assert (image.exam.patient.code, image.eye, image.exam.exam_date.isoformat()) == (SECRET, "L", "2025-03-01")
        assert (image.device, image.width, image.height, image.source_name) == ("Topcon TRC-NW8", 256, 256, "IM000001")
        assert image.eye_source == "dicom"  # the laterality tag stated the eye (compared with the photo's)
    _no_identifier_anywhere(caplog, capfd, outcome)


def test_a_dicom_export_sent_again_under_another_bare_name_is_a_duplicate(stage, settings, caplog, capfd):
    """A PACS pushes a study again as IM000101: the same bytes, so the same tags. Its bare name says nothing about
    whose photo it is (as for the first copy), so it is a duplicate, not a conflict with a patient 'IM000101' (it
    was, found in a clinic-style check). A name or sidecar that does state another patient still conflicts."""
    caplog.set_level(logging.DEBUG)
    first = write_dicom(settings.inbox / "IM000001", jpeg=jpeg_bytes(synthetic_fundus(6)), patient_id=SECRET,
                        image_laterality="L", acquisition="20250301101500")
    data = first.read_bytes()
    image_id = _graded(stage, first)
    outcomes = []
    for name, kind in (("IM000101", Duplicate), ("1.2.826.0.1.3680043.2.1125.1.dcm", Duplicate),
                       ("Other7_L_20250301.dcm", Rejected)):
        (settings.inbox / name).write_bytes(data)
        outcome = stage.admit(settings.inbox / name)
        assert isinstance(outcome, kind), (name, outcome)
        if kind is Duplicate:
            assert outcome.image_id == image_id and outcome.filed_as.parent.name == "duplicates"
        else:
            assert outcome.code == RejectReason.IDENTITY_CONFLICT and "another patient" in outcome.message
        outcomes.append(outcome)
    _no_identifier_anywhere(caplog, capfd, *outcomes)


def test_a_dicom_without_a_date_is_admitted_once_the_advised_sidecar_gives_one(stage, settings):
    """The refusal's advice, followed as written, admits the file (review finding: a sidecar with the date alone made
    the bare name a patient id, and the file was refused again for another reason)."""
    import json

    path = write_dicom(settings.inbox / "IM000007", jpeg=jpeg_bytes(synthetic_fundus(8)), patient_id=SECRET,
                       image_laterality="R", acquisition=None)
    refused = stage.admit(path)
    assert isinstance(refused, Rejected) and "no exam date" in refused.message
    advice = refused.message[refused.message.index("{"):refused.message.index("}") + 1]
    sidecar = json.loads(advice.replace("<its Patient ID>", SECRET).replace("YYYY-MM-DD", "2025-03-01"))
    again = write_dicom(settings.inbox / "IM000008", jpeg=jpeg_bytes(synthetic_fundus(8)), patient_id=SECRET,
                        image_laterality="R", acquisition=None)
    (settings.inbox / "IM000008.json").write_text(json.dumps(sidecar))
    outcome = stage.admit(again)
    assert isinstance(outcome, Admitted), outcome
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.exam.patient.code, image.exam.exam_date.isoformat()) == (SECRET, "2025-03-01")


def test_a_dicom_without_laterality_takes_the_eye_the_photo_clearly_shows(settings, intake_models, caplog, capfd):
    stage = make_stage(settings, laterality_model=intake_models["sure_eye"])
    rgb = synthetic_fundus(7)
    path = write_dicom(settings.inbox / "IM000003", jpeg=jpeg_bytes(rgb), patient_id=SECRET, image_laterality=None,
                       acquisition="20250301101500")
    outcome = stage.admit(path)
    assert isinstance(outcome, Admitted), outcome
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.job.image_id)
        assert (image.eye_source, image.eye) == ("image", image.predicted_eye)
        assert image.eye_note.startswith("Eye read from the photo")
    _no_identifier_anywhere(caplog, capfd, outcome)


@pytest.mark.parametrize("kw, code, fragment", [
    (dict(patient_id=None), RejectReason.IDENTITY, "no Patient ID (0010,0020)"),
    (dict(no_pixels=True), RejectReason.UNREADABLE, "no pixel data"),
    (dict(syntax="1.2.3.4.5.6.7.8.9.10"), RejectReason.UNSUPPORTED_TYPE,
     "Transfer Syntax UID (0002,0010), 1.2.3.4.5.6.7.8.9.10 (not a known transfer syntax), is not supported"),
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.2"), RejectReason.UNSUPPORTED_TYPE, "SOP class"),
    (dict(image_laterality=None), RejectReason.IDENTITY, "no eye"),
    (dict(acquisition=None, study_date=SECRET), RejectReason.IDENTITY, "valid date"),
    (dict(acquisition=None), RejectReason.IDENTITY, "no exam date: neither Acquisition DateTime (0008,002A) nor"),
])
def test_malformed_dicom_is_refused_with_a_recorded_reason(stage, settings, kw, code, fragment, caplog, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = malformed_dicom(settings.inbox / "IM000002.dcm", **kw)
    caplog.set_level(logging.DEBUG)
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == code and fragment in outcome.message, outcome
    assert not path.exists() and outcome.filed_as is not None and outcome.filed_as.parent == settings.rejected
    reason = Path(str(outcome.filed_as) + ".reason.txt").read_text()
    assert outcome.message in reason and SECRET not in reason
    with session_scope(stage.factory) as s:
        image = s.get(Image, outcome.image_id)
        assert (image.state, image.error, image.exam_id) == ("rejected", outcome.message, None)
        assert [d.reason for d in s.scalars(select(Drop))] == [outcome.message]
    _no_identifier_anywhere(caplog, capfd, outcome)


def test_a_dcm_name_without_the_dicom_header_is_refused(stage, settings):
    path = settings.inbox / "P1_R.dcm"
    path.write_bytes(jpeg_bytes(synthetic_fundus(6)))
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.UNREADABLE and "DICM" in outcome.message


def test_a_dicom_file_is_decoded_from_the_bytes_that_were_hashed(stage, settings):
    """The file used to be opened again after hashing: replaced in between, the record held one file's hash and
    another file's patient and picture."""
    from screening.intake import read_content

    path = write_dicom(settings.inbox / "IM000003", rgb=synthetic_fundus(8), patient_id="P100", image_laterality="R")
    content = read_content(path, settings.max_file_bytes)
    write_dicom(path, rgb=synthetic_fundus(9), patient_id="P200", image_laterality="L")  # replaced after the read
    identity, decoded = stage.read(path, content, None, None)
    assert (identity.patient_id, identity.eye) == ("P100", "R")
    assert np.array_equal(decoded.rgb, preprocess(synthetic_fundus(8), (256, 256), 64).rgb)


def test_dicom_pixel_limits(stage, settings):
    """max_pixels holds for DICOM: a photo over it is refused, and one whose Rows x Columns claim a huge picture
    is refused from the header, before its pixel data is decoded (this one would not even decode)."""
    limited = IntakeStage(stage.settings.model_copy(update={"max_pixels": 300 * 200 - 1}), stage.factory, stage.filing,
                          image_size=64)
    over = write_dicom(settings.inbox / "IM000004", rgb=cv2.resize(synthetic_fundus(10), (300, 200)))
    outcome = limited.admit(over)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.TOO_LARGE, outcome
    assert "300x200" in outcome.message and "max_pixels" in outcome.message
    named_by_pacs = write_dicom(settings.inbox / "IM000006", rgb=synthetic_fundus(12))  # no suffix, over max_file_bytes
    tiny = IntakeStage(stage.settings.model_copy(update={"max_file_bytes": 1000}), stage.factory, stage.filing, image_size=64)
    outcome = tiny.admit(named_by_pacs)  # was "no file extension and is not a DICOM file"
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.TOO_LARGE and "max_file_bytes" in outcome.message
    import pydicom

    bomb = write_dicom(settings.inbox / "IM000005", rgb=synthetic_fundus(11, size=128))
    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns = 30000, 30000  # 900 megapixels declared; 128x128 stored
    ds.save_as(bomb, enforce_file_format=True)
    outcome = stage.admit(bomb)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.TOO_LARGE, outcome
    assert "30000x30000" in outcome.message


@pytest.mark.realdata
def test_dicom_made_from_real_photos_jpeg_and_uncompressed_op_and_sc(stage, settings, shared_data):
    """Real camera JPEGs put into DICOM as a camera does (the JPEG bytes unchanged), and as uncompressed pixels."""
    srahim = sorted((shared_data / "srahim").glob("*_R.jpg"))[0]
    camera = shared_data / "fullres" / "camera_01.jpg"
    reference = decode(srahim, 64)
    rgb = cv2.cvtColor(cv2.imread(str(srahim)), cv2.COLOR_BGR2RGB)
    cases = [
        ("op_jpeg", dict(jpeg=srahim.read_bytes()), (1024, 685)),
        ("sc_jpeg", dict(jpeg=srahim.read_bytes(), sop_class=SC_SOP_CLASS), (1024, 685)),
        ("op_raw", dict(rgb=rgb), (1024, 685)),
        ("sc_raw", dict(rgb=rgb, sop_class=SC_SOP_CLASS), (1024, 685)),
        ("camera_op_jpeg", dict(jpeg=camera.read_bytes(), image_laterality="L"), (4288, 2848)),
    ]
    for k, (name, kw, size) in enumerate(cases):
        outcome = stage.admit(write_dicom(settings.inbox / name, patient_id=f"R{k}", **kw))
        assert isinstance(outcome, Admitted), (name, outcome)
        assert outcome.job.decoded.original_size == size
        if size == (1024, 685):  # the same picture as the JPEG file gives, within JPEG decoders' rounding
            assert np.abs(outcome.job.decoded.rgb.astype(int) - reference.rgb).mean() < 1.5, name
        with session_scope(stage.factory) as s:
            image = s.get(Image, outcome.job.image_id)
            assert (image.width, image.height, image.device) == (*size, "Topcon TRC-NW8")

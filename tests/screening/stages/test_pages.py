"""Multi-page files through the intake stage: one image per page, one drop per file, nothing moved before the
last page is stored (issue 12: "one result per page that is a fundus photo, or a rejection"); each page judged
by the intake checks exactly as a single photo is (issue 13: refused, ungradable or gradable; its own eye)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Drop, Image
from screening.rejection import RejectReason
from screening.stages import AdmittedPages, Duplicate, Filing, IntakeStage, Rejected, Resumed
from screening.stages.pages import page_sha256

from ..conftest import WHITE_PAGE, synthetic_fundus, write_tiff_pages

MODELS = Path(__file__).resolve().parents[3] / "models"


@pytest.fixture
def settings(settings):
    """The shipped gradability model: a scanned form must be refused by the learned verdict, page by page."""
    return settings.model_copy(update={"quality_model": MODELS / "quality.pt"})


def _stage(settings, **kwargs) -> IntakeStage:
    engine = make_engine(settings.database)
    init_db(engine)
    factory = make_session_factory(engine)
    for folder in (settings.inbox, settings.archive, settings.rejected):
        folder.mkdir(parents=True, exist_ok=True)
    return IntakeStage(settings, factory, Filing(settings, factory), image_size=64, **kwargs)


@pytest.fixture
def stage(settings):
    return _stage(settings)


def _visit(settings, name: str = "P1_R_20250301.tif") -> Path:
    """A thumbnail, two fundus photos and a scanned form, in one file."""
    import cv2

    a, b = synthetic_fundus(1), synthetic_fundus(2)
    return write_tiff_pages(settings.inbox / name, [cv2.resize(a, (64, 64)), a, WHITE_PAGE, b], subfiles=[1, 0, 0, 0])


def _pages(stage) -> list[Image]:
    with session_scope(stage.factory) as s:
        return list(s.scalars(select(Image).order_by(Image.id)))


def _mark_graded(stage, image_ids) -> None:
    from screening.db import repository as repo
    from screening.db.models import ImageState

    with session_scope(stage.factory) as s:
        for image_id in image_ids:
            repo.set_state(s, s.get(Image, image_id), ImageState.DONE)


def _one_page_graded_one_failed(stage, path: Path):
    """Admit ``path`` (a :func:`_visit`), mark its first fundus page graded and its second failed, as a worker
    that stopped mid-file leaves them; returns their jobs."""
    from screening.db import repository as repo
    from screening.db.models import ImageState

    done, failed = stage.admit(path).jobs
    _mark_graded(stage, [done.image_id])
    with session_scope(stage.factory) as s:
        repo.set_state(s, s.get(Image, failed.image_id), ImageState.FAILED, "x", code="grading_failed")
    return done, failed


def test_each_photo_of_a_file_is_an_image_to_grade_and_the_rest_are_refused(stage, settings):
    path = _visit(settings)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    outcome = stage.admit(path)
    assert isinstance(outcome, AdmittedPages), outcome
    assert len(outcome.jobs) == 2 and len(outcome.refused) == 1 and path.is_file()  # graded first, then moved
    images = _pages(stage)
    assert [(i.page, i.state, i.source_name, i.eye, (i.width, i.height)) for i in images] == [
        (2, "received", "P1_R_20250301.tif (page 2)", "R", (256, 256)),
        (3, "rejected", "P1_R_20250301.tif (page 3)", "R", (200, 200)),
        (4, "received", "P1_R_20250301.tif (page 4)", "R", (256, 256)),
    ]
    assert all(i.file_sha256 == sha and i.stored_path == str(path) and i.exam_id == images[0].exam_id for i in images)
    assert [i.sha256 for i in images] == [page_sha256(sha, n) for n in (2, 3, 4)]
    assert images[1].error_code == RejectReason.NOT_FUNDUS and "'P1_R_20250301.tif (page 3)'" in images[1].error
    assert "gradability model" in images[1].error  # the learned verdict, on that page alone
    assert [(j.image_id, j.sha256, j.file_sha256, j.path, j.gradable) for j in outcome.jobs] == [
        (images[0].id, images[0].sha256, sha, path, True), (images[2].id, images[2].sha256, sha, path, True)]
    assert all(j.decoded.whole is None for j in outcome.jobs)  # the whole page was for the checks only
    assert [(i.gradable, i.quality_reasons, i.eye_source) for i in images] == [
        (True, [], "name"), (None, None, None), (True, [], "name")]  # the refused page has no verdict, as a refused photo
    with session_scope(stage.factory) as s:
        drops = s.scalars(select(Drop)).all()
        assert [(d.outcome, d.sha256, d.image_id) for d in drops] == [("new", sha, images[0].id)]  # one arrival


def test_a_file_without_a_single_fundus_photo_is_refused_as_a_whole(stage, settings):
    path = write_tiff_pages(settings.inbox / "P2_L.tif", [WHITE_PAGE, WHITE_PAGE[:150]])
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.NOT_FUNDUS, outcome
    assert "none of the 2 pictures" in outcome.message
    assert "'P2_L.tif (page 1)' does not look like" in outcome.message and "'P2_L.tif (page 2)'" in outcome.message
    assert not path.exists() and outcome.filed_as.parent == settings.rejected
    [image] = _pages(stage)
    assert (image.page, image.file_sha256, image.state) == (None, None, "rejected")  # the file's own record


def test_a_file_over_the_page_limit_is_refused_as_a_whole(stage, settings):
    path = write_tiff_pages(settings.inbox / "P3_L.tif", [synthetic_fundus(k) for k in range(3)])
    limited = IntakeStage(stage.settings.model_copy(update={"max_pages": 2}), stage.factory, stage.filing, image_size=64)
    outcome = limited.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.MULTI_PAGE and "max_pages" in outcome.message
    assert [i.page for i in _pages(stage)] == [None]


def test_a_file_with_no_patient_is_refused_before_any_page_is_recorded(stage, settings):
    path = write_tiff_pages(settings.inbox / "scan.tif", [synthetic_fundus(1), synthetic_fundus(2)])
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.IDENTITY
    assert [i.page for i in _pages(stage)] == [None]


def test_a_cut_short_file_waits_then_is_refused_as_a_whole(stage, settings):
    import os
    import time

    from screening.stages import Deferred

    data = _visit(settings, "whole.tif").read_bytes()
    path = settings.inbox / "P4_R.tif"
    path.write_bytes(data[: len(data) - 4000])
    assert isinstance(stage.admit(path), Deferred) and _pages(stage) == []
    old = time.time() - settings.incomplete_grace - 60
    os.utime(path, (old, old))
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.INCOMPLETE


def test_the_file_again_is_a_duplicate_once_graded_and_a_conflict_under_another_patient(stage, settings):
    path = _visit(settings)
    first = stage.admit(path)
    _mark_graded(stage, [j.image_id for j in first.jobs])
    with session_scope(stage.factory) as s:  # the last page stored: the store stage archives the file
        sha = s.get(Image, first.jobs[0].image_id).file_sha256
    archived = stage.filing.archive_pages(sha, path)
    assert archived.is_file() and not path.exists()
    assert {i.stored_path for i in _pages(stage)} == {str(archived)}  # every page names the one archived file
    shutil.copy(archived, settings.inbox / "P1_R.tif")
    again = stage.admit(settings.inbox / "P1_R.tif")
    assert isinstance(again, Duplicate) and again.image_id == first.jobs[0].image_id
    shutil.copy(archived, settings.inbox / "P9_R.tif")
    conflict = stage.admit(settings.inbox / "P9_R.tif")
    assert isinstance(conflict, Rejected) and conflict.code == RejectReason.IDENTITY_CONFLICT
    with session_scope(stage.factory) as s:
        assert [d.outcome for d in s.scalars(select(Drop).order_by(Drop.id))] == ["new", "duplicate", "rejected"]
    assert len(_pages(stage)) == 3  # nothing recorded twice


def test_a_page_not_graded_yet_is_admitted_again_and_graded_pages_keep_their_result(stage, settings):
    """A restart with one page graded and one not: only the other is graded again; once all are graded and the
    file is still in the inbox, only its move is finished."""
    path = _visit(settings)
    done, failed = _one_page_graded_one_failed(stage, path)
    again = stage.admit(path)
    assert isinstance(again, AdmittedPages) and [j.image_id for j in again.jobs] == [failed.image_id]
    assert again.refused == ()  # the form was refused the first time: not counted again
    assert [i.state for i in _pages(stage)] == ["done", "rejected", "received"]
    _mark_graded(stage, [failed.image_id])
    resumed = stage.admit(path)
    assert isinstance(resumed, Resumed) and resumed.filed_as.is_file() and not path.exists()
    with session_scope(stage.factory) as s:
        assert [d.outcome for d in s.scalars(select(Drop))] == ["new"]  # still one arrival


def test_a_file_without_a_date_admitted_again_after_midnight_stays_in_its_first_visit(settings):
    """A worker stopped mid-file on day 1, restarted on day 2: the page still to grade joins the visit its graded
    page is in, and the graded page is not moved (its result, report and the visit's tallies belong there)."""
    from datetime import date

    from screening.db.models import Exam

    day = {"today": date(2025, 3, 1)}
    stage = _stage(settings, today=lambda: day["today"])
    done, failed = _one_page_graded_one_failed(stage, _visit(settings, "P1_R.tif"))  # no date in the name
    day["today"] = date(2025, 3, 2)
    again = stage.admit(settings.inbox / "P1_R.tif")
    assert isinstance(again, AdmittedPages) and [(j.image_id, j.exam_id) for j in again.jobs] == [(failed.image_id, done.exam_id)]
    with session_scope(stage.factory) as s:
        assert {i.exam_id for i in s.scalars(select(Image))} == {done.exam_id}
        assert [e.exam_date for e in s.scalars(select(Exam))] == [date(2025, 3, 1)]


def test_a_part_graded_file_renamed_to_another_patient_is_refused_not_split(stage, settings):
    """Renamed in the inbox after a stop mid-file to another patient's name: its graded page stayed with the first
    patient and the rest went to the second's visit. It is refused as an identity conflict, the graded page kept."""
    path = _visit(settings)
    done, failed = _one_page_graded_one_failed(stage, path)
    renamed = path.rename(settings.inbox / "P2_R_20250301.tif")
    again = stage.admit(renamed)
    assert isinstance(again, Rejected) and again.code == RejectReason.IDENTITY_CONFLICT
    assert "already graded for another patient" in again.message
    with session_scope(stage.factory) as s:
        patients = {i.exam.patient.code for i in s.scalars(select(Image)) if i.exam is not None}
        assert patients == {"P1"} and s.get(Image, done.image_id).state == "done"


def test_pages_not_graded_yet_take_the_name_their_file_is_admitted_under_again(stage, settings):
    """Renamed in the inbox before a restart: the pages still to grade show the new name (the report's heading),
    a page already graded keeps the name it was graded under."""
    path = _visit(settings)
    done, failed = _one_page_graded_one_failed(stage, path)
    renamed = path.rename(settings.inbox / "P1_R_20250301_1.tif")
    again = stage.admit(renamed)
    assert isinstance(again, AdmittedPages) and [j.image_id for j in again.jobs] == [failed.image_id]
    with session_scope(stage.factory) as s:
        names = {i.id: i.source_name for i in s.scalars(select(Image))}
    assert names[failed.image_id] == "P1_R_20250301_1.tif (page 4)"
    assert names[done.image_id] == "P1_R_20250301.tif (page 2)"


def test_each_page_is_judged_as_a_single_photo_would_be(stage, settings):
    """A sharp photo, a blurred one and a scanned form: the blurred page is admitted as ungradable with its
    reason (stored without a grade, as a blurred single photo is), the form refused as not a fundus photo."""
    import cv2

    sharp, blurred = synthetic_fundus(100, 300), cv2.GaussianBlur(synthetic_fundus(101, 300), (0, 0), 6)
    path = write_tiff_pages(settings.inbox / "P5_L.tif", [sharp, blurred, WHITE_PAGE])
    outcome = stage.admit(path)
    assert isinstance(outcome, AdmittedPages), outcome
    assert [j.gradable for j in outcome.jobs] == [True, False] and len(outcome.refused) == 1
    images = _pages(stage)
    assert [(i.page, i.state, i.gradable, i.quality_reasons) for i in images] == [
        (1, "received", True, []), (2, "received", False, ["blurred"]), (3, "rejected", None, None)]
    single = settings.inbox / "P6_L.png"  # the same blurred picture as a file of its own: the same verdict
    cv2.imwrite(str(single), cv2.cvtColor(blurred, cv2.COLOR_RGB2BGR))
    alone = stage.admit(single)
    assert not alone.job.gradable
    with session_scope(stage.factory) as s:
        one = s.get(Image, alone.job.image_id)
        assert (one.gradable, one.quality_reasons) == (False, ["blurred"])


def test_each_page_has_its_own_eye_when_the_name_states_none(settings, intake_models):
    """A visit's two eyes in one file named without an eye: each page is filed under the eye it clearly shows."""
    import numpy as np

    from training.data.synthetic import make_fundus

    stage = _stage(settings.model_copy(update={"laterality_model": intake_models["sure_eye"]}))
    left, right = (make_fundus(np.random.default_rng(k), size=256, eye=eye, dr_grade=0).image for k, eye in ((1, "L"), (2, "R")))
    outcome = stage.admit(write_tiff_pages(settings.inbox / "P7_20250301.tif", [left, right]))
    assert isinstance(outcome, AdmittedPages) and len(outcome.jobs) == 2, outcome
    assert [(i.eye, i.eye_source, i.predicted_eye) for i in _pages(stage)] == [("L", "image", "L"), ("R", "image", "R")]


def test_pages_without_a_stated_or_visible_eye_are_refused(stage, settings):
    """The laterality model here is never confident: with no eye in the name, every page is refused (code
    ``identity``, as such a single photo is), so the file is refused as a whole with each page's reason."""
    path = write_tiff_pages(settings.inbox / "P8.tif", [synthetic_fundus(1), synthetic_fundus(2)])
    outcome = stage.admit(path)
    assert isinstance(outcome, Rejected) and outcome.code == RejectReason.IDENTITY, outcome
    assert outcome.message.count("no eye stated for 'P8.tif (page ") == 2
    [image] = _pages(stage)
    assert (image.page, image.state, image.error_code) == (None, "rejected", "identity")

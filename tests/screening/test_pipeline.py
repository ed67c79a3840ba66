"""The worker end to end: inbox -> DB -> PDF, with duplicates, rejects, partial writes, late eyes, crashes."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from pypdf import PdfReader
from sqlalchemy import func, select

from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db.models import Drop, Event, Image, Report, Result
from screening.inference import Predictor
from screening.pipeline import Worker
from screening.stages import ReportFailed, ReportWritten, StoreStage

from .conftest import synthetic_fundus, write_dicom, write_fundus

PROJECT = Path(__file__).resolve().parents[2]


_OPEN: list[Worker] = []


@pytest.fixture(autouse=True)
def _close_workers():
    yield
    while _OPEN:
        _OPEN.pop().close()  # stops each worker's renderer process


def make_worker(settings, **kw) -> Worker:
    engine = make_engine(settings.database)
    init_db(engine)
    worker = Worker(settings, Predictor(settings.checkpoint, "cpu", 1), make_session_factory(engine), PROJECT / "templates", **kw)
    _OPEN.append(worker)
    return worker


def pdf_text(path: Path) -> str:
    return " ".join((p.extract_text() or "") for p in PdfReader(str(path)).pages)


def count(worker: Worker, model) -> int:
    with session_scope(worker.factory) as s:
        return s.scalar(select(func.count()).select_from(model))


def test_one_shot_real_photos_both_eyes_and_camera_file(settings, shared_data):
    worker = make_worker(settings)
    src = shared_data / "srahim"
    shutil.copy(src / "Patient002_R.jpg", settings.inbox / "Patient002_R.jpg")
    shutil.copy(src / "Patient002_L.jpg", settings.inbox / "Patient002_L.jpg")
    shutil.copy(shared_data / "fullres" / "camera_01.jpg", settings.inbox / "CAM7_OS_20251120.jpg")
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed) == (3, 0, 0)
    assert list(settings.inbox.iterdir()) == []
    assert len(list(settings.archive.rglob("*.jpg"))) == 3
    reports = sorted(settings.reports.rglob("report_v*.pdf"))
    assert [p.relative_to(settings.reports).parts[0] for p in reports] == ["CAM7", "Patient002"]
    text = pdf_text(settings.reports / "CAM7" / "2025-11-20" / "report_v1.pdf")
    assert "CAM7" in text and "2025-11-20" in text and "test-synthetic-v1" in text
    assert "NOT FOR CLINICAL USE" in text.upper()
    with session_scope(worker.factory) as s:
        cam = s.scalars(select(Image).where(Image.source_name == "CAM7_OS_20251120.jpg")).one()
        assert (cam.width, cam.height, cam.eye, cam.state) == (4288, 2848, "L", "reported")
        res = cam.result
        assert len(res.dr_probs) == 5 and abs(sum(res.dr_probs) - 1) < 1e-4
        assert 0 <= res.area_od <= 1
        assert sorted(p.name for p in Path(res.mask_dir).iterdir()) == sorted([
            "dme_cam.jpg", "dr_cam.jpg", "overlay.jpg", "photo.jpg",
            *(f"mask_{c}.{ext}" for c in ("EX", "HE", "MA", "OD", "SE") for ext in ("png", "tif"))])
        # the camera's masks at its own 4288x2848, where an image viewer overlays them on the original
        assert cv2.imread(res.original_masks["OD"], cv2.IMREAD_UNCHANGED).shape == (2848, 4288)


def test_duplicates_one_result_two_drops(settings_db):
    settings = settings_db  # on SQLite, then on PostgreSQL
    worker = make_worker(settings)
    write_fundus(settings.inbox / "P1_R.jpg", seed=1)
    shutil.copy(settings.inbox / "P1_R.jpg", settings.inbox / "P1_R_20250101.jpg")  # same bytes in the same batch
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.duplicates) == (1, 1)
    shutil.copy(next(settings.archive.rglob("*P1_R.jpg")), settings.inbox / "P1_R.jpg")  # dropped again later
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.duplicates) == (0, 1)
    # known content under a name without a patient id: still recognised (by content) as already graded
    (settings.inbox / "copy.jpg").write_bytes(next(settings.archive.rglob("*P1_R.jpg")).read_bytes())
    out = worker.run_once(settle_timeout=5)
    assert (out.duplicates, out.rejected) == (1, 0)
    assert count(worker, Result) == 1 and count(worker, Image) == 1
    with session_scope(worker.factory) as s:
        assert [d.outcome for d in s.scalars(select(Drop).order_by(Drop.id))] == ["new", "duplicate", "duplicate", "duplicate"]
        assert s.scalars(select(Image)).one().state == "reported"
    assert len(list((settings.archive).rglob("duplicates/*.jpg"))) == 3
    assert list(settings.inbox.iterdir()) == []


def test_rejected_files_keep_the_file_and_say_why(settings):
    # the shipped gradability model: a white page must be refused as not a fundus photo by the learned verdict
    worker = make_worker(settings.model_copy(update={"quality_model": PROJECT / "models" / "quality.pt"}))
    (settings.inbox / "P2_L.jpg").write_bytes(b"this is not a jpeg")
    write_fundus(settings.inbox / "holiday.jpg", seed=2)
    (settings.inbox / "P3_R.pdf").write_bytes(b"%PDF-1.4")
    import cv2
    import numpy as np
    cv2.imwrite(str(settings.inbox / "P4_R.png"), np.full((300, 300, 3), 255, np.uint8))  # a white page
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected) == (0, 4)
    reasons = {p.name.split("_", 2)[2].removesuffix(".reason.txt"): p.read_text() for p in settings.rejected.glob("*.reason.txt")}
    assert set(reasons) == {"P2_L.jpg", "holiday.jpg", "P3_R.pdf", "P4_R.png"}
    assert "not a readable image" in reasons["P2_L.jpg"]
    assert "no patient id" in reasons["holiday.jpg"]
    assert "unsupported" in reasons["P3_R.pdf"]
    assert "does not look like a colour fundus photo" in reasons["P4_R.png"]
    for name in reasons:  # the file itself is kept beside its reason
        assert any(p.name.endswith(name) for p in settings.rejected.iterdir() if not p.name.endswith(".txt"))
    with session_scope(worker.factory) as s:
        assert {i.state for i in s.scalars(select(Image))} == {"rejected"}
        assert s.scalar(select(func.count()).select_from(Drop).where(Drop.outcome == "rejected")) == 4


def test_a_file_name_that_is_not_utf8_is_refused_with_its_bytes_kept(settings_db):
    """A Latin-1 name from a share with another character set ('P\\xe4tient9_R_...'): no claim, row or log line could
    hold it, so it stayed in the inbox for ever with a traceback at each retry. It is renamed to show its bytes and
    refused, saying how to name it, on SQLite and PostgreSQL."""
    import os

    worker = make_worker(settings_db)
    write_fundus(settings_db.inbox / "P9_L_20261202.jpg", seed=9)
    data = (settings_db.inbox / "P9_L_20261202.jpg").read_bytes()
    (settings_db.inbox / "P9_L_20261202.jpg").unlink()
    bad = os.path.join(os.fsencode(settings_db.inbox), b"P\xe4tient9_R_20261202.jpg")
    with open(bad, "wb") as fh:
        fh.write(data)
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed) == (0, 1, 0)
    assert os.listdir(os.fsencode(settings_db.inbox)) == []
    [reason] = settings_db.rejected.glob("*.reason.txt")
    text = reason.read_text(encoding="utf-8")
    assert "not UTF-8 text" in text and "P\\xe4tient9_R_20261202.jpg" in text
    [kept] = [p for p in settings_db.rejected.iterdir() if not p.name.endswith(".txt")]
    assert kept.read_bytes() == data  # the photo itself, unchanged
    with session_scope(worker.factory) as s:
        [drop] = s.scalars(select(Drop)).all()
        assert (drop.outcome, drop.source_name, drop.reason_code) == ("rejected", "P\\xe4tient9_R_20261202.jpg", "identity")


def test_second_eye_later_rerenders_and_keeps_v1(settings_db):
    settings = settings_db  # on SQLite, then on PostgreSQL
    worker = make_worker(settings)
    write_fundus(settings.inbox / "P9_R_20251101.jpg", seed=3)
    worker.run_once(settle_timeout=5)
    folder = settings.reports / "P9" / "2025-11-01"
    v1 = (folder / "report_v1.pdf").read_bytes()
    assert "not received" in pdf_text(folder / "report_v1.pdf").lower()
    write_fundus(settings.inbox / "P9_L_20251101.jpg", seed=4)
    worker.run_once(settle_timeout=5)
    assert (folder / "report_v1.pdf").read_bytes() == v1
    text = pdf_text(folder / "report_v2.pdf")
    assert "Right eye" in text and "Left eye" in text and "not received" not in text.lower()
    assert (folder / "latest.pdf").read_bytes() == (folder / "report_v2.pdf").read_bytes()
    with session_scope(worker.factory) as s:
        assert [r.version for r in s.scalars(select(Report).order_by(Report.version))] == [1, 2]


def test_numbered_fields_of_one_eye_are_one_visit_with_both_fields(settings):
    """Cameras number the fields of an eye (``_1``, ``_2``): the default names take the number, so both photos are
    graded as fields of the same eye and visit, and one report shows both."""
    worker = make_worker(settings)
    write_fundus(settings.inbox / "P11_OD_20251103_1.jpg", seed=7)
    write_fundus(settings.inbox / "P11_OD_20251103_2.jpg", seed=8)
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.reports, out.rejected) == (2, 1, 0)
    text = pdf_text(settings.reports / "P11" / "2025-11-03" / "report_v1.pdf")
    for needle in ("P11_OD_20251103_1.jpg", "P11_OD_20251103_2.jpg", "Field 1 of 2", "Field 2 of 2"):
        assert needle in text, needle
    with session_scope(worker.factory) as s:
        assert {(i.eye, i.exam.patient.code, i.exam.exam_date.isoformat()) for i in s.scalars(select(Image))} == {
            ("R", "P11", "2025-11-03")}


def test_a_second_field_of_the_same_eye_from_dicom_rerenders_with_both_fields(settings):
    """Macula-centred field as a named JPEG, the disc-centred field of the same eye later as a nameless DICOM
    export: a new report version shows both fields; the camera is recorded; masks exist at each photo's size."""
    worker = make_worker(settings)
    write_fundus(settings.inbox / "P10_R_20251102.jpg", seed=5)
    worker.run_once(settle_timeout=5)
    folder = settings.reports / "P10" / "2025-11-02"
    v1 = (folder / "report_v1.pdf").read_bytes()
    write_dicom(settings.inbox / "IM000001", rgb=synthetic_fundus(6, size=300), patient_id="P10", image_laterality="R",
                acquisition="20251102093000")
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.reports, out.rejected) == (1, 1, 0)
    assert (folder / "report_v1.pdf").read_bytes() == v1
    text = pdf_text(folder / "report_v2.pdf")
    for needle in ("P10_R_20251102.jpg", "IM000001", "Field 1 of 2", "Field 2 of 2", "eye result", "worst gradable field"):
        assert needle in text, needle
    with session_scope(worker.factory) as s:
        images = list(s.scalars(select(Image).order_by(Image.id)))
        assert [(i.eye, i.device, i.width, i.height, i.state) for i in images] == [
            ("R", None, 256, 256, "reported"), ("R", "Topcon TRC-NW8", 300, 300, "reported")]
        for image in images:
            paths = image.result.original_masks
            assert sorted(paths) == ["EX", "HE", "MA", "OD", "SE"]
            tif = cv2.imread(paths["OD"], cv2.IMREAD_UNCHANGED)
            assert tif.shape == (image.height, image.width)
        assert [r.version for r in s.scalars(select(Report).order_by(Report.version))] == [1, 2]


def test_one_report_per_exam_even_when_its_eyes_fall_in_different_batches(settings):
    worker = make_worker(settings.model_copy(update={"batch_size": 1}))  # four forwards, each eye alone
    for i, name in enumerate(["Q1_L.jpg", "Q1_R.jpg", "Q2_L.jpg", "Q2_R.jpg"]):
        write_fundus(settings.inbox / name, seed=30 + i)
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.reports) == (4, 2)
    assert sorted(p.relative_to(settings.reports).parts[0] for p in settings.reports.rglob("report_v*.pdf")) == ["Q1", "Q2"]
    for patient in ("Q1", "Q2"):
        text = pdf_text(next((settings.reports / patient).rglob("report_v1.pdf")))
        assert "not received" not in text.lower()
    with session_scope(worker.factory) as s:
        assert {i.state for i in s.scalars(select(Image))} == {"reported"}


def test_next_batch_is_prepared_in_a_thread_and_a_failed_one_fails_alone(settings):
    """The worker prepares batch k+1 in a helper thread while batch k finishes: the grades are those of a plain
    predict, and a batch whose preparation fails is marked failed (file kept in the inbox) without the others."""
    from screening.imaging import decode

    worker = make_worker(settings.model_copy(update={"batch_size": 1}))
    for i in range(4):
        write_fundus(settings.inbox / f"T{i}_R.jpg", seed=40 + i)
    real_prepare, calls = worker.predictor.prepare, []

    def prepare(images):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("simulated preprocessing failure")
        return real_prepare(images)

    worker.predictor.prepare = prepare
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.failed) == (3, 1) and len(calls) == 4
    assert all(name.startswith("prepare") for name in calls)
    (left,) = list(settings.inbox.iterdir())  # the failed image's file stays for the retry
    with session_scope(worker.factory) as s:
        failed = s.scalars(select(Image).where(Image.state == "failed")).one()
        assert failed.source_name == left.name and "simulated preprocessing failure" in (failed.error or "")
        graded = {i.source_name: i.result.dr_probs for i in s.scalars(select(Image).where(Image.state != "failed"))}
    worker.predictor.prepare = real_prepare
    for name, probs in graded.items():
        archived = next(settings.archive.rglob(f"*_{name}"))
        direct = worker.predictor.predict([decode(archived, worker.predictor.size).rgb])[0]
        assert probs == pytest.approx(direct.dr_probs, abs=1e-9)


class HeldRenderer:
    """Test double for the renderer process: keeps jobs until the test lets each one succeed or fail."""

    def __init__(self) -> None:
        self.jobs: dict[int, object] = {}
        self.done: list = []
        self.closed = False

    def start(self) -> None:
        pass

    def submit(self, job) -> None:
        self.jobs[job.key] = job

    def release(self, key: int, fail: bool = False) -> None:
        from screening.renderer import RenderResult, render_job

        job = self.jobs.pop(key)
        self.done.append(RenderResult(key, job.ctx.report_version, None, "RuntimeError: disk full") if fail else render_job(job))

    def results(self, timeout: float = 0.0) -> list:
        done, self.done = self.done, []
        return done

    @property
    def pending(self) -> int:
        return len(self.jobs) + len(self.done)

    def close(self, timeout: float = 30.0) -> None:
        self.closed = True
        for key in sorted(self.jobs):  # what a stopped renderer process does with the jobs it held
            self.release(key, fail=True)


def test_a_hung_renderer_is_stopped_and_its_reports_retried_later(settings):
    held = HeldRenderer()
    worker = make_worker(settings, renderer=held)
    write_fundus(settings.inbox / "P4_R.jpg", seed=42)
    worker.process([settings.inbox / "P4_R.jpg"])
    assert len(held.jobs) == 1
    t0 = time.monotonic()
    outcomes = worker.report.wait(stall_timeout=0.5)  # the renderer never answers
    assert time.monotonic() - t0 < 10 and held.closed and worker.report.in_flight == {}
    assert [type(o) for o in outcomes] == [ReportFailed] and outcomes[0].error == "RuntimeError: disk full"
    with session_scope(worker.factory) as s:
        assert s.scalars(select(Image)).one().state == "done"
        assert s.scalar(select(func.count()).select_from(Event).where(Event.kind == "report_failed")) == 1
    worker.report.submit()  # the catch-up sends it again
    (job,) = held.jobs.values()
    held.release(job.key)
    (written,) = worker.report.collect()
    assert isinstance(written, ReportWritten) and written.path.name == "report_v1.pdf" and written.version == 1
    with session_scope(worker.factory) as s:
        assert s.scalars(select(Image)).one().state == "reported"


def test_second_eye_while_the_first_report_renders(settings):
    """v1 (right eye) is still rendering when the left eye is stored: v2 is queued with both eyes. If v1 then
    succeeds and v2 fails, the left eye must not count as reported, and the catch-up renders it."""
    from screening.db import repository as repo

    held = HeldRenderer()
    worker = make_worker(settings, renderer=held)
    write_fundus(settings.inbox / "P3_R_20250301.jpg", seed=40)
    worker.process([settings.inbox / "P3_R_20250301.jpg"])
    (first,) = held.jobs.values()
    write_fundus(settings.inbox / "P3_L_20250301.jpg", seed=41)
    worker.process([settings.inbox / "P3_L_20250301.jpg"])
    second = held.jobs[max(held.jobs)]
    assert (first.ctx.report_version, [e.eye for e in first.ctx.eyes]) == (1, ["R"])
    assert (second.ctx.report_version, [e.eye for e in second.ctx.eyes]) == (2, ["R", "L"])
    assert worker.report.submit() == 0  # catch-up while both are on the way: nothing more to send
    assert len(held.jobs) == 2
    held.release(first.key)
    held.release(second.key, fail=True)
    out = worker.process([])
    assert out.reports == 0  # process() only records between batches; collect now
    outcomes = worker.report.collect()
    assert [(type(o), o.version) for o in outcomes] == [(ReportWritten, 1), (ReportFailed, 2)]
    with session_scope(worker.factory) as s:
        assert {i.eye: i.state for i in s.scalars(select(Image))} == {"R": "reported", "L": "done"}
        assert [e.id for e in repo.exams_needing_report(s)] == [s.scalars(select(Image)).first().exam_id]
    worker.report.submit()
    (retry,) = held.jobs.values()
    assert [e.eye for e in retry.ctx.eyes] == ["R", "L"]
    assert retry.ctx.report_version == 2  # the failed v2 wrote no file and no row: its number is free again
    held.release(retry.key)
    worker.report.collect()
    with session_scope(worker.factory) as s:
        assert {i.state for i in s.scalars(select(Image))} == {"reported"}
        assert [r.version for r in s.scalars(select(Report).order_by(Report.version))] == [1, 2]
        assert repo.exams_needing_report(s) == []
    folder = settings.reports / "P3" / "2025-03-01"
    assert "Left eye" in pdf_text(folder / "report_v2.pdf") and "not received" in pdf_text(folder / "report_v1.pdf").lower()


@pytest.mark.parametrize("priority", ["idle", "low"])
def test_the_worker_starts_its_renderer_at_the_configured_priority(settings, priority):
    """[screening] report_priority reaches the render process the worker starts (the default included)."""
    from screening.renderer import ProcessRenderer

    settings = settings.model_copy(update={"report_priority": priority})
    with make_worker(settings) as worker:
        renderer = worker.report.renderer
        assert isinstance(renderer, ProcessRenderer) and renderer.priority == priority


@pytest.mark.parametrize("renderer", ["process", "inline"])
def test_report_failure_keeps_result_and_is_retried(settings, tmp_path, renderer):
    worker = make_worker(settings.model_copy(update={"report_renderer": renderer, "report_retries": 1}))
    write_fundus(settings.inbox / "P5_R.jpg", seed=5)
    worker.report.templates_dir = tmp_path / "no-templates"  # the renderer finds no template: every attempt fails
    out = worker.run_once(settle_timeout=5)
    assert out.processed == 1 and out.reports == 0
    with session_scope(worker.factory) as s:
        assert s.scalars(select(Image)).one().state == "done"
        failed = s.scalars(select(Event).where(Event.kind == "report_failed")).all()
        assert len(failed) == 1 and "report.css" in failed[0].message
    assert not list(settings.reports.rglob("*.pdf"))
    worker.report.templates_dir = PROJECT / "templates"
    out = worker.run_once(settle_timeout=5)
    assert out.reports == 1
    with session_scope(worker.factory) as s:
        assert s.scalars(select(Image)).one().state == "reported"


def _visit_tiff(settings, name: str = "P8_R_20250301.tif") -> Path:
    """Two fundus photos and a scanned form in one TIFF."""
    from .conftest import WHITE_PAGE, write_tiff_pages

    return write_tiff_pages(settings.inbox / name, [synthetic_fundus(81), WHITE_PAGE, synthetic_fundus(82)])


def _judging(settings):
    """Settings whose gradability verdict depends on the page (the shipped model): a scanned form is refused."""
    return settings.model_copy(update={"report_renderer": "inline", "batch_size": 1,
                                       "quality_model": PROJECT / "models" / "quality.pt"})


def test_each_photos_lesions_are_judged_by_the_model_that_graded_it(settings, tmp_path):
    """The worker's draft, then the reviewed version: a photo graded by a model that cannot detect microaneurysms
    says "not assessed"; one graded (after the checkpoint was replaced) by a model that can, gives its area."""
    from screening.review.reviewed_report import ModelCatalog, render_reviewed_report
    from screening.review.visits import sign_off

    from .conftest import TEMPLATES, make_checkpoint, run_worker

    blind = make_checkpoint(tmp_path / "blind.pt", test_metrics={"MA AUPR": 0.0004, "HE AUPR": 0.3, "EX AUPR": 0.6,
                                                                  "SE AUPR": 0.2})
    worked = run_worker(settings.model_copy(update={"checkpoint": blind}), {"P4_R_20251120.jpg": 5})
    [v1] = settings.reports.rglob("report_v1.pdf")
    assert "Microaneurysms (MA): not assessed*" in " ".join(pdf_text(v1).split())
    settings.demo_checkpoint.parent.mkdir(parents=True, exist_ok=True)  # the old model stays installed, to be looked up
    shutil.copy(blind, settings.demo_checkpoint)
    seeing = make_checkpoint(tmp_path / "seeing.pt", test_metrics={"MA AUPR": 0.4, "HE AUPR": 0.5, "EX AUPR": 0.6,
                                                                    "SE AUPR": 0.3})
    later = settings.model_copy(update={"checkpoint": seeing})
    run_worker(later, {"P4_L_20251120.jpg": 6})
    text = " ".join(pdf_text(v1.parent / "report_v2.pdf").split())
    assert text.count("Microaneurysms (MA): not assessed*") == 1 and re.search(r"Microaneurysms \(MA\): [\d.<]+%", text)
    with session_scope(worked.factory) as s:
        sign_off(s, worked.exams["P4"], reviewer="Dr A. Grey", source="cli")
    reviewed = render_reviewed_report(worked.factory, worked.exams["P4"], catalog=ModelCatalog.from_settings(later),
                                      clinic_name="C", templates_dir=TEMPLATES, reports_dir=settings.reports)
    text = " ".join(pdf_text(Path(reviewed.path)).split())
    assert text.count("Microaneurysms (MA): not assessed*") == 1 and re.search(r"Microaneurysms \(MA\): [\d.<]+%", text)


def test_a_draft_after_a_sign_off_says_who_signed_which_version_and_that_it_awaits_review_again(settings):
    """A photo added after a sign-off made a plain draft the newest PDF (latest.pdf), with no sign of the sign-off."""
    from screening.review.reviewed_report import ModelCatalog, render_reviewed_report
    from screening.review.visits import sign_off

    from .conftest import TEMPLATES, run_worker

    worked = run_worker(settings, {"P2_R_20251120.jpg": 3})  # dated: two runs either side of midnight are one visit
    exam_id = worked.exams["P2"]
    with session_scope(worked.factory) as s:
        sign_off(s, exam_id, reviewer="Dr A. Grey", source="cli")
    render_reviewed_report(worked.factory, exam_id, catalog=ModelCatalog.from_settings(worked.settings), clinic_name="C",
                           templates_dir=TEMPLATES, reports_dir=settings.reports)  # v2, the reviewed version
    run_worker(settings, {"P2_L_20251120.jpg": 4})  # the second eye, after the sign-off
    [folder] = {p.parent for p in settings.reports.rglob("report_v3.pdf")}
    text = " ".join(pdf_text(folder / "report_v3.pdf").split())
    assert "This visit was signed off by Dr A. Grey on " in text
    assert "(report v2), recommending 'Urgent referral (proliferative DR)'. Photographs were added" in text
    assert "awaits review again" in text
    assert "signed off" not in pdf_text(folder / "report_v1.pdf")  # before the sign-off: nothing to say
    with session_scope(worked.factory) as s:  # signed off again, its reviewed version not rendered (a failed render)
        sign_off(s, exam_id, reviewer="Dr B. Abbot", source="cli")
    run_worker(settings, {"P2_R_20251120_2.jpg": 5})  # a second field
    text = " ".join(pdf_text(folder / "report_v4.pdf").split())
    assert "signed off by Dr B. Abbot on " in text and "its reviewed version is not rendered yet" in text


def test_a_multi_page_file_gives_one_result_per_fundus_page_and_is_archived_once(settings):
    """Issue 12: a multi-page TIFF used page 1 only, silently, then was refused as a whole."""
    worker = make_worker(_judging(settings))
    tiff = _visit_tiff(settings)
    write_fundus(settings.inbox / "P8_L_20250301.jpg", seed=83)
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed, out.unmoved, out.reports) == (3, 1, 0, 0, 1) and out.ok
    assert list(settings.inbox.iterdir()) == []
    [archived] = [p for p in settings.archive.rglob("*.tif")]
    assert archived.name.endswith("_P8_R_20250301.tif") and not tiff.exists()
    with session_scope(worker.factory) as s:
        pages = s.scalars(select(Image).where(Image.page.is_not(None)).order_by(Image.page)).all()
        assert [(i.page, i.state, i.result is not None) for i in pages] == [(1, "reported", True), (2, "rejected", False),
                                                                           (3, "reported", True)]
        assert {i.stored_path for i in pages} == {str(archived)}
        assert [d.outcome for d in s.scalars(select(Drop))] == ["new", "new"]  # two files, two arrivals
    text = pdf_text(next(settings.reports.rglob("report_v1.pdf")))
    assert "P8_R_20250301.tif (page 1)" in text and "P8_R_20250301.tif (page 3)" in text  # the right eye's two fields
    # the refused page is named on the report: a clinician must know a page of the file was not graded
    assert "Not graded: 1 page of a multi-page file was refused." in text
    assert "'P8_R_20250301.tif (page 2)' does not look like a colour fundus photo" in text
    from screening.review.reviewed_report import ModelCatalog, render_reviewed_report
    from screening.review.visits import sign_off

    with session_scope(worker.factory) as s:  # the reviewed version says so too
        exam_id = s.scalars(select(Image.exam_id).where(Image.page == 1)).one()
        sign_off(s, exam_id, reviewer="Dr Grey", source="cli")
    reviewed = render_reviewed_report(worker.factory, exam_id, catalog=ModelCatalog.from_settings(settings),
                                      clinic_name="C", templates_dir=PROJECT / "templates", reports_dir=settings.reports)
    assert "Not graded: 1 page of a multi-page file was refused." in pdf_text(Path(reviewed.path))
    from screening.audit import audit_summary

    with session_scope(worker.factory) as s:  # each arrival once by its outcome, each page once by its state
        summary = audit_summary(s)
    assert summary.drops == {"new": 2, "duplicate": 0, "rejected": 0}
    assert (summary.overall.images, summary.rejected, summary.rejected_reasons) == (3, 1, {"not_fundus": 1})


def test_a_page_that_fails_keeps_its_file_in_the_inbox_until_it_is_graded(settings):
    worker = make_worker(_judging(settings))
    tiff = _visit_tiff(settings)
    real_prepare, calls = worker.predictor.prepare, []

    def prepare(images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure of the second page")
        return real_prepare(images)

    worker.predictor.prepare = prepare
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.failed, out.unmoved) == (1, 1, 0) and not out.ok
    assert tiff.is_file() and list(settings.archive.rglob("*.tif")) == []  # page 1 graded, the file waits for page 3
    worker.predictor.prepare = real_prepare
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed) == (1, 0, 0) and out.ok and not tiff.exists()
    with session_scope(worker.factory) as s:
        assert sorted(i.state for i in s.scalars(select(Image))) == ["rejected", "reported", "reported"]
        assert count(worker, Result) == 2 and [d.outcome for d in s.scalars(select(Drop))] == ["new"]
    assert len(list(settings.archive.rglob("*.tif"))) == 1


def test_an_ungradable_page_is_stored_without_a_grade_and_the_file_leaves_with_the_last_page(settings):
    """A sharp and a blurred photo of the right eye in one TIFF: the blurred page is stored as ungradable (no
    result, its reason, its display photo), the sharp one graded; the report shows both fields; the file is
    archived once, after both are stored, whichever is stored last."""
    import cv2

    from .conftest import write_tiff_pages

    worker = make_worker(_judging(settings))
    blurred = cv2.GaussianBlur(synthetic_fundus(101, 300), (0, 0), 6)
    tiff = write_tiff_pages(settings.inbox / "P9_R_20250301.tif", [synthetic_fundus(100, 300), blurred])
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed, out.unmoved, out.reports) == (2, 0, 0, 0, 1) and out.ok
    [archived] = list(settings.archive.rglob("*.tif"))
    assert not tiff.exists() and list(settings.inbox.iterdir()) == []
    with session_scope(worker.factory) as s:
        pages = s.scalars(select(Image).order_by(Image.page)).all()
        assert [(i.page, i.state, i.gradable, i.quality_reasons, i.result is not None) for i in pages] == [
            (1, "reported", True, [], True), (2, "reported", False, ["blurred"], False)]
        assert {i.stored_path for i in pages} == {str(archived)}
        assert Path(pages[1].photo_dir, "photo.jpg").is_file()  # its display photo, for the report
    text = " ".join(pdf_text(next(settings.reports.rglob("report_v1.pdf"))).split())
    assert "P9_R_20250301.tif (page 1)" in text and "P9_R_20250301.tif (page 2)" in text
    assert "Ungradable: recapture" in text


def test_a_file_of_ungradable_pages_is_archived_by_the_last_one_stored(settings):
    """Nothing to grade: the first page stored waits for the second (awaits_pages), the second archives the file."""
    import cv2

    from screening.stages.outcomes import Stored

    from .conftest import write_tiff_pages

    worker = make_worker(_judging(settings))
    stored: list[Stored] = []
    real = worker.store.save_ungradable
    worker.store.save_ungradable = lambda job: stored.append(real(job)) or stored[-1]
    tiff = write_tiff_pages(settings.inbox / "P9_L.tif", [cv2.GaussianBlur(synthetic_fundus(k, 300), (0, 0), 6) for k in (101, 102)])
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.failed, out.unmoved) == (2, 0, 0) and out.ok and not tiff.exists()
    assert [(s.awaits_pages, s.archived_as is not None) for s in stored] == [(True, False), (False, True)]
    assert stored[1].archived_as.is_file() and count(worker, Result) == 0


def _two_sites(settings):
    """Two workers (sites north and south) on one inbox and database, each with its own claims."""
    judging = _judging(settings)
    return (make_worker(judging.model_copy(update={"site": "north"})),
            make_worker(judging.model_copy(update={"site": "south"})))


def _one_of_each(worker, settings, tiff: Path) -> None:
    """Each fundus page graded once, the file archived once, one arrival, report versions 1..n without a gap."""
    from screening.rejection import Incident

    assert not tiff.exists() and list(settings.inbox.iterdir()) == []
    [archived] = list(settings.archive.rglob("*.tif"))
    with session_scope(worker.factory) as s:
        pages = s.scalars(select(Image).order_by(Image.page)).all()
        assert [(i.page, i.state) for i in pages] == [(1, "reported"), (2, "rejected"), (3, "reported")]
        assert {i.stored_path for i in pages} == {str(archived)}
        results = s.scalars(select(Result)).all()
        assert sorted(r.image_id for r in results) == [pages[0].id, pages[2].id]  # one result per page
        assert [d.outcome for d in s.scalars(select(Drop))] == ["new"]
        assert s.scalar(select(func.count()).select_from(Event).where(Event.code == Incident.NOT_MOVED.value)) == 0
        versions = sorted(s.scalars(select(Report.version)))
        assert versions == list(range(1, len(versions) + 1)) and versions


def test_two_workers_on_one_multi_page_file_grade_each_page_once_and_archive_it_once(settings_db):
    """Two workers handed the same multi-page TIFF at the same moment: the file's claim covers all its pages, so
    one worker admits, grades and archives them while the other leaves the file to it (issue 15 with issue 12's
    pages); on SQLite and on PostgreSQL."""
    north, south = _two_sites(settings_db)
    tiff = _visit_tiff(settings_db)
    start = threading.Barrier(2)
    outs: dict[str, object] = {}

    def run(worker, name):
        start.wait(30)
        outs[name] = worker.process([tiff])
        worker.report.wait()

    threads = [threading.Thread(target=run, args=(w, n)) for w, n in ((north, "north"), (south, "south"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(outs) == {"north", "south"} and all(o.ok for o in outs.values())  # type: ignore[attr-defined]
    assert sorted(o.processed for o in outs.values()) == [0, 2]  # type: ignore[attr-defined]
    _one_of_each(north, settings_db, tiff)
    with session_scope(north.factory) as s:
        assert len({r.site for r in s.scalars(select(Result))}) == 1  # both pages by the worker that held the file


def test_a_multi_page_file_taken_over_mid_way_is_finished_by_the_new_holder_alone(settings_db):
    """North stores page 1 and then stalls past its lease: south takes the file over, finds page 1 stored, grades
    page 3 and archives the file. North, resuming, commits nothing more for that file (ClaimLost: page 3 is not
    graded twice) and does not move it; on SQLite and on PostgreSQL."""
    from screening.db import claims as db_claims
    from screening.db.models import ClaimKind

    north, south = _two_sites(settings_db)
    tiff = _visit_tiff(settings_db)
    real_save, saved, south_out = north.store.save, [], []

    def save(job, pred, ms):
        if saved:  # north comes back after the takeover
            return real_save(job, pred, ms)
        saved.append(real_save(job, pred, ms))
        assert saved[0].awaits_pages  # page 3 is not stored yet: the file stays
        with session_scope(south.factory) as s:  # what a takeover after the lease does (compare-and-set on the holder)
            assert db_claims.take_over(s, ClaimKind.FILE, tiff.name, south.claims.holder, "south", 60.0,
                                       north.claims.holder)
        south_out.append(south.process([tiff]))
        south.report.wait()
        return saved[0]

    north.store.save = save
    out = north.process([tiff])
    north.report.wait()
    assert (out.processed, out.elsewhere, out.failed, out.unmoved) == (1, 1, 0, 0)
    [theirs] = south_out
    assert (theirs.processed, theirs.failed, theirs.unmoved) == (1, 0, 0) and theirs.ok
    _one_of_each(north, settings_db, tiff)
    with session_scope(north.factory) as s:
        assert [r.site for r in s.scalars(select(Result).order_by(Result.image_id))] == ["north", "south"]


def test_crash_before_commit_redoes_the_image(settings_db, monkeypatch):
    settings = settings_db  # on SQLite, then on PostgreSQL
    worker = make_worker(settings)
    write_fundus(settings.inbox / "P7_L.jpg", seed=7)
    monkeypatch.setattr(StoreStage, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        worker.run_once(settle_timeout=5)
    monkeypatch.undo()
    with session_scope(worker.factory) as s:
        assert s.scalars(select(Image)).one().state == "received"
    out = make_worker(settings).run_once(settle_timeout=5)
    assert out.processed == 1 and count(worker, Result) == 1 and count(worker, Drop) == 1


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_watch_mode_waits_for_partial_writes(settings, source, request):
    if source == "real":
        full = (request.getfixturevalue("shared_data") / "fullres" / "camera_03.jpg").read_bytes()
    else:
        full = write_fundus(settings.work_dir / "src.jpg", seed=8).read_bytes()
    worker = make_worker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        target = settings.inbox / "P8_R.jpg"
        with open(target, "wb") as fh:  # a slow copy over a network share
            for i in range(0, len(full), len(full) // 5 + 1):
                fh.write(full[i:i + len(full) // 5 + 1])
                fh.flush()
                time.sleep(0.06)
        (settings.inbox / ".hidden_P8_L.jpg.part").write_bytes(full)  # ignored until renamed
        deadline = time.time() + 60
        while time.time() < deadline and not list(settings.reports.rglob("report_v1.pdf")):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
    import hashlib
    with session_scope(worker.factory) as s:
        images = s.scalars(select(Image)).all()
    assert [i.sha256 for i in images] == [hashlib.sha256(full).hexdigest()]  # read whole, once
    assert images[0].state == "reported"
    assert (settings.inbox / ".hidden_P8_L.jpg.part").exists()


def _renderer_children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"screening.renderer" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_killed_worker_leaves_consistent_state(settings_db, tmp_path):
    """SIGKILL the real CLI mid-run, restart it: every photo ends graded exactly once, none lost."""
    settings = settings_db  # on SQLite, then on PostgreSQL
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[screening]\n"
        f"inbox = '{settings.inbox}'\nreports = '{settings.reports}'\narchive = '{settings.archive}'\n"
        f"rejected = '{settings.rejected}'\nwork_dir = '{settings.work_dir}'\ndatabase = '{settings.database}'\n"
        f"checkpoint = '{settings.checkpoint}'\nquality_model = '{settings.quality_model}'\n"
        f"laterality_model = '{settings.laterality_model}'\nstable_seconds = 0.1\nthreads = 1\ndevice = 'cpu'\nbatch_size = 2\n"
        f"report_priority = '{settings.report_priority}'\n"
    )
    for i in range(6):
        write_fundus(settings.inbox / f"K{i // 2}_{'RL'[i % 2]}.jpg", seed=20 + i)
    cmd = [sys.executable, "-m", "screening.cli", "--config", str(cfg), "run", "--once"]
    proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(settings.inbox.iterdir())) == 6 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    renderers = _renderer_children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # its renderer process (if it had started one) sees its input close and exits; it runs niced and may be in the
    # middle of a render (or of importing WeasyPrint), which on a loaded 2-core machine took over 15 s once
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in renderers):
        time.sleep(0.1)
    assert not [pid for pid in renderers if Path(f"/proc/{pid}").exists() and _alive(pid)]
    done = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(settings.inbox.iterdir()) == []
    engine = make_engine(settings.database)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 6
        assert {i.state for i in s.scalars(select(Image))} == {"reported"}
        assert s.scalar(select(func.count()).select_from(Drop).where(Drop.outcome == "duplicate")) == 0
    assert len(list(settings.reports.glob("K*/*/latest.pdf"))) == 3
    assert not [p for p in settings.reports.rglob("*") if p.is_file() and not p.name.endswith(".pdf")]


# ------------------------------------------------------------------------------------ intake checks (issue 13)


def test_an_ungradable_eye_gets_no_grade_and_its_report_says_recapture(settings, intake_models):
    """Left eye ungradable (worker with a verdict of 'too dark, blurred'), right eye graded later: no result row
    for the left eye, its reasons on the report, the patient recalled; then the audit counts it for the day."""
    from screening.audit import audit_summary

    first = make_worker(settings.model_copy(update={"quality_model": intake_models["dark_blurred"]}))
    write_fundus(settings.inbox / "P20_L_20251103.jpg", seed=20)
    out = first.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed, out.reports) == (1, 0, 0, 1)
    folder = settings.reports / "P20" / "2025-11-03"
    text = pdf_text(folder / "report_v1.pdf")
    assert "Ungradable: recapture" in text and "too dark (under-exposed)" in text and "blurred (out of focus" in text
    assert "recall the patient for new photographs" in text
    with session_scope(first.factory) as s:
        image = s.scalars(select(Image)).one()
        assert (image.state, image.gradable, image.result) == ("reported", False, None)
        assert (Path(settings.work_dir) / image.sha256[:2] / image.sha256 / "photo.jpg").is_file()
    assert count(first, Result) == 0 and not list(settings.inbox.iterdir())

    second = make_worker(settings.model_copy(update={"ungradable_rule": "refer"}))
    write_fundus(settings.inbox / "P20_R_20251103.jpg", seed=21)
    second.run_once(settle_timeout=5)
    text = pdf_text(folder / "report_v2.pdf")
    assert "Ungradable: recapture" in text  # the left eye's row and section
    assert count(second, Result) == 1
    with session_scope(second.factory) as s:
        right = s.scalars(select(Result)).one()  # the tiny random model's grade decides whether it outranks the rule
        right_needs_referral = right.dr_grade >= 2 or right.dme_grade >= 1 or right.referable
    if not right_needs_referral:
        assert "Refer: ungradable photographs" in text and "Left eye: ungradable" in text
    with session_scope(second.factory) as s:
        summary = audit_summary(s)
    assert (summary.assessed, summary.ungradable) == (2, 1)
    [day] = summary.ungradable_by_day
    assert (day.device, day.assessed, day.ungradable, day.rate) == ("unknown", 2, 1, 0.5)
    assert day.reasons == {"blurred": 1, "too_dark": 1}


def test_a_later_gradable_photo_of_the_eye_gives_its_result_over_the_ungradable_one(settings, intake_models):
    make_worker(settings.model_copy(update={"quality_model": intake_models["blurred"]}))
    worker = _OPEN[-1]
    write_fundus(settings.inbox / "P21_R_20251104.jpg", seed=22)
    worker.run_once(settle_timeout=5)
    recapture = make_worker(settings)
    write_fundus(settings.inbox / "P21_OD_20251104.jpg", seed=23)  # the recapture, same eye and visit
    recapture.run_once(settle_timeout=5)
    text = " ".join(pdf_text(settings.reports / "P21" / "2025-11-04" / "report_v2.pdf").split())
    # both fields are shown; the eye's result is the gradable one, whatever the rule
    assert "2 fields; result from field 2" in text and "P21_OD_20251104.jpg" in text
    assert "Ungradable: recapture" in text and "Recall: ungradable image" not in text


def test_shipped_intake_models_on_real_photos(settings, shared_data, tmp_path):
    """The shipped gradability and laterality models in the worker: a dark EyePACS photo that the old colour rule
    refused as "not a fundus photo" (graded 0 by the graders; in the test split) is graded now, a red disc on
    black is refused, a photo without an eye in its name takes the one it shows, and a wrong eye in a name is
    flagged and kept."""
    import cv2
    import numpy as np

    models = PROJECT / "models"
    worker = make_worker(settings.model_copy(update={"quality_model": models / "quality.pt",
                                                      "laterality_model": models / "laterality.pt"}))
    shutil.copy(shared_data / "eyepacs" / "694_right.jpg", settings.inbox / "E694_R.jpg")
    disc = np.zeros((600, 600, 3), np.uint8)
    cv2.circle(disc, (300, 300), 260, (20, 40, 200), -1)  # BGR: red
    cv2.imwrite(str(settings.inbox / "D1_R.jpg"), disc)
    # srahim photos of the test split that the laterality model reads confidently (0.98 and 0.95)
    shutil.copy(shared_data / "srahim" / "Patient060_R.jpg", settings.inbox / "Patient060.jpg")
    shutil.copy(shared_data / "srahim" / "Patient034_L.jpg", settings.inbox / "Patient034_R.jpg")
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed) == (3, 1, 0)
    reason = next(settings.rejected.glob("*D1_R.jpg.reason.txt")).read_text()
    assert "does not look like a colour fundus photo" in reason
    with session_scope(worker.factory) as s:
        by_name = {i.source_name: i for i in s.scalars(select(Image))}
        dark = by_name["E694_R.jpg"]
        assert dark.gradable is True and dark.result is not None
        named_by_photo = by_name["Patient060.jpg"]
        assert (named_by_photo.eye, named_by_photo.eye_source, named_by_photo.gradable) == ("R", "image", True)
        wrong = by_name["Patient034_R.jpg"]
        assert (wrong.eye, wrong.predicted_eye, wrong.eye_mismatch) == ("R", "L", True)
    text = pdf_text(next((settings.reports / "Patient034").rglob("report_v1.pdf")))
    assert "Laterality mismatch" in text and "says right eye" in text


def test_shipped_gradability_model_refuses_the_non_fundus_pictures_issue_12_found_graded(settings):
    """Issue 12 point 5: a red-orange gradient, a flat red picture and a red disc on black were graded and referred.
    With the shipped gradability model each is a recorded rejection ("not_fundus"), and nothing is graded."""
    import cv2
    import numpy as np

    worker = make_worker(settings.model_copy(update={"quality_model": PROJECT / "models" / "quality.pt"}))
    ramp = np.linspace(0, 1, 700)[None, :, None]
    gradient = (np.array([20, 30, 200]) * (1 - ramp) + np.array([30, 140, 250]) * ramp).repeat(500, 0)  # BGR
    cv2.imwrite(str(settings.inbox / "G1_R.png"), gradient.astype(np.uint8))
    cv2.imwrite(str(settings.inbox / "F1_R.png"), np.full((800, 800, 3), (25, 35, 190), np.uint8))
    disc = np.zeros((600, 600, 3), np.uint8)
    cv2.circle(disc, (300, 300), 260, (20, 40, 200), -1)
    cv2.imwrite(str(settings.inbox / "D2_L.jpg"), disc)
    out = worker.run_once(settle_timeout=5)
    assert (out.processed, out.rejected, out.failed) == (0, 3, 0)
    with session_scope(worker.factory) as s:
        drops = list(s.scalars(select(Drop)))
        assert sorted(d.source_name for d in drops) == ["D2_L.jpg", "F1_R.png", "G1_R.png"]
        assert {(d.outcome, d.reason_code) for d in drops} == {("rejected", "not_fundus")}
        assert all(i.result is None for i in s.scalars(select(Image)))
    assert len(list(settings.rejected.glob("*.reason.txt"))) == 3


# --------------------------------------------------------------------------------------- faults (issue 12)

def _images(worker: Worker) -> dict[str, Image]:
    with session_scope(worker.factory) as s:
        return {i.source_name: i for i in s.scalars(select(Image))}


def _watch(worker: Worker) -> tuple[threading.Event, threading.Thread, list[BaseException]]:
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            worker.run_forever(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return stop, thread, errors


def _until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_full_archive_is_retried_in_watch_mode_and_never_holds_half_a_photo(settings, small_fs):
    """The archive's disk is full when a graded photo should move there: the photo stays in the inbox, its result
    and report are made, no partial copy is left, and once there is room the move happens without a restart."""
    import hashlib

    from .conftest import fill

    s = settings.model_copy(update={"report_renderer": "inline", "sweep_interval": 0.3})
    small_fs(s.archive, "1m")
    filler = fill(s.archive)
    worker = make_worker(s)
    stop, thread, errors = _watch(worker)
    try:
        photo = write_fundus(s.inbox / "P1_R.jpg", seed=61)
        assert _until(lambda: _images(worker).get("P1_R.jpg") is not None and _images(worker)["P1_R.jpg"].state == "reported")
        time.sleep(1.0)  # a few more attempts against the full disk
        assert photo.is_file()
        assert [p.name for p in s.archive.rglob("*") if p.is_file()] == ["filler"]  # never half a photo
        filler.unlink()
        assert _until(lambda: not photo.exists(), timeout=30), "not moved once the archive had room"
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    image = _images(worker)["P1_R.jpg"]
    (archived,) = [p for p in s.archive.rglob("*P1_R.jpg")]
    assert image.stored_path == str(archived) and hashlib.sha256(archived.read_bytes()).hexdigest() == image.sha256
    with session_scope(worker.factory) as db:
        failures = db.scalars(select(Event).where(Event.code == "archive_failed")).all()
    assert len(failures) >= 2 and all("P1_R" not in e.message for e in failures)


def test_a_read_only_archive_blocks_no_photo(settings, small_fs):
    s = settings.model_copy(update={"report_renderer": "inline"})
    small_fs(s.archive, "4m", readonly=True)
    write_fundus(s.inbox / "P2_R.jpg", seed=62)
    out = make_worker(s).run_once(settle_timeout=5)
    assert (out.processed, out.failed, out.unmoved, out.reports, out.ok) == (1, 0, 1, 1, False)
    assert (s.inbox / "P2_R.jpg").is_file()
    small_fs.remount(s.archive, readonly=False)
    worker = make_worker(s)
    out = worker.run_once(settle_timeout=5)
    assert out.ok and out.processed == 0 and list(s.inbox.iterdir()) == []
    image = _images(worker)["P2_R.jpg"]
    assert image.state == "reported" and Path(image.stored_path).is_file()


def test_an_image_left_failed_with_its_result_stored_is_finished(settings):
    """An older worker marked a graded photo 'failed' when its archive move failed; every later run then failed
    with IntegrityError (NOT NULL results.image_id) and the visit never got a report."""
    from screening.db import repository as repo

    s = settings.model_copy(update={"report_renderer": "inline"})
    worker = make_worker(s)
    path = write_fundus(s.inbox / "P3_R.jpg", seed=63)
    job = worker.intake.admit(path).job
    with session_scope(worker.factory) as db:
        image = db.get(Image, job.image_id)
        repo.add_result(db, image, model_version="old", checkpoint_sha256="c" * 64, dr_grade=1, dr_probs=[0, 1, 0, 0, 0],
                        dme_grade=0, dme_probs=[1, 0, 0], referable_score=0.2, referable=False)
        repo.set_state(db, image, "failed", "processing failed (PermissionError: ...); the file was kept in the inbox")
    out = make_worker(s).run_once(settle_timeout=5)
    assert (out.failed, out.reports, out.ok) == (0, 1, True) and list(s.inbox.iterdir()) == []
    with session_scope(worker.factory) as db:
        image = db.scalars(select(Image)).one()
        assert image.state == "reported" and image.result.model_version == "old" and image.error_code is None
    assert count(worker, Result) == 1


def test_a_file_written_in_two_parts_is_graded_whole_once(settings):
    """A slow network copy pauses half way (longer than stable_seconds): the half file used to be graded and the
    rest landed in the archived copy, whose SHA-256 then differed from the database's."""
    import hashlib

    s = settings.model_copy(update={"report_renderer": "inline", "sweep_interval": 0.3})
    full = write_fundus(s.work_dir / "src.jpg", seed=64).read_bytes()
    worker = make_worker(s)
    stop, thread, errors = _watch(worker)
    try:
        target = s.inbox / "P4_R.jpg"
        with open(target, "wb") as fh:
            fh.write(full[: len(full) // 2])
            fh.flush()
            time.sleep(2.0)  # twenty times stable_seconds
            fh.write(full[len(full) // 2:])
        assert _until(lambda: not target.exists())
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    images = _images(worker)
    assert list(images) == ["P4_R.jpg"] and images["P4_R.jpg"].sha256 == hashlib.sha256(full).hexdigest()
    assert hashlib.sha256(Path(images["P4_R.jpg"].stored_path).read_bytes()).hexdigest() == images["P4_R.jpg"].sha256


def test_a_deleted_database_stops_the_worker_with_a_clear_error(settings):
    """It went on grading into the unlinked file; after a restart the audit showed 1 graded photo of 5."""
    from screening.db import DatabaseGone

    s = settings.model_copy(update={"report_renderer": "inline"})
    worker = make_worker(s)
    stop, thread, errors = _watch(worker)
    try:
        write_fundus(s.inbox / "P5_R.jpg", seed=65)
        assert _until(lambda: not (s.inbox / "P5_R.jpg").exists())
        Path(s.database.removeprefix("sqlite:///")).unlink()
        write_fundus(s.inbox / "P6_R.jpg", seed=66)
        thread.join(30)
        assert not thread.is_alive(), "the worker went on without its database"
    finally:
        stop.set()
        thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], DatabaseGone) and "deleted" in str(errors[0])
    assert (s.inbox / "P6_R.jpg").is_file()  # nothing recorded for it, so it never left the inbox


def test_a_database_restored_in_place_from_another_stops_the_worker(settings, tmp_path):
    """The same file (same inode) with another database's content: the file check saw nothing, and the worker
    went on recording into a database that is not its own. Its identity says so, as it would for PostgreSQL."""
    import sqlite3

    from screening.db import DatabaseGone

    s = settings.model_copy(update={"report_renderer": "inline"})
    worker = make_worker(s)
    write_fundus(s.inbox / "P5_R.jpg", seed=65)
    assert worker.run_once(settle_timeout=5).processed == 1
    other = tmp_path / "other.db"
    init_db(make_engine(f"sqlite:///{other}"))
    src, dst = sqlite3.connect(other), sqlite3.connect(s.database.removeprefix("sqlite:///"))
    src.backup(dst)
    src.close()
    dst.close()
    write_fundus(s.inbox / "P6_R.jpg", seed=66)
    with pytest.raises(DatabaseGone, match="replaced or re-created"):
        worker.run_once(settle_timeout=5)
    assert (s.inbox / "P6_R.jpg").is_file()  # nothing recorded for it, so it never left the inbox
    with sqlite3.connect(s.database.removeprefix("sqlite:///")) as raw:  # what is there now: the other, untouched
        assert raw.execute("SELECT count(*) FROM images").fetchone() == (0,)


def test_a_database_locked_past_the_busy_timeout_is_waited_out(settings):
    """The worker exited (rc 1) when another program held the database longer than the busy timeout."""
    s = settings.model_copy(update={"report_renderer": "inline"})
    engine = make_engine(s.database, busy_timeout_ms=200)
    init_db(engine)
    worker = Worker(s, Predictor(s.checkpoint, "cpu", 1), make_session_factory(engine), PROJECT / "templates")
    _OPEN.append(worker)
    write_fundus(s.inbox / "P7_R.jpg", seed=67)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(3); c.execute('COMMIT')\n"),
        s.database.removeprefix("sqlite:///")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = worker.run_once(settle_timeout=5)
    finally:
        holder.wait(30)
    assert out.ok and out.processed == 1 and list(s.inbox.iterdir()) == []


def test_a_failed_intake_is_retried_in_watch_mode_without_a_restart(settings):
    s = settings.model_copy(update={"report_renderer": "inline", "sweep_interval": 0.3})
    worker = make_worker(s)
    real, calls = worker.intake.admit, []

    def flaky(path):
        calls.append(path.name)
        if len(calls) == 1:
            raise RuntimeError("simulated: database unavailable")
        return real(path)

    worker.intake.admit = flaky
    stop, thread, errors = _watch(worker)
    try:
        write_fundus(s.inbox / "P8_R.jpg", seed=68)
        assert _until(lambda: not (s.inbox / "P8_R.jpg").exists(), timeout=30), "never tried again"
    finally:
        stop.set()
        thread.join(30)
    assert errors == [] and calls == ["P8_R.jpg", "P8_R.jpg"]


def _unreachable_error():
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception('connection to server at "db" failed: Connection refused. '
                                                      "Is the server running on that host?"))


def test_a_database_outage_is_one_line_per_group_and_its_files_wait_without_backing_off(settings, caplog):
    """PostgreSQL stopped: each file logged a traceback on each try (1,255 lines in 40 s for 4 files), counted as
    failed, and its retry delay doubled as if the file were at fault (photos waited 86 s after the server was back)."""
    import logging

    from screening.db.session import is_unreachable
    from screening.intake import Intake

    worker = make_worker(settings)
    paths = [write_fundus(settings.inbox / f"P{k}_R.jpg", seed=70 + k) for k in range(3)]

    def down(path):
        raise _unreachable_error()

    worker.intake.admit = down
    with caplog.at_level(logging.INFO, logger="screening"):
        out = worker.process(paths)
    assert (out.failed, out.no_database, out.retry, out.waited_for_database) == (0, 3, paths, paths)
    assert "waiting for the database 3" in out.summary() and not out.ok  # `run --once` exits 1: nothing was graded
    warnings = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None and "3 file(s)" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback
    assert is_unreachable(_unreachable_error())

    intake = Intake(settings.model_copy(update={"sweep_interval": 30.0}))  # not started: no watcher thread
    assert [intake.retry_later(paths[0]) for _ in range(3)] == [30.0, 60.0, 120.0]  # the file's own trouble
    assert intake.retry_later(paths[0], reset=True) == 30.0  # not the file's: back to the base interval


def test_an_outage_while_storing_is_one_line_and_the_photos_are_graded_when_it_is_back(settings, caplog):
    """The server stopped between grading and storing: each photo logged a traceback for the save and another for
    recording its failure (which cannot be recorded either), and counted as failed; releasing the claims logged a
    third traceback. Now one line for the group, the photos wait, and they are graded once the server is back."""
    import logging

    worker = make_worker(settings)
    paths = [write_fundus(settings.inbox / f"P{k}_R.jpg", seed=80 + k) for k in range(2)]
    save, release = worker.store.save, worker.claims.release

    def down(*args, **kwargs):
        raise _unreachable_error()

    worker.store.save, worker.claims.release = down, down
    with caplog.at_level(logging.INFO, logger="screening"):
        out = worker.process(paths)
    assert (out.processed, out.failed, out.no_database, out.waited_for_database) == (0, 0, 2, paths)
    assert not out.ok and all(p.exists() for p in paths)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback
    lines = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(lines) == 2 and "storing results" in lines[0] and "claims" in lines[1]

    worker.store.save, worker.claims.release = save, release  # the server is back
    out = worker.process(paths)
    worker.report.wait()
    assert (out.processed, out.failed) == (2, 0) and not any(p.exists() for p in paths)


def test_a_file_another_worker_holds_is_logged_as_theirs_not_as_a_retry(settings, caplog):
    """Files another worker was grading were logged as "stays in the inbox and is tried again", the line a file
    that failed gets, so an IT person read a healthy two-worker set-up as failing."""
    import logging
    import threading

    worker = make_worker(settings)
    path = write_fundus(settings.inbox / "P1_R.jpg", seed=90)
    worker.claims.take = lambda kind, key: False  # held by another worker

    class Handed:  # the intake's two calls the step makes
        def poll(self):
            return [path]

        def retry_later(self, p, *, reset=False):
            return 1.0

    with caplog.at_level(logging.INFO, logger="screening"):
        worker._watch_step(Handed(), threading.Event())
    lines = [r.getMessage() for r in caplog.records]
    assert any("handled by another worker" in m for m in lines)
    assert not any("stays in the inbox" in m for m in lines) and path.exists()


def test_what_counts_as_an_unreachable_database():
    from sqlalchemy.exc import IntegrityError, OperationalError

    from screening.db.session import is_unreachable

    assert is_unreachable(_unreachable_error())
    assert is_unreachable(OperationalError("x", {}, Exception("server closed the connection unexpectedly")))

    class ConnectionTimeout(Exception):  # psycopg's, when the network drops packets: no SQLSTATE
        pass

    assert is_unreachable(OperationalError("x", {}, ConnectionTimeout("connection timeout expired")))
    assert not is_unreachable(OperationalError("x", {}, Exception("database is locked")))  # busy: retried in place
    assert not is_unreachable(OperationalError("x", {}, Exception("no such table: images")))
    assert not is_unreachable(IntegrityError("x", {}, Exception("UNIQUE constraint failed")))
    assert not is_unreachable(RuntimeError("connection refused"))  # not a database error

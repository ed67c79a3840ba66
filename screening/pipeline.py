"""One unit of work per image: intake -> decode -> predict (batched) -> persist -> report.

State machine (``images.state``): received -> done -> reported, or rejected / failed. The original
stays in the inbox until its result is committed, then moves to the archive; a worker killed at any
point finds either the file still in the inbox (and redoes the image) or a committed state to
continue from. Report PDFs are rendered by ``screening.renderer`` (by default a side process, while the
next batch runs) to a temporary name and renamed, earlier versions kept; the worker records each one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from training.model import LESION_CODES

from .config import ScreeningSettings
from .db import repository as repo
from .db.models import DropOutcome, Exam, Image, ImageState
from .db.session import session_scope
from .explain import cam_overlay, lesion_overlay
from .imaging import DecodedImage, ImageRejected, decode
from .inference import ImagePrediction, PreparedBatch, Predictor
from .intake import Identity, IdentityError, Intake, parse_identity, sha256_file, sidecar_for, sweep, unsupported_reason, wait_until_stable
from .renderer import Renderer, RenderJob, RenderResult, make_renderer
from .report import EyeFinding, ReportContext
from .runtime import release_memory

# Trim the heap between batches only when glibc holds this much free. A 512 px batch leaves ~100 MB free,
# and trimming that after every image cost 10-14 ms for 20 MB of peak RSS (1.18 vs 1.20 GB, 16 photos);
# a much larger free heap (a huge camera image, a burst) is still handed back.
TRIM_ABOVE_FREE_BYTES = 256 * 1024 * 1024

log = logging.getLogger("screening")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file name from a user, reduced to something that cannot act as a path."""
    cleaned = _SAFE.sub("_", os.path.basename(name)).lstrip(".")
    return cleaned[:120] or "file"


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """Report pictures are JPEG: WeasyPrint embeds JPEG as is but re-encodes PNG (measured ~0.35 s each)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"could not write {path}")


def _move_with_sidecar(path: Path, dest: Path) -> None:
    """Move a user's file out of the inbox; its sidecar JSON (if any) goes along as ``<dest>.json``."""
    sidecar = sidecar_for(path)
    shutil.move(str(path), dest)
    if sidecar is not None:
        shutil.move(str(sidecar), dest.with_name(dest.name + ".json"))


@dataclass
class Job:
    image_id: int
    exam_id: int
    path: Path
    sha256: str
    decoded: DecodedImage


@dataclass(frozen=True)
class PendingReport:
    """A report handed to the renderer: what it covers, so that its completion is recorded exactly."""

    exam_id: int
    version: int
    image_ids: tuple[int, ...]  # the exam's images that were 'done' when the report's content was read
    snapshot_at: datetime  # when its content was read: results stored later are not in it


@dataclass
class BatchOutcome:
    processed: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    reports: int = 0


class Worker:
    """Owns the predictor and the session factory; ``process`` handles one batch of ready files."""

    def __init__(
        self, settings: ScreeningSettings, predictor: Predictor, factory: sessionmaker[Session], templates_dir: Path,
        today: Callable[[], date] = date.today, renderer: Renderer | None = None,
    ) -> None:
        self.s = settings
        self.predictor = predictor
        self.factory = factory
        self.templates_dir = templates_dir
        self.today = today
        self.renderer: Renderer = renderer if renderer is not None else make_renderer(settings.report_renderer)
        self._in_flight: dict[int, PendingReport] = {}
        self._next_key = 1
        for folder in (settings.inbox, settings.reports, settings.archive, settings.rejected, settings.work_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ intake
    def _duplicate(self, session: Session, path: Path, sha: str, existing: Image, out: BatchOutcome) -> None:
        drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.DUPLICATE, image=existing,
                                reason=f"same content as image {existing.id}")
        dest = self._archive(path, sha, "duplicates")
        repo.add_event(session, "duplicate", f"archived as {dest.name}", image=existing, drop=drop)
        out.duplicates += 1
        log.info("duplicate of image %s archived", existing.id)

    def _reject(self, path: Path, sha: str, reason: str, existing: Image | None, session: Session) -> None:
        """Move the file to rejected/ with a reason file. A known content keeps its own state, unless this
        very file was the image's pending drop (then the image is rejected with it)."""
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
        dest = self.s.rejected / f"{stamp}_{sha[:8]}_{safe_name(path.name)}"
        image = existing or repo.add_image(session, sha256=sha, source_name=path.name, state=ImageState.REJECTED,
                                           error=reason, stored_path=dest)
        if existing is not None and existing.stored_path == str(path):
            if existing.state != ImageState.REJECTED:
                repo.set_state(session, existing, ImageState.REJECTED, reason)
            existing.stored_path = str(dest)
        drop = repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.REJECTED, image=image, reason=reason)
        repo.add_event(session, "rejected", reason, image=image, drop=drop)
        session.flush()
        # The DB row exists before the move: a crash here leaves the file in the inbox, seen again next sweep.
        dest.with_name(dest.name + ".reason.txt").write_text(
            f"File: {path.name}\nSHA-256: {sha}\nRejected: {datetime.now().isoformat(timespec='seconds')}\n"
            f"Reason: {reason}\nWhat to do: fix the issue and copy the file into the inbox again.\n"
        )
        _move_with_sidecar(path, dest)
        log.warning("rejected image %s (sha %s): %s", image.id, sha[:12], reason)

    def _archive(self, path: Path, sha: str, sub: str = "") -> Path:
        folder = self.s.archive / datetime.now().strftime("%Y-%m-%d") / sub
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{sha[:12]}_{safe_name(path.name)}"
        n = 1
        while dest.exists():
            dest = folder / f"{sha[:12]}_{n}_{safe_name(path.name)}"
            n += 1
        _move_with_sidecar(path, dest)
        return dest

    def intake(self, path: Path, out: BatchOutcome) -> Job | None:
        """Hash, identify, de-duplicate and decode one file; returns a Job when it needs the model."""
        if not path.is_file():
            return None
        sha = sha256_file(path)
        with session_scope(self.factory) as session:
            existing = repo.get_image_by_sha(session, sha)
            same_drop = existing is not None and existing.stored_path == str(path)
            if existing is not None and existing.state in (ImageState.DONE, ImageState.REPORTED):
                if same_drop:  # our own drop, committed but not yet archived when the worker stopped
                    existing.stored_path = str(self._archive(path, sha))
                    return None
                self._duplicate(session, path, sha, existing, out)
                return None
            if (existing is not None and existing.state == ImageState.RECEIVED and not same_drop
                    and existing.stored_path and Path(existing.stored_path).is_file()):
                self._duplicate(session, path, sha, existing, out)  # same content already in flight
                return None
            reason = unsupported_reason(path)
            identity: Identity | None = None
            if reason is None:
                parsed = parse_identity(path, self.s.filename_patterns)
                if isinstance(parsed, IdentityError):
                    reason = parsed.reason
                else:
                    identity = parsed
            decoded = None
            if reason is None:
                try:
                    decoded = decode(path, self.predictor.size)
                except ImageRejected as exc:
                    reason = str(exc)
            if reason is not None:
                self._reject(path, sha, reason, existing, session)
                out.rejected += 1
                return None
            assert identity is not None and decoded is not None
            patient = repo.get_or_create_patient(session, identity.patient_id)
            exam = repo.get_or_create_exam(session, patient, identity.exam_date or self.today())
            w, h = decoded.original_size
            if existing is None:
                image = repo.add_image(session, sha256=sha, source_name=path.name, exam=exam, eye=identity.eye,
                                       stored_path=path, width=w, height=h)
                repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=image)
            else:  # received before a crash, failed and retried, or rejected earlier and dropped again
                image = existing
                if not same_drop:
                    repo.record_drop(session, sha256=sha, source_name=path.name, outcome=DropOutcome.NEW, image=image)
                image.exam, image.eye, image.stored_path, image.width, image.height = exam, identity.eye, str(path), w, h
                if existing.state != ImageState.RECEIVED:
                    repo.set_state(session, image, ImageState.RECEIVED)
            session.flush()
            return Job(image.id, exam.id, path, sha, decoded)

    # ------------------------------------------------------------------ results
    def _write_outputs(self, job: Job, pred: ImagePrediction) -> dict[str, Path]:
        """Masks, overlay, heatmaps and the display photo, written to a temp folder then renamed into place."""
        final = self.s.work_dir / job.sha256[:2] / job.sha256
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        disp = job.decoded.display
        size = disp.shape[0]
        up = lambda m: cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)  # noqa: E731
        masks = np.stack([up(m) for m in pred.masks])
        for k, code in enumerate(LESION_CODES):
            cv2.imwrite(str(tmp / f"mask_{code}.png"), masks[k] * 255)
        _write_jpeg(tmp / "photo.jpg", disp, 92)
        _write_jpeg(tmp / "overlay.jpg", lesion_overlay(disp, masks, LESION_CODES))
        for name, cam in (("dr_cam", pred.dr_cam), ("dme_cam", pred.dme_cam)):  # heatmaps print small: 256 px
            small = cv2.resize(disp, (256, 256), interpolation=cv2.INTER_AREA)
            _write_jpeg(tmp / f"{name}.jpg", cam_overlay(small, cv2.resize(cam, (256, 256), interpolation=cv2.INTER_LINEAR)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # all outputs appear at once
        return {"dir": final, "photo": final / "photo.jpg", "overlay": final / "overlay.jpg",
                "dr_cam": final / "dr_cam.jpg", "dme_cam": final / "dme_cam.jpg"}

    def store(self, job: Job, pred: ImagePrediction, inference_ms: float) -> int:
        """Persist one result; returns the image's exam id."""
        files = self._write_outputs(job, pred)
        with session_scope(self.factory) as session:
            image = session.get(Image, job.image_id)
            a = pred.lesion_areas
            repo.add_result(
                session, image, model_version=self.predictor.version,
                checkpoint_sha256=self.predictor.meta["checkpoint_sha256"], dr_grade=pred.dr_grade, dr_probs=pred.dr_probs,
                dme_grade=pred.dme_grade, dme_probs=pred.dme_probs, referable_score=pred.referable_score,
                referable=pred.referable, area_ma=a["MA"], area_he=a["HE"], area_ex=a["EX"], area_se=a["SE"], area_od=a["OD"],
                mask_dir=files["dir"], overlay_path=files["overlay"], dr_cam_path=files["dr_cam"],
                dme_cam_path=files["dme_cam"], device=str(self.predictor.device), inference_ms=inference_ms,
            )
            repo.set_state(session, image, ImageState.DONE)
            exam_id = image.exam_id
        # Committed: now the original may leave the inbox. A crash before this line is finished by intake().
        with session_scope(self.factory) as session:
            image = session.get(Image, job.image_id)
            image.stored_path = str(self._archive(job.path, job.sha256))
        return exam_id

    def _fail(self, job: Job, exc: BaseException) -> None:
        reason = f"processing failed ({type(exc).__name__}: {exc}); the file was kept in the inbox and will be retried"
        with session_scope(self.factory) as session:
            image = session.get(Image, job.image_id)
            repo.set_state(session, image, ImageState.FAILED, reason)
        log.exception("image %s failed", job.image_id)

    # ------------------------------------------------------------------ reports
    def _context(self, session: Session, exam: Exam, version: int) -> ReportContext:
        eyes: dict[str, EyeFinding] = {}
        for image, result in repo.exam_images_with_results(session, exam.id):
            if image.eye not in ("L", "R") or result is None:
                continue
            folder = Path(result.mask_dir) if result.mask_dir else None
            eyes[image.eye] = EyeFinding(  # a later image of the same eye replaces an earlier one
                eye=image.eye, source_name=image.source_name, photo_path=folder / "photo.jpg" if folder else None,
                overlay_path=Path(result.overlay_path) if result.overlay_path else None,
                dr_cam_path=Path(result.dr_cam_path) if result.dr_cam_path else None,
                dme_cam_path=Path(result.dme_cam_path) if result.dme_cam_path else None,
                dr_grade=result.dr_grade, dr_probs=result.dr_probs, dme_grade=result.dme_grade, dme_probs=result.dme_probs,
                referable_score=result.referable_score, referable=result.referable,
                lesion_areas={k.upper(): v for k, v in result.areas.items()},
            )
        return ReportContext(
            clinic_name=self.s.clinic_name, patient_id=exam.patient.code, exam_date=exam.exam_date,
            eyes=[eyes[e] for e in ("R", "L") if e in eyes], model_version=self.predictor.version,
            checkpoint_sha256=self.predictor.meta["checkpoint_sha256"],
            model_status="research" if self.predictor.kind == "real" else "demo",
            model_metrics=self.predictor.report_metrics(), generated_at=datetime.now(timezone.utc).astimezone(),
            report_version=version,
        )

    def submit_reports(self, exam_ids: list[int] | None = None) -> int:
        """Hand the reports of ``exam_ids`` to the renderer, or, when None, of every exam whose newest result
        is in no report yet and that has no report on the way (start-up and periodic catch-up). The renderer
        works while the caller goes on (``collect_reports`` records what it finished). Returns how many."""
        in_flight = {p.exam_id for p in self._in_flight.values()}
        if exam_ids is None:
            with session_scope(self.factory) as session:
                exam_ids = [e.id for e in repo.exams_needing_report(session) if e.id not in in_flight]
        for exam_id in exam_ids:
            with session_scope(self.factory) as session:
                exam = session.get(Exam, exam_id)
                snapshot_at = repo.utcnow()
                queued = [p.version for p in self._in_flight.values() if p.exam_id == exam_id]
                version = max([repo.next_report_version(session, exam_id), *(v + 1 for v in queued)])
                ctx = self._context(session, exam, version)
                done = tuple(i.id for i in exam.images if i.state == ImageState.DONE)
            key, self._next_key = self._next_key, self._next_key + 1
            self.renderer.submit(RenderJob(key, ctx, self.templates_dir, self.s.reports, retries=self.s.report_retries))
            self._in_flight[key] = PendingReport(exam_id, version, done, snapshot_at)  # results are read later, here
        return len(exam_ids)

    def _record_report(self, result: RenderResult, out: BatchOutcome) -> None:
        pending = self._in_flight.pop(result.key)
        if result.path is None:
            with session_scope(self.factory) as session:
                repo.add_event(session, "report_failed", f"exam {pending.exam_id}: {result.error}")
            log.error("report for exam %s failed, will retry: %s", pending.exam_id, result.error)
            return
        path = Path(result.path)
        version = int(re.search(r"_v(\d+)\.pdf$", path.name).group(1))
        with session_scope(self.factory) as session:
            exam = session.get(Exam, pending.exam_id)
            # created_at = when its content was read, so a result stored after that still counts as unreported
            repo.add_report(session, exam, path, self.predictor.version, version=version, created_at=pending.snapshot_at)
            for image in exam.images:
                if image.id in pending.image_ids and image.state == ImageState.DONE:
                    repo.set_state(session, image, ImageState.REPORTED)
        out.reports += 1
        log.info("report v%s for exam %s written", version, pending.exam_id)

    def collect_reports(self, out: BatchOutcome, timeout: float = 0.0) -> int:
        """Record the reports the renderer has finished (waiting up to ``timeout`` s for one); returns how many
        results were handled, failures included."""
        results = self.renderer.results(timeout) if self._in_flight else []
        for result in results:
            try:
                self._record_report(result, out)
            except Exception:  # noqa: BLE001 - e.g. the database is locked: the catch-up renders it again
                log.exception("recording the report of job %s failed; it will be rendered again", result.key)
        return len(results)

    def wait_for_reports(self, out: BatchOutcome, stall_timeout: float = 300.0) -> None:
        """Block until every submitted report is rendered and recorded. If none finishes for ``stall_timeout``
        seconds the renderer is stopped (a hung WeasyPrint) and its reports count as failed: the results stay
        stored and the catch-up renders them again."""
        last = time.monotonic()
        while self._in_flight:
            if self.collect_reports(out, timeout=1.0):
                last = time.monotonic()
            elif time.monotonic() - last > stall_timeout:
                log.error("no report finished in %.0f s; stopping the renderer, %d report(s) will be retried",
                          stall_timeout, len(self._in_flight))
                self.renderer.close(timeout=5)
                self.collect_reports(out)
                self._in_flight.clear()
                return

    def close(self) -> None:
        """Wait for reports on the way, then stop the renderer."""
        self.wait_for_reports(BatchOutcome(), stall_timeout=120)
        self.renderer.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ driving
    def process(self, paths: list[Path]) -> BatchOutcome:
        """Intake ``paths``, then predict and store them batch by batch. An exam's report goes to the renderer
        right after the batch holding its last image here, so it renders while the next batch runs; reports
        finished meanwhile are recorded between batches (``wait_for_reports`` waits for the rest)."""
        out = BatchOutcome()
        jobs: list[Job] = []
        for path in paths:
            try:
                job = self.intake(path, out)
            except Exception:  # noqa: BLE001 - one bad file must not stop the others; it stays in the inbox
                log.exception("intake of a file failed; it stays in the inbox")
                out.failed += 1
                continue
            if job is not None:
                jobs.append(job)
        chunks = [jobs[i:i + self.s.batch_size] for i in range(0, len(jobs), self.s.batch_size)]
        last_chunk = {job.exam_id: k for k, chunk in enumerate(chunks) for job in chunk}
        stored: set[int] = set()  # exams with a new result, report not yet submitted
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
            # The next batch is prepared (contrast step, grader's image measurements) while this one finishes
            # (masks, Grad-CAM, files, database): single-threaded work that leaves a core free.
            upcoming: Future | None = pool.submit(self._prepare, chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                assert upcoming is not None
                current, upcoming = upcoming, None
                t0 = time.perf_counter()
                try:
                    batch, prepare_s = current.result()
                    raw = self.predictor.run(batch)
                    if k + 1 < len(chunks):
                        upcoming = pool.submit(self._prepare, chunks[k + 1])
                    preds = self.predictor.finish(batch, raw)
                    del batch, raw
                except Exception as exc:  # noqa: BLE001
                    for job in chunk:
                        self._fail(job, exc)
                    out.failed += len(chunk)
                    preds, prepare_s = [], 0.0
                if upcoming is None and k + 1 < len(chunks):
                    upcoming = pool.submit(self._prepare, chunks[k + 1])
                per_image_ms = (time.perf_counter() - t0 + prepare_s) * 1000 / len(chunk)
                self._store_chunk(chunk, preds, per_image_ms, out, stored)
                del preds
                ready = sorted(e for e in stored if last_chunk.get(e, -1) <= k)
                stored.difference_update(ready)
                self._submit_quietly(ready)
                self.collect_reports(out)
                release_memory(TRIM_ABOVE_FREE_BYTES)
        return out

    def _prepare(self, chunk: list[Job]) -> tuple[PreparedBatch, float]:
        t0 = time.perf_counter()
        batch = self.predictor.prepare([j.decoded.rgb for j in chunk])
        return batch, time.perf_counter() - t0

    def _store_chunk(self, chunk: list[Job], preds: list[ImagePrediction], per_image_ms: float, out: BatchOutcome,
                     stored: set[int]) -> None:
        for job, pred in zip(chunk, preds):
            try:
                stored.add(self.store(job, pred, per_image_ms))
                out.processed += 1
            except Exception as exc:  # noqa: BLE001
                self._fail(job, exc)
                out.failed += 1

    def _submit_quietly(self, exam_ids: list[int] | None) -> None:
        try:
            self.submit_reports(exam_ids)
        except Exception:  # noqa: BLE001 - results are stored; the periodic catch-up submits them again
            log.exception("could not hand reports %s to the renderer; they will be retried", exam_ids or "")

    def recover(self) -> None:
        """After a restart: images left 'received' whose file is gone can never finish: mark them failed."""
        with session_scope(self.factory) as session:
            for image in repo.images_in_state(session, [ImageState.RECEIVED]):
                if not image.stored_path or not Path(image.stored_path).is_file():
                    repo.set_state(session, image, ImageState.FAILED, "the original file disappeared before it was graded; copy it into the inbox again")

    def run_once(self, settle_timeout: float | None = None) -> BatchOutcome:
        """Process what is in the inbox now (waiting for files still being written), then return."""
        self.recover()
        candidates = sweep(self.s.inbox)
        timeout = settle_timeout if settle_timeout is not None else max(10.0, 5 * self.s.stable_seconds)
        ready = wait_until_stable(candidates, timeout, stable_seconds=self.s.stable_seconds) if candidates else []
        left = set(candidates) - set(ready)
        if left:
            log.warning("%d file(s) still changing after %.0fs; left in the inbox for the next run", len(left), timeout)
        catch_up = BatchOutcome()
        self._submit_quietly(None)  # reports that failed or were interrupted in an earlier run
        self.collect_reports(catch_up)
        out = self.process(ready)
        self.wait_for_reports(out)
        out.reports += catch_up.reports
        return out

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        self.recover()
        self.renderer.start()  # a renderer process imports WeasyPrint while the first files arrive
        self._submit_quietly(None)
        log.info("watching %s (%s observer)", self.s.inbox, self.s.observer)
        next_catch_up = time.monotonic() + self.s.sweep_interval
        idle = BatchOutcome()
        try:
            with Intake(self.s) as intake:
                while not stop.is_set():
                    if time.monotonic() >= next_catch_up:  # retry reports that failed to render
                        self._submit_quietly(None)
                        next_catch_up = time.monotonic() + self.s.sweep_interval
                    ready = intake.poll()
                    if ready:  # in groups, so a long backlog is not all decoded at once
                        group = max(self.s.batch_size * 4, 8)
                        for i in range(0, len(ready), group):
                            out = self.process(ready[i:i + group])
                            log.info("batch: processed %d, duplicates %d, rejected %d, failed %d; reports recorded "
                                     "meanwhile %d (each report is logged when it is written)", out.processed,
                                     out.duplicates, out.rejected, out.failed, out.reports)
                    elif self._in_flight:
                        self.collect_reports(idle, timeout=self.s.poll_interval)
                    else:
                        stop.wait(self.s.poll_interval)
        finally:
            self.close()
        log.info("worker stopped")

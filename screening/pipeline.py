"""The worker: stable inbox files through the stages of :mod:`screening.stages`, in batches, in a loop.

State machine (``images.state``): received -> done -> reported, or rejected / failed. The original stays in
the inbox until its result is committed, then moves to the archive; a worker killed at any point finds
either the file still in the inbox (and redoes the image, or finishes the move its committed record asks
for) or a committed state to continue from. Report PDFs are rendered by ``screening.renderer`` (by default a
side process, while the next batch runs); the report stage records each one.

:class:`Worker` only drives: which files to take (``run_once``: what is in the inbox now; ``run_forever``:
the watcher and the periodic sweep), the order of the stages, and the counts of what happened.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from .checks import IntakeChecks
from .config import ScreeningSettings
from .inference import Predictor
from .intake import Intake, sweep, wait_until_stable
from .renderer import Renderer, make_renderer
from .runtime import release_memory
from .stages import (
    Admitted,
    Duplicate,
    Filing,
    GradeStage,
    IntakeOutcome,
    IntakeStage,
    Job,
    Rejected,
    ReportStage,
    StoreStage,
)
from .stages.report import written

# Trim the heap between batches only when glibc holds this much free. A 512 px batch leaves ~100 MB free,
# and trimming that after every image cost 10-14 ms for 20 MB of peak RSS (1.18 vs 1.20 GB, 16 photos);
# a much larger free heap (a huge camera image, a burst) is still handed back.
TRIM_ABOVE_FREE_BYTES = 256 * 1024 * 1024

log = logging.getLogger("screening")


@dataclass
class BatchOutcome:
    processed: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed: int = 0
    reports: int = 0

    def count(self, outcome: IntakeOutcome) -> None:
        if isinstance(outcome, Duplicate):
            self.duplicates += 1
        elif isinstance(outcome, Rejected):
            self.rejected += 1


class Worker:
    """Holds the stages (and through them the predictor, the session factory and the renderer)."""

    def __init__(
        self, settings: ScreeningSettings, predictor: Predictor, factory: sessionmaker[Session], templates_dir: Path,
        today: Callable[[], date] = date.today, renderer: Renderer | None = None, checks: IntakeChecks | None = None,
    ) -> None:
        self.s = settings
        self.predictor = predictor
        self.factory = factory
        self.checks = checks if checks is not None else IntakeChecks.from_settings(settings)
        for folder in (settings.inbox, settings.reports, settings.archive, settings.rejected, settings.work_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.filing = Filing(settings, factory)
        self.intake = IntakeStage(settings, factory, self.filing, predictor.size, self.checks, today)
        self.grade = GradeStage(predictor, settings.batch_size)
        self.store = StoreStage(settings, factory, self.filing, predictor)
        self.report = ReportStage(settings, factory, predictor,
                                  renderer if renderer is not None else make_renderer(settings.report_renderer), templates_dir)

    def close(self) -> None:
        """Wait for reports on the way, then stop the renderer."""
        self.report.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one group of files
    def process(self, paths: Iterable[Path]) -> BatchOutcome:
        """Intake ``paths``, then grade and store them batch by batch. An exam's report goes to the renderer right
        after the batch holding its last image here, so it renders while the next batch runs; reports finished
        meanwhile are recorded between batches (``self.report.wait()`` waits for the rest)."""
        out = BatchOutcome()
        jobs: list[Job] = []
        ungradable: list[Job] = []
        for path in paths:
            try:
                outcome = self.intake.admit(path)
            except Exception:
                log.exception("intake of a file failed; it stays in the inbox")
                out.failed += 1
                continue
            out.count(outcome)
            if isinstance(outcome, Admitted):
                (jobs if outcome.job.gradable else ungradable).append(outcome.job)
        batches = self.grade.split(jobs)
        last_batch = {job.exam_id: k for k, batch in enumerate(batches) for job in batch}
        stored: set[int] = set()  # exams with a new result, report not yet submitted
        for job in ungradable:  # no grading: the verdict is recorded, the photo is stored for the report
            try:
                stored.add(self.store.save_ungradable(job).exam_id)
                out.processed += 1
            except Exception as exc:  # noqa: BLE001 - recorded as failed; the file stays for a retry
                self.store.fail(job, exc)
                out.failed += 1
        ready = sorted(e for e in stored if e not in last_batch)  # exams with nothing to grade in this group
        stored.difference_update(ready)
        self._submit_quietly(ready)
        for k, graded in enumerate(self.grade.grade(batches)):
            if graded.error is not None:
                for job in graded.jobs:
                    self.store.fail(job, graded.error)
                out.failed += len(graded.jobs)
            for job, pred in zip(graded.jobs, graded.predictions):
                try:
                    stored.add(self.store.save(job, pred, graded.per_image_ms).exam_id)
                    out.processed += 1
                except Exception as exc:  # noqa: BLE001 - recorded as failed; the file stays for a retry
                    self.store.fail(job, exc)
                    out.failed += 1
            del graded
            ready = sorted(e for e in stored if last_batch.get(e, -1) <= k)
            stored.difference_update(ready)
            self._submit_quietly(ready)
            out.reports += written(self.report.collect())
            release_memory(TRIM_ABOVE_FREE_BYTES)
        return out

    def _submit_quietly(self, exam_ids: list[int] | None) -> None:
        try:
            self.report.submit(exam_ids)
        except Exception:
            log.exception("could not hand reports %s to the renderer; they will be retried", exam_ids or "")

    def recover(self) -> None:
        """After a restart (see :meth:`IntakeStage.recover`)."""
        self.intake.recover()

    # ------------------------------------------------------------------ driving
    def run_once(self, settle_timeout: float | None = None) -> BatchOutcome:
        """Process what is in the inbox now (waiting for files still being written), then return."""
        self.recover()
        candidates = sweep(self.s.inbox)
        timeout = settle_timeout if settle_timeout is not None else max(10.0, 5 * self.s.stable_seconds)
        ready = wait_until_stable(candidates, timeout, stable_seconds=self.s.stable_seconds) if candidates else []
        left = set(candidates) - set(ready)
        if left:
            log.warning("%d file(s) still changing after %.0fs; left in the inbox for the next run", len(left), timeout)
        self._submit_quietly(None)  # reports that failed or were interrupted in an earlier run
        catch_up = written(self.report.collect())
        out = self.process(ready)
        out.reports += written(self.report.wait()) + catch_up
        return out

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        self.recover()
        self.report.renderer.start()  # a renderer process imports WeasyPrint while the first files arrive
        self._submit_quietly(None)
        log.info("watching %s (%s observer)", self.s.inbox, self.s.observer)
        next_catch_up = time.monotonic() + self.s.sweep_interval
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
                    elif self.report.in_flight:
                        self.report.collect(timeout=self.s.poll_interval)
                    else:
                        stop.wait(self.s.poll_interval)
        finally:
            self.close()
        log.info("worker stopped")


__all__ = ["TRIM_ABOVE_FREE_BYTES", "BatchOutcome", "Worker"]

"""The worker: stable inbox files through the stages of :mod:`screening.stages`, in batches, in a loop.

State machine (``images.state``): received -> done -> reported, or rejected / failed. The original stays in
the inbox until its result is committed, then moves to the archive; a worker killed at any point finds
either the file still in the inbox (and redoes the image, or finishes the move its committed record asks
for) or a committed state to continue from. Report PDFs are rendered by ``screening.renderer`` (by default a
side process, while the next batch runs); the report stage records each one.

No photo is left in a state no run can finish: a file whose handling failed or was put off (grading
failed, a full or read-only archive, a file still arriving) stays in the inbox with its committed state and
is handed out again (``run_forever``: :meth:`screening.intake.Intake.retry_later`; ``run_once``: the next
run). A locked database is waited out (:func:`screening.db.session.transaction`); a database deleted,
replaced or re-created under the worker stops it (:class:`~screening.db.session.DatabaseGone`, checked
before every unit of work: :func:`~screening.db.session.guard_identity`), since every result written after
that would be lost. At start-up :meth:`Worker.recover` reconciles the database with the files.

Several workers may share one inbox and one database (:mod:`screening.claims`): each file is claimed before it
is read and released once it has left the inbox (or was put off), so every photo is graded by one worker (a
multi-page file's claim covers all its pages: one worker stores them and archives the file once); a file
another worker holds is left to it and looked at again later (``run_forever``) or by the next run. Each worker
notes the database's identity when it starts and checks it in its every unit of work, claims included.

:class:`Worker` only drives: which files to take (``run_once``: what is in the inbox now; ``run_forever``:
the watcher and the periodic sweep), the order of the stages, and the counts of what happened.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from .checks import IntakeChecks
from .claims import Claimer, ClaimLost
from .config import ScreeningSettings
from .db.models import ClaimKind
from .db.session import DatabaseGone, guard_identity, is_unreachable, log_failure
from .inference import Predictor
from .intake import EMPTY_FILE_FACTOR, Intake, sweep, text_name, wait_until_stable
from .logs import exception_kind
from .rejection import FailReason
from .renderer import Renderer, make_renderer
from .runtime import release_memory
from .stages import (
    Admitted,
    AdmittedPages,
    Deferred,
    Duplicate,
    Filing,
    GradeStage,
    IntakeOutcome,
    IntakeStage,
    Job,
    Rejected,
    ReportOutcome,
    ReportStage,
    Stored,
    StoreStage,
    Unreadable,
)
from .stages.filing import MoveFailed
from .stages.report import failed as failed_reports
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
    failed: int = 0  # grading, storing or intake failed: the file stays in the inbox for a retry
    reports: int = 0
    report_failures: int = 0  # rendered or recorded unsuccessfully: the catch-up makes them again
    deferred: int = 0  # still arriving (incomplete, or changing while read): read again later
    unreadable: int = 0  # could not be read (permissions, I/O): an incident says which; read again later
    unmoved: int = 0  # recorded, but the move out of the inbox failed (full, read-only): retried
    elsewhere: int = 0  # claimed by another worker: left to it (looked at again later in watch mode)
    no_database: int = 0  # not looked at: the database could not be reached (tried again soon, not backed off)
    waited_for_database: list[Path] = field(default_factory=list)  # those files (their back-off is not raised)
    held_elsewhere: list[Path] = field(default_factory=list)  # the files another worker holds (not this one's trouble)
    retry: list[Path] = field(default_factory=list)  # the files to hand out again (watch mode)

    def count(self, outcome: IntakeOutcome) -> None:
        if isinstance(outcome, Duplicate):
            self.duplicates += 1
        elif isinstance(outcome, Rejected):
            self.rejected += 1
        elif isinstance(outcome, Deferred):
            self.deferred += 1
            self.retry.append(outcome.path)
        elif isinstance(outcome, Unreadable):
            self.unreadable += 1
            self.retry.append(outcome.path)
        elif isinstance(outcome, AdmittedPages):  # the pages that are not photos to grade are refused
            self.rejected += len(outcome.refused)

    def wait_for_database(self, paths: list[Path]) -> None:
        """``paths`` were not handled because the database could not be reached: tried again at the next sweep."""
        self.no_database += len(paths)
        self.retry.extend(paths)
        self.waited_for_database.extend(paths)

    def count_reports(self, outcomes: list[ReportOutcome]) -> None:
        self.reports += written(outcomes)
        self.report_failures += failed_reports(outcomes)

    @property
    def ok(self) -> bool:
        """Nothing failed: every file handled (or deferred while it arrives) and every report made."""
        return not (self.failed or self.report_failures or self.unmoved or self.unreadable or self.no_database)

    def summary(self) -> str:
        return (f"processed {self.processed}, duplicates {self.duplicates}, rejected {self.rejected}, failed {self.failed}, "
                f"reports {self.reports}, report failures {self.report_failures}, deferred {self.deferred}, "
                f"could not be read (permissions, I/O) {self.unreadable}, not yet moved {self.unmoved}, left to other workers {self.elsewhere}"
                + (f", waiting for the database {self.no_database}" if self.no_database else ""))


class Worker:
    """Holds the stages (and through them the predictor, the session factory and the renderer) and this run's
    claims (``claims``; by default a :class:`~screening.claims.Claimer` for ``settings.site``)."""

    def __init__(
        self, settings: ScreeningSettings, predictor: Predictor, factory: sessionmaker[Session], templates_dir: Path,
        today: Callable[[], date] = date.today, renderer: Renderer | None = None, checks: IntakeChecks | None = None,
        claims: Claimer | None = None,
    ) -> None:
        self.s = settings
        self.predictor = predictor
        self.factory = factory
        guard_identity(factory)  # from now on, a database replaced or re-created under the worker stops it
        self.checks = checks if checks is not None else IntakeChecks.from_settings(settings)
        for folder in (settings.inbox, settings.reports, settings.archive, settings.rejected, settings.work_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.claims = claims if claims is not None else Claimer(factory, settings.site, settings.claim_lease_seconds)
        self.filing = Filing(settings, factory, self.claims)
        self.intake = IntakeStage(settings, factory, self.filing, predictor.size, today, checks=self.checks,
                                  claims=self.claims)
        self.grade = GradeStage(predictor, settings.batch_size)
        self.store = StoreStage(settings, factory, self.filing, predictor, claims=self.claims)
        if renderer is None:
            renderer = make_renderer(settings.report_renderer, settings.report_priority)
        self.report = ReportStage(settings, factory, predictor, renderer, templates_dir, claims=self.claims)

    def close(self) -> None:
        """Wait for reports on the way, then stop the renderer and give up this run's claims."""
        try:
            self.report.close()
        finally:
            self.claims.close()

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
        claimed: list[str] = []
        try:
            self._process(paths, out, claimed)
        finally:
            try:
                self.claims.release(ClaimKind.FILE, claimed)
            except DatabaseGone:
                raise
            except Exception as exc:  # noqa: BLE001 - log_failure logs it
                log_failure(log, exc, "could not release this worker's claims on %d file(s); they lapse after %.0f s",
                            len(claimed), self.s.claim_lease_seconds)
        return out

    def _claim(self, path: Path) -> bool:
        return self.claims.take(ClaimKind.FILE, path.name)

    def _process(self, paths: Iterable[Path], out: BatchOutcome, claimed: list[str]) -> None:
        jobs: list[Job] = []
        ungradable: list[Job] = []
        paths = list(paths)
        for k, path in enumerate(paths):
            try:
                if (shown := text_name(path.name)) is not None:  # no claim, row or log line can hold such a name
                    out.count(self.intake.refuse_undecodable(path, shown))
                    continue
                if not self._claim(path):  # another worker has it: left to that worker
                    out.elsewhere += 1
                    out.retry.append(path)
                    out.held_elsewhere.append(path)
                    continue
                claimed.append(path.name)
                outcome = self.intake.admit(path)
            except DatabaseGone:
                raise
            except ClaimLost:  # taken over by another worker while this one was stalled: theirs now
                out.elsewhere += 1
                continue
            except MoveFailed:  # recorded; the move is finished when the file is seen again
                out.unmoved += 1
                out.retry.append(path)
                continue
            except Exception as exc:
                if is_unreachable(exc):  # one line, not a traceback per file; the rest of the group waits too
                    log.warning("the database cannot be reached (%s); %d file(s) stay in the inbox and are tried again "
                                "at the next sweep (every %.0f s)", exception_kind(exc), len(paths) - k, self.s.sweep_interval)
                    out.wait_for_database(paths[k:])
                    break
                log.exception("intake of a file failed; it stays in the inbox and is tried again")
                out.failed += 1
                out.retry.append(path)
                continue
            out.count(outcome)
            if isinstance(outcome, Admitted):
                (jobs if outcome.job.gradable else ungradable).append(outcome.job)
            elif isinstance(outcome, AdmittedPages):  # a page is a photo like any other: graded or stored ungradable
                for job in outcome.jobs:
                    (jobs if job.gradable else ungradable).append(job)
        batches = self.grade.split(jobs)
        last_batch = {job.exam_id: k for k, batch in enumerate(batches) for job in batch}
        stored: set[int] = set()  # exams with a new result, report not yet submitted
        for job in ungradable:  # no grading: the verdict is recorded, the photo is stored for the report
            self._store(job, partial(self.store.save_ungradable, job), "checked", stored, out)
        ready = sorted(e for e in stored if e not in last_batch)  # exams with nothing to grade in this group
        stored.difference_update(ready)
        self._submit_quietly(ready)
        for k, graded in enumerate(self.grade.grade(batches)):
            if graded.error is not None:
                for job in graded.jobs:
                    self._fail(job, graded.error, FailReason.GRADING, out)
            for job, pred in zip(graded.jobs, graded.predictions):
                self._store(job, partial(self.store.save, job, pred, graded.per_image_ms), "graded", stored, out)
            del graded
            ready = sorted(e for e in stored if last_batch.get(e, -1) <= k)
            stored.difference_update(ready)
            self._submit_quietly(ready)
            out.count_reports(self.report.collect())
            release_memory(TRIM_ABOVE_FREE_BYTES)

    def _store(self, job: Job, save: Callable[[], Stored], doing: str, stored: set[int], out: BatchOutcome) -> None:
        """Store one photo with ``save`` (a graded result or an ungradable verdict) and count the outcome: its exam
        joins ``stored`` (report due), a photo the archive could not take now stays for a retry, a failure is
        recorded at the storing stage, and a photo another worker took over while this one ``doing`` it is theirs."""
        try:
            saved = save()
        except DatabaseGone:
            raise
        except ClaimLost:
            log.warning("image %s was taken over by another worker while this one %s it; its result is that worker's",
                        job.image_id, doing)
            out.elsewhere += 1
            return
        except Exception as exc:  # noqa: BLE001 - recorded as failed; the file stays for a retry
            if is_unreachable(exc):  # nothing wrong with the photo, and no failure can be recorded: it waits
                if not out.no_database:  # one line per group
                    log.warning("the database cannot be reached (%s) while storing results; their files stay in the "
                                "inbox and are graded again at the next sweep", exception_kind(exc))
                out.wait_for_database([job.path])
                return
            self._fail(job, exc, FailReason.STORING, out)
            return
        stored.add(saved.exam_id)
        out.processed += 1
        if saved.archived_as is None and not saved.awaits_pages and job.path.exists():  # the archive could not take it now
            out.unmoved += 1
            out.retry.append(job.path)

    def _fail(self, job: Job, exc: BaseException, code: FailReason, out: BatchOutcome) -> None:
        out.failed += 1
        out.retry.append(job.path)
        try:
            self.store.fail(job, exc, code)
        except DatabaseGone:
            raise
        except Exception as rec:  # noqa: BLE001 - log_failure logs it
            log_failure(log, rec, "image %s failed and the failure could not be recorded; it is tried again", job.image_id)

    def _submit_quietly(self, exam_ids: list[int] | None) -> None:
        try:
            self.report.submit(exam_ids)
        except DatabaseGone:
            raise
        except Exception as exc:  # noqa: BLE001 - log_failure logs it
            which = f"of visits {exam_ids}" if exam_ids else "waiting to be made"
            log_failure(log, exc, "could not hand the reports %s to the renderer (they will be retried)", which)

    def recover(self) -> None:
        """After a restart, before anything else: the images and moves the last run left unfinished
        (:meth:`IntakeStage.recover`), then the report files and the database (:meth:`ReportStage.reconcile`;
        a visit whose newest report file is gone is rendered again)."""
        purged = self.claims.purge_expired()
        if purged:
            log.info("removed %d claim(s) left by workers that stopped", purged)
        self.intake.recover()
        rerender = self.report.reconcile()
        if rerender:
            self._submit_quietly(rerender)

    # ------------------------------------------------------------------ driving
    def run_once(self, settle_timeout: float | None = None) -> BatchOutcome:
        """Process what is in the inbox now (waiting for files still being written), then return. An empty file
        is waited for as long as watch mode would (it may be a copy just starting), unless it is that old."""
        self.recover()
        candidates = sweep(self.s.inbox, self.s.abandoned_after)
        timeout = settle_timeout if settle_timeout is not None else max(10.0, 5 * self.s.stable_seconds)
        if settle_timeout is None and any(_empty(p) for p in candidates):
            timeout = max(timeout, EMPTY_FILE_FACTOR * self.s.stable_seconds + 1.0)
        ready = wait_until_stable(candidates, timeout, stable_seconds=self.s.stable_seconds) if candidates else []
        left = set(candidates) - set(ready)
        if left:
            log.warning("%d file(s) still changing after %.0fs; left in the inbox for the next run", len(left), timeout)
        self._submit_quietly(None)  # reports that failed or were interrupted in an earlier run
        catch_up = self.report.collect()
        out = self.process(ready)
        out.count_reports(self.report.wait() + catch_up)
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
                    try:
                        self._watch_step(intake, stop)
                    except DatabaseGone:
                        raise
                    except Exception:  # the worker keeps going; what failed is retried
                        log.exception("the worker's loop failed; going on in %.0f s", self.s.poll_interval)
                        stop.wait(self.s.poll_interval)
                    if time.monotonic() >= next_catch_up:  # retry reports that failed to render
                        self._submit_quietly(None)
                        next_catch_up = time.monotonic() + self.s.sweep_interval
        finally:
            self.close()
        log.info("worker stopped")

    def _watch_step(self, intake: Intake, stop: threading.Event) -> None:
        ready = intake.poll()
        if ready:  # in groups, so a long backlog is not all decoded at once
            group = max(self.s.batch_size * 4, 8)
            for i in range(0, len(ready), group):
                chunk = ready[i:i + group]
                try:
                    out = self.process(chunk)
                except DatabaseGone:
                    raise
                except BaseException:
                    for path in chunk:  # handed out, not finished: hand them out again
                        intake.retry_later(path)
                    raise
                for path in dict.fromkeys(out.retry):  # once each (the pages of one file share it)
                    # a database outage is not the file's fault: tried again at the base interval, not backed off
                    delay = intake.retry_later(path, reset=path in out.waited_for_database)
                    if path in out.held_elsewhere:  # nothing wrong with it: looked at again in case that worker stops
                        log.info("a file is being handled by another worker; looked at again within %.0f s", delay)
                    else:
                        log.info("a file stays in the inbox and is tried again within %.0f s", delay)
                log.info("batch: %s (reports recorded meanwhile; each report is logged when it is written)", out.summary())
        elif self.report.busy:
            self.report.collect(timeout=self.s.poll_interval)
        else:
            stop.wait(self.s.poll_interval)


def _empty(path: Path) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == 0
    except OSError:
        return False


__all__ = ["TRIM_ABOVE_FREE_BYTES", "BatchOutcome", "Worker"]

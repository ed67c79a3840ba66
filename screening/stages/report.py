"""Report stage: which visits need a report version, rendering off the inference path, recording what was written.

An exam needs a new version when a result (or an ungradable verdict) was stored after its newest report (the second eye arrived, or
an earlier render failed). :meth:`ReportStage.submit` reads the exam's results into a
:class:`~screening.report.ReportContext`, **decides its version** (:meth:`ReportStage.next_version`, the one
place that does) and hands it to the renderer (by default a side process), which publishes exactly that
version. :meth:`ReportStage.collect` records the finished ones: a report row (with the recommendation its PDF
printed, for the audit), and the images it covers as ``reported``. A failed render leaves the results stored; the catch-up (``submit()`` without exams) renders
the exam again.

At start-up :meth:`ReportStage.reconcile` makes the report folders and the database agree: a
``report_vN.pdf`` that no row records (published by a renderer that finished after its worker died) is
removed, and ``latest.pdf`` put back to the newest recorded version; a recorded report whose file is gone
is counted and its visit rendered again: a visit whose sign-off covers every photo as its reviewed version (the
grader's answers stay the ones that stand), any other as the model's. Both are ``reconcile`` events with an
incident code.

Several workers (:mod:`screening.claims`): a visit's next version is claimed (``visit``) from choosing the version
until it is recorded, so two workers that stored the visit's two eyes at the same moment make versions 1 and 2
in order instead of racing for one number. A visit another worker holds waits (:attr:`ReportStage.busy`) and
is tried again; once claimed it is rendered only if a photo of it is still unreported. When a worker takes a
visit's claim afresh, a version file no row records is a dead worker's (nobody else may render the visit):
it is removed first, so the recorded versions stay 1, 2, 3 ... with no gap. Start-up reconciliation leaves
alone the visits other workers hold.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from training.common import atomic_write, safe_id

from ..claims import Claimer
from ..config import ScreeningSettings
from ..db import repository as repo
from ..db import reviews as rrepo
from ..db.models import ClaimKind, Exam, Image, ImageState, Patient, Report, Review, utcnow
from ..db.session import DatabaseGone, log_failure, transaction
from ..findings import refused_page_reasons, stored_finding
from ..inference import Predictor
from ..logs import exception_kind
from ..rejection import Incident
from ..renderer import Renderer, RenderJob, RenderResult
from ..report import (
    REFER_LEVELS,
    REFERRAL_LEVELS,
    EyeFinding,
    ReportContext,
    ReportError,
    existing_versions,
    printed_referral,
    report_folder,
    with_undetected,
)
from .outcomes import PendingReport, ReportFailed, ReportOutcome, ReportWritten

if TYPE_CHECKING:
    from ..review.reviewed_report import ModelCatalog

log = logging.getLogger("screening")


class ReportStage:
    def __init__(
        self, settings: ScreeningSettings, factory: sessionmaker[Session], predictor: Predictor, renderer: Renderer,
        templates_dir: Path, claims: Claimer | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.predictor = predictor  # the model shown on each report
        self.renderer = renderer
        self.templates_dir = templates_dir
        self.claims = claims  # None: the only writer of reports (no claims)
        self._in_flight: dict[int, PendingReport] = {}  # renderer job key -> what it covers
        self._waiting: set[int] = set()  # exams whose visit claim another worker holds: tried again
        self._waiting_retry_at = 0.0
        self._next_key = 1
        self._catalog: ModelCatalog | None = None  # installed checkpoints' metrics, for photos another model graded
        # visits reconcile found without their latest PDF (exam -> that version), until a version of them is
        # recorded: every photo of theirs is reported, so the catch-up would not find them again after a failed render
        self._again: dict[int, int] = {}

    @property
    def in_flight(self) -> Mapping[int, PendingReport]:
        """Reports handed to the renderer and not yet collected, by job key."""
        return dict(self._in_flight)

    @property
    def waiting(self) -> frozenset[int]:
        """Exams whose report waits for another worker to finish its version of the visit."""
        return frozenset(self._waiting)

    @property
    def busy(self) -> bool:
        """Reports in flight, or waiting for another worker's."""
        return bool(self._in_flight or self._waiting)

    # ------------------------------------------------------------------------------------ claiming
    def _queued(self, exam_id: int) -> bool:
        return any(p.exam_id == exam_id for p in self._in_flight.values())

    def _claim(self, exam_id: int) -> bool:
        """This worker's claim on the visit's next version: already held while a version of it is in flight here."""
        if self.claims is None or self._queued(exam_id):
            return True
        return self.claims.take(ClaimKind.VISIT, str(exam_id))

    def _release(self, exam_id: int) -> None:
        if self.claims is not None and not self._queued(exam_id):
            self.claims.release(ClaimKind.VISIT, [str(exam_id)])

    def _still_unreported(self, exam_id: int) -> bool:
        """After waiting for another worker's version: whether a photo of the visit is still unreported."""
        return bool(transaction(self.factory, lambda session: session.scalar(
            select(Image.id).where(Image.exam_id == exam_id, Image.state == ImageState.DONE.value).limit(1)),
            what="checking a visit's report"))

    def _remove_unrecorded(self, exam_id: int) -> None:
        remove_unrecorded_versions(self.factory, self.settings.reports, exam_id)

    # ------------------------------------------------------------------------------------ deciding
    def next_version(self, session: Session, exam: Exam) -> int:
        """The version the exam's next report gets: one past the highest of those recorded in the database, on
        their way in the renderer, and on disk (a report published just before a crash, never recorded).
        The renderer publishes exactly this version and never over an existing file."""
        recorded = repo.next_report_version(session, exam.id) - 1
        queued = max((p.version for p in self._in_flight.values() if p.exam_id == exam.id), default=0)
        on_disk = max(existing_versions(report_folder(self.settings.reports, exam.patient.code, exam.exam_date)), default=0)
        return max(recorded, queued, on_disk) + 1

    def _context(self, session: Session, exam: Exam, version: int) -> ReportContext:
        """Every photograph of the exam the worker stored (graded, or ungradable with its reasons), in arrival order
        within each eye: several fields of one eye are all shown, and the report picks the eye's result by
        ``settings.eye_result`` (a gradable field before an ungradable one)."""
        fields: list[EyeFinding] = []
        images = repo.exam_images_with_results(session, exam.id, include_pending=True)
        review = rrepo.current_review(session, exam.id)
        # a photo moved out of the visit after its sign-off (dr-screen review move) reopens it too; a visit left with no
        # photo is no visit of the review queue, so its sign-off is read here
        moved_out = review is not None and exam.refiled_at is not None and exam.refiled_at > review.created_at
        reopened = review is not None and (moved_out or self._reopened(session, exam.id))
        for image, result in images:
            if (finding := stored_finding(image, result)) is not None:  # graded: lesions judged by the model that graded it
                fields.append(finding if result is None else with_undetected(finding, self._metrics_of(result.checkpoint_sha256)))
        ctx = ReportContext(
            clinic_name=self.settings.clinic_name, patient_id=exam.patient.code, exam_date=exam.exam_date,
            eyes=fields, model_version=self.predictor.version,
            checkpoint_sha256=self.predictor.meta["checkpoint_sha256"],
            model_status="research" if self.predictor.kind == "real" else "demo",
            model_metrics=self.predictor.report_metrics(), generated_at=datetime.now(timezone.utc).astimezone(),
            report_version=version, eye_result_rule=self.settings.eye_result,
            ungradable_rule=self.settings.ungradable_rule,
            refused_pages=refused_page_reasons(session, exam.id),
            earlier_review=self._earlier_review(session, review, reopened, emptied=not fields),
            visit_note=exam.filing_note,
        )
        if fields and review is not None and ctx.earlier_review is not None and reopened and review.referral in REFER_LEVELS and (
                REFERRAL_LEVELS[review.referral].rank > REFERRAL_LEVELS[printed_referral(ctx)].rank):
            # a reopened referral more urgent than this draft's: the draft must not read as the lower answer alone
            ctx = replace(ctx, earlier_review=f"{ctx.earlier_review} That sign-off's recommendation, "
                          f"'{REFERRAL_LEVELS[review.referral].text}', is more urgent than this version's: act on it "
                          "until the visit is reviewed again.", earlier_review_urgent=True)
        return ctx

    def _metrics_of(self, checkpoint_sha256: str) -> Mapping[str, float | str]:
        """The report metrics of the checkpoint that graded a photo: the loaded model's, else an installed file's
        (:class:`ModelCatalog`, read once per file); empty when none is installed (nothing claimed)."""
        if checkpoint_sha256 == self.predictor.meta["checkpoint_sha256"]:
            return self.predictor.report_metrics()
        if self._catalog is None:
            from ..review.reviewed_report import ModelCatalog

            self._catalog = ModelCatalog.from_settings(self.settings)
        return self._catalog.metrics(checkpoint_sha256)

    def _reopened(self, session: Session, exam_id: int) -> bool:
        """Whether a photograph came after the visit's current sign-off: the review queue's own rule
        (:attr:`screening.review.visits.Visit.reopened`)."""
        from ..review.visits import load_visits

        visits = load_visits(session, [exam_id], self.settings.eye_result, self.settings.ungradable_rule)
        return bool(visits) and visits[0].reopened is not None

    @staticmethod
    def _earlier_review(session: Session, review: Review | None, reopened: bool, emptied: bool = False) -> str | None:
        """What a worker's version says of the visit's current sign-off ``review``, if it has one: that photographs
        came after it (``reopened``: the visit is back in the review queue), or that it covers everything shown."""
        if review is None:
            return None
        reviewed = rrepo.report_of_review(session, review.id)
        which = (f" (report v{reviewed.version})" if reviewed is not None
                 else " (its reviewed version is not rendered yet: `dr-screen review render` makes it)")
        signed = (f"This visit was signed off by {review.reviewer} on {review.reviewed_at.astimezone():%Y-%m-%d}{which}, "
                  f"recommending '{REFERRAL_LEVELS[review.referral].text}'")
        if emptied:  # every photo it answered for was moved to another patient's or date's visit
            return (f"{signed}. Its photographs were moved to other visits since, so that sign-off no longer stands "
                    "for this visit.")
        if reopened:
            return (f"{signed}. Photographs were added, moved, or had their eye set after that sign-off, so this "
                    "version shows the model's findings only and awaits review again.")
        return f"{signed}; its answers are on {'the reviewed' if reviewed is None else 'that'} version."

    # ---------------------------------------------------------------------------------- rendering
    def _snapshot(self, session: Session, exam_id: int) -> tuple[datetime, int, ReportContext, tuple[int, ...]]:
        """What the exam's next report holds, read in one transaction: when, which version, the content, and
        the images it covers."""
        exam = session.get(Exam, exam_id)
        if exam is None:
            raise LookupError(f"exam {exam_id} is not in the database; no report to render")
        snapshot_at = utcnow()
        version = self.next_version(session, exam)
        ctx = self._context(session, exam, version)
        return snapshot_at, version, ctx, tuple(i.id for i in exam.images if i.state == ImageState.DONE)

    def submit(self, exam_ids: list[int] | None = None) -> int:
        """Hand the reports of ``exam_ids`` to the renderer, or, when None, of every exam whose newest result is
        in no report yet and that has no report on the way (start-up and periodic catch-up). The renderer works
        while the caller goes on; :meth:`collect` records what it finished. Returns how many were handed over."""
        if exam_ids is None:
            in_flight = {p.exam_id for p in self._in_flight.values()}
            exam_ids = transaction(self.factory, lambda session: [
                e.id for e in repo.exams_needing_report(session) if e.id not in in_flight], what="finding reports to make")
            exam_ids += [e for e in self._made_again(in_flight) if e not in exam_ids]
        submitted = 0
        for exam_id in exam_ids:
            waited = exam_id in self._waiting
            fresh = self.claims is not None and not self._queued(exam_id)
            if not self._claim(exam_id):  # another worker is making a version of this visit: after it
                self._waiting.add(exam_id)
                continue
            self._waiting.discard(exam_id)
            try:
                if waited and not self._still_unreported(exam_id):  # the other worker's version covered it all
                    self._release(exam_id)
                    continue
                if fresh:
                    self._remove_unrecorded(exam_id)
                snapshot_at, version, ctx, done = transaction(
                    self.factory, functools.partial(self._snapshot, exam_id=exam_id), what="reading a report's content")
                key, self._next_key = self._next_key, self._next_key + 1
                self.renderer.submit(RenderJob(key, ctx, self.templates_dir, self.settings.reports,
                                               retries=self.settings.report_retries))
            except BaseException:
                self._release(exam_id)
                raise
            self._in_flight[key] = PendingReport(exam_id, version, done, snapshot_at, printed_referral(ctx))
            submitted += 1
        return submitted

    def _retry_waiting(self) -> None:
        """Visits that waited for another worker: claimed again, at most once a second."""
        if not self._waiting or time.monotonic() < self._waiting_retry_at:
            return
        self._waiting_retry_at = time.monotonic() + 1.0
        try:
            self.submit(sorted(self._waiting))
        except DatabaseGone:
            raise
        except Exception as exc:  # noqa: BLE001 - log_failure logs it
            log_failure(log, exc, "could not hand over reports that waited for another worker; trying again")

    # ---------------------------------------------------------------------------------- recording
    def _record(self, result: RenderResult) -> ReportOutcome:
        pending = self._in_flight.pop(result.key)
        if result.version != pending.version:  # both ends are this code: a mix-up is a bug, not a retry
            raise RuntimeError(f"renderer job {result.key} answered for version {result.version}, "
                               f"expected {pending.version} of exam {pending.exam_id}")
        if result.path is None:
            error = result.error or "unknown error"
            transaction(self.factory, lambda session: repo.add_event(
                session, "report_failed", f"exam {pending.exam_id}: {error}", code=Incident.REPORT_FAILED),
                what="recording a failed report")
            log.error("report for exam %s failed, will retry: %s", pending.exam_id, result.kind or error)
            return ReportFailed(pending.exam_id, pending.version, error)
        path = result.path

        def record(session: Session) -> None:
            if self.claims is not None:  # ClaimLost: another worker took the visit over; the version is theirs to make
                self.claims.hold(session, ClaimKind.VISIT, str(pending.exam_id))
            exam = session.get(Exam, pending.exam_id)
            if exam is None:
                raise LookupError(f"exam {pending.exam_id} is not in the database; its report {path.name} is unrecorded")
            # created_at = when its content was read, so a result stored after that still counts as unreported
            repo.add_report(session, exam, path, self.predictor.version, version=result.version,
                            created_at=pending.snapshot_at, referral_level=pending.referral_level)
            for image in exam.images:
                if image.id in pending.image_ids and image.state == ImageState.DONE:
                    repo.set_state(session, image, ImageState.REPORTED)

        transaction(self.factory, record, what="recording a report")
        self._again.pop(pending.exam_id, None)
        log.info("report v%s for exam %s written", result.version, pending.exam_id)
        return ReportWritten(pending.exam_id, result.version, result.path)

    def collect(self, timeout: float = 0.0) -> list[ReportOutcome]:
        """Record the reports the renderer has finished (waiting up to ``timeout`` s for one), failures included."""
        results = self.renderer.results(timeout) if self._in_flight else []
        outcomes: list[ReportOutcome] = []
        for result in results:
            exam_id = self._in_flight[result.key].exam_id if result.key in self._in_flight else None
            try:
                outcomes.append(self._record(result))
            except DatabaseGone:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; the catch-up makes it again
                log_failure(log, exc, "recording the report of job %s failed; it will be rendered again", result.key)
                pending = self._in_flight.pop(result.key, None)
                if pending is not None:
                    outcomes.append(ReportFailed(pending.exam_id, pending.version, f"{type(exc).__name__}: not recorded"))
            if exam_id is not None:
                self._release(exam_id)
        self._retry_waiting()
        return outcomes

    def wait(self, stall_timeout: float = 300.0) -> list[ReportOutcome]:
        """Block until every submitted report is rendered and recorded. If none finishes for ``stall_timeout``
        seconds the renderer is stopped (a hung WeasyPrint) and its reports count as failed: the results stay
        stored and the catch-up renders them again."""
        outcomes: list[ReportOutcome] = []
        last = time.monotonic()
        while self._in_flight or self._waiting:
            if not self._in_flight:  # only waiting for other workers' versions: nothing to collect yet
                time.sleep(0.2)
            got = self.collect(timeout=1.0)
            outcomes += got
            if got:
                last = time.monotonic()
            elif time.monotonic() - last > stall_timeout:
                log.error("no report finished in %.0f s; stopping the renderer, %d report(s) will be retried",
                          stall_timeout, len(self._in_flight) + len(self._waiting))
                self.renderer.close(timeout=5)
                outcomes += self.collect()
                for pending in self._in_flight.values():
                    if self.claims is not None:
                        self.claims.release(ClaimKind.VISIT, [str(pending.exam_id)])
                self._in_flight.clear()
                self._waiting.clear()
                break
        return outcomes

    def close(self) -> None:
        """Wait for the reports on the way (up to 2 minutes without progress), then stop the renderer."""
        self.wait(stall_timeout=120)
        self.renderer.close()


    # ------------------------------------------------------------------------------- reconciling
    def reconcile(self) -> list[int]:
        """At start-up, before anything renders (see the module docstring). Returns the exams to render again.

        * An unrecorded ``report_vN.pdf`` can only belong to an exam that still has a ``done`` image: the
          worker that submitted it died before recording it, so its images were never marked reported (and
          every start-up reconciles before anything renders). Only those exams' folders are listed.
        * A recorded report whose newest version is gone from disk (deleted by hand, a restored backup) is
          counted and its visit rendered again: one ``stat`` per exam with reports. A visit whose sign-off covers
          every photo is rendered here as its reviewed version (:meth:`_render_reviewed_again`); the others are
          returned, for the model's version.

        Only folders of exams in the database are looked at; nothing else in ``reports/`` is touched."""
        if self._in_flight:
            raise RuntimeError("reconcile() runs before any report is submitted")

        def read(session: Session) -> tuple[dict[int, tuple[str, set[int], bool]], dict[tuple[int, int], str]]:
            busy = self.claims.held_by_others(session, ClaimKind.VISIT) if self.claims is not None else {}
            has_done = select(Image.id).where(Image.exam_id == Exam.id, Image.state == ImageState.DONE.value).exists()
            rows = session.execute(
                select(Exam.id, Patient.code, Exam.exam_date, Report.version, Report.path, has_done)
                .join(Patient, Patient.id == Exam.patient_id).outerjoin(Report, Report.exam_id == Exam.id)).all()
            root = str(self.settings.reports)
            exams: dict[int, tuple[str, set[int], bool]] = {}
            recorded: dict[tuple[int, int], str] = {}
            for exam_id, code, exam_date, version, path, done in rows:
                if str(exam_id) in busy:  # another worker is making a version of it right now
                    continue
                entry = exams.get(exam_id)
                if entry is None:  # plain strings: pathlib costs ~0.1 ms a path, seconds over 20,000 exams
                    entry = exams[exam_id] = (os.path.join(root, safe_id(code), exam_date.isoformat()), set(), bool(done))
                if version is not None:
                    entry[1].add(version)
                    recorded[(exam_id, version)] = path
            return exams, recorded

        exams, recorded = transaction(self.factory, read, what="reading recorded reports")
        removed: dict[int, list[int]] = {}
        missing: dict[int, int] = {}
        for exam_id, (where, versions, has_done) in exams.items():
            if has_done:
                folder = Path(where)
                orphans = sorted(set(existing_versions(folder)) - versions)
                for version in orphans:
                    (folder / f"report_v{version}.pdf").unlink(missing_ok=True)
                if orphans:
                    removed[exam_id] = orphans
                    self._restore_latest(folder, versions)
            # gone from both where it was recorded and where the configured folder puts it (a reports folder
            # moved in the settings, its files left where they were: nothing to render again)
            if versions and not os.path.isfile(os.path.join(where, f"report_v{max(versions)}.pdf")) and not (
                    os.path.isfile(recorded[(exam_id, max(versions))])):
                missing[exam_id] = max(versions)

        def record(session: Session) -> None:
            for exam_id, versions_removed in removed.items():
                repo.add_event(session, "reconcile", f"exam {exam_id}: removed report_v{versions_removed} (written by a "
                               "renderer after its worker stopped; never recorded)", code=Incident.ORPHAN_REPORT_REMOVED)
            for exam_id, version in missing.items():
                repo.add_event(session, "reconcile", f"exam {exam_id}: recorded report_v{version} is missing on disk; "
                               "rendered again", code=Incident.REPORT_FILE_MISSING)

        if removed or missing:
            transaction(self.factory, record, what="recording reconciled reports")
            log.warning("reports reconciled at start-up: %d unrecorded PDF(s) removed, %d visit(s) whose report is "
                        "missing rendered again", sum(map(len, removed.values())), len(missing))
        self._again.update(missing)  # made now, and by the catch-up until a version is recorded: one path for both
        return self._made_again(set())

    def _made_again(self, in_flight: set[int]) -> list[int]:
        """The catch-up's share of the visits reconcile found without their latest PDF: each still missing it (no
        newer version recorded since, by this worker, another or a sign-off, and the file still gone) is made
        again, a signed-off one here as its reviewed version; returns those for the model's version."""
        if not self._again:
            return []

        def newest(session: Session) -> dict[int, tuple[int, str]]:
            rows = session.execute(select(Report.exam_id, Report.version, Report.path)
                                   .where(Report.exam_id.in_(list(self._again))).order_by(Report.version)).all()
            return {exam_id: (version, path) for exam_id, version, path in rows}

        latest = transaction(self.factory, newest, what="reading the versions of visits to make again")
        for exam_id, version in list(self._again.items()):
            recorded = latest.get(exam_id)
            if recorded is None or recorded[0] != version or os.path.isfile(recorded[1]):
                del self._again[exam_id]  # a newer version was recorded, or the file is back
        due = sorted(e for e in self._again if e not in in_flight)
        signed = self._signed_off(due)
        for exam_id in signed:
            self._render_reviewed_again(exam_id)
        return [e for e in due if e not in signed]

    def _signed_off(self, exam_ids: list[int]) -> list[int]:
        """Of ``exam_ids``, the visits whose current sign-off covers every photo (not awaiting review): their
        report is the grader's, so it is made again as a reviewed version, not as the model's draft, which would
        stand in its place (the PDF staff open, the audit's standing recommendation)."""
        if not exam_ids:
            return []
        from ..review.visits import load_visits

        def read(session: Session) -> list[int]:
            reviewed = rrepo.current_reviews(session, exam_ids)
            visits = load_visits(session, list(reviewed), self.settings.eye_result, self.settings.ungradable_rule)
            return [v.exam_id for v in visits if not v.awaiting_review]

        return transaction(self.factory, read, what="reading the sign-offs of visits to render again")

    def _render_reviewed_again(self, exam_id: int) -> None:
        """The reviewed version of a signed-off visit whose latest report is gone, rendered here (start-up only,
        so WeasyPrint's time in this process is rare). A failure is logged with what to do; the sign-off and its
        grades stay recorded, and the model's draft is not made in its place."""
        from ..review.reviewed_report import ModelCatalog, render_reviewed_report
        from ..review.visits import ReviewError

        if self._catalog is None:
            self._catalog = ModelCatalog.from_settings(self.settings)
        try:
            report = render_reviewed_report(
                self.factory, exam_id, catalog=self._catalog, clinic_name=self.settings.clinic_name,
                templates_dir=self.templates_dir, reports_dir=self.settings.reports, retries=self.settings.report_retries,
                rule=self.settings.eye_result, ungradable_rule=self.settings.ungradable_rule, claims=self.claims)
        except (ReportError, ReviewError) as exc:
            log.error("visit %s: its signed-off report is missing and could not be made again (%s); the worker tries "
                      "again at its next catch-up (every sweep_interval)", exam_id, exception_kind(exc))
            return
        self._again.pop(exam_id, None)
        log.info("visit %s: its signed-off report was missing; reviewed version v%s made again", exam_id, report.version)

    @staticmethod
    def _restore_latest(folder: Path, recorded: set[int]) -> None:
        """``latest.pdf`` = the newest recorded version on disk (or none) after unrecorded versions went."""
        latest = folder / "latest.pdf"
        present = [v for v in sorted(recorded, reverse=True) if (folder / f"report_v{v}.pdf").is_file()]
        if not present:
            latest.unlink(missing_ok=True)
            return
        newest = folder / f"report_v{present[0]}.pdf"
        atomic_write(latest, lambda tmp: shutil.copyfile(newest, tmp))


def remove_unrecorded_versions(factory: sessionmaker[Session], reports_dir: Path, exam_id: int) -> list[int]:
    """For a visit just claimed afresh (nobody else may render it now): remove the version files no row records,
    left by a worker that died after its renderer published them, and put ``latest.pdf`` back to the newest
    recorded version, so the next version fills their number. Returns the versions removed."""

    def read(session: Session) -> tuple[Path, set[int]] | None:
        exam = session.get(Exam, exam_id)
        if exam is None:
            return None
        versions = set(session.scalars(select(Report.version).where(Report.exam_id == exam_id)))
        return report_folder(reports_dir, exam.patient.code, exam.exam_date), versions

    found = transaction(factory, read, what="reading a visit's recorded reports")
    if found is None:
        return []
    folder, recorded = found
    orphans = sorted(set(existing_versions(folder)) - recorded)
    if not orphans:
        return []
    for version in orphans:
        (folder / f"report_v{version}.pdf").unlink(missing_ok=True)
    ReportStage._restore_latest(folder, recorded)
    transaction(factory, lambda session: repo.add_event(
        session, "reconcile", f"exam {exam_id}: removed report_v{orphans} (written by a renderer after its worker "
        "stopped; never recorded)", code=Incident.ORPHAN_REPORT_REMOVED), what="recording removed reports")
    log.warning("exam %s: removed %d report version(s) a stopped worker never recorded", exam_id, len(orphans))
    return orphans


def written(outcomes: list[ReportOutcome]) -> int:
    """How many of ``outcomes`` are reports written."""
    return sum(isinstance(o, ReportWritten) for o in outcomes)


def failed(outcomes: list[ReportOutcome]) -> int:
    """How many of ``outcomes`` are reports that failed (to render, or to be recorded)."""
    return sum(isinstance(o, ReportFailed) for o in outcomes)


__all__ = ["ReportStage", "failed", "remove_unrecorded_versions", "written"]

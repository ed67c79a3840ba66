"""Report stage: which visits need a report version, rendering off the inference path, recording what was written.

An exam needs a new version when a result was stored after its newest report (the second eye arrived, or
an earlier render failed). :meth:`ReportStage.submit` reads the exam's results into a
:class:`~screening.report.ReportContext`, **decides its version** (:meth:`ReportStage.next_version`, the one
place that does) and hands it to the renderer (by default a side process), which publishes exactly that
version. :meth:`ReportStage.collect` records the finished ones: a report row, and the images it covers as
``reported``. A failed render leaves the results stored; the catch-up (``submit()`` without exams) renders
the exam again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session, sessionmaker

from training.api import REASON_TEXT

from ..config import ScreeningSettings
from ..db import repository as repo
from ..db.models import Exam, ImageState, utcnow
from ..db.session import session_scope
from ..inference import Predictor
from ..renderer import Renderer, RenderJob, RenderResult
from ..report import EYE_ORDER, EyeFinding, ReportContext, existing_versions, report_folder
from .outcomes import PendingReport, ReportFailed, ReportOutcome, ReportWritten
from .store import photo_folder

log = logging.getLogger("screening")


class ReportStage:
    def __init__(
        self, settings: ScreeningSettings, factory: sessionmaker[Session], predictor: Predictor, renderer: Renderer,
        templates_dir: Path,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.predictor = predictor  # the model shown on each report
        self.renderer = renderer
        self.templates_dir = templates_dir
        self._in_flight: dict[int, PendingReport] = {}  # renderer job key -> what it covers
        self._next_key = 1

    @property
    def in_flight(self) -> Mapping[int, PendingReport]:
        """Reports handed to the renderer and not yet collected, by job key."""
        return dict(self._in_flight)

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
        eyes: dict[str, EyeFinding] = {}
        for image, result in repo.exam_images_with_results(session, exam.id, include_pending=True):
            if image.eye not in EYE_ORDER or image.state not in (ImageState.DONE, ImageState.REPORTED):
                continue
            eye: Literal["R", "L"] = "R" if image.eye == "R" else "L"
            if result is None:
                if image.gradable is not False:
                    continue  # done without a result and not judged ungradable: not an image a report can show
                if eye in eyes and eyes[eye].gradable:
                    continue  # a gradable photo of the eye beats an ungradable one, whatever their order
                eyes[eye] = EyeFinding(
                    eye=eye, source_name=image.source_name, photo_path=self._photo(image.sha256), overlay_path=None,
                    dr_cam_path=None, dme_cam_path=None, dr_grade=None, dr_probs=None, dme_grade=None, dme_probs=None,
                    referable_score=None, referable=None, gradable=False, eye_note=image.eye_note,
                    ungradable_reasons=tuple(REASON_TEXT.get(r, r) for r in (image.quality_reasons or ["not assessed"])),
                )
                continue
            folder = Path(result.mask_dir) if result.mask_dir else None
            eyes[eye] = EyeFinding(  # a later gradable image of the same eye replaces an earlier one
                eye=eye, source_name=image.source_name,
                photo_path=folder / "photo.jpg" if folder else None,
                overlay_path=Path(result.overlay_path) if result.overlay_path else None,
                dr_cam_path=Path(result.dr_cam_path) if result.dr_cam_path else None,
                dme_cam_path=Path(result.dme_cam_path) if result.dme_cam_path else None,
                dr_grade=result.dr_grade, dr_probs=result.dr_probs, dme_grade=result.dme_grade, dme_probs=result.dme_probs,
                referable_score=result.referable_score, referable=result.referable, lesion_areas=result.lesion_areas,
                eye_note=image.eye_note,
            )
        return ReportContext(
            clinic_name=self.settings.clinic_name, patient_id=exam.patient.code, exam_date=exam.exam_date,
            eyes=[eyes[e] for e in EYE_ORDER if e in eyes], model_version=self.predictor.version,
            checkpoint_sha256=self.predictor.meta["checkpoint_sha256"],
            model_status="research" if self.predictor.kind == "real" else "demo",
            model_metrics=self.predictor.report_metrics(), generated_at=datetime.now(timezone.utc).astimezone(),
            report_version=version, ungradable_rule=self.settings.ungradable_rule,
        )

    def _photo(self, sha256: str) -> Path | None:
        """The display photo the store stage published for an ungradable image (None when it is not there)."""
        path = photo_folder(self.settings.work_dir, sha256) / "photo.jpg"
        return path if path.is_file() else None

    # ---------------------------------------------------------------------------------- rendering
    def submit(self, exam_ids: list[int] | None = None) -> int:
        """Hand the reports of ``exam_ids`` to the renderer, or, when None, of every exam whose newest result is
        in no report yet and that has no report on the way (start-up and periodic catch-up). The renderer works
        while the caller goes on; :meth:`collect` records what it finished. Returns how many were handed over."""
        if exam_ids is None:
            in_flight = {p.exam_id for p in self._in_flight.values()}
            with session_scope(self.factory) as session:
                exam_ids = [e.id for e in repo.exams_needing_report(session) if e.id not in in_flight]
        for exam_id in exam_ids:
            with session_scope(self.factory) as session:
                exam = session.get(Exam, exam_id)
                if exam is None:
                    raise LookupError(f"exam {exam_id} is not in the database; no report to render")
                snapshot_at = utcnow()
                version = self.next_version(session, exam)
                ctx = self._context(session, exam, version)
                done = tuple(i.id for i in exam.images if i.state == ImageState.DONE)
            key, self._next_key = self._next_key, self._next_key + 1
            self.renderer.submit(RenderJob(key, ctx, self.templates_dir, self.settings.reports,
                                           retries=self.settings.report_retries))
            self._in_flight[key] = PendingReport(exam_id, version, done, snapshot_at)
        return len(exam_ids)

    # ---------------------------------------------------------------------------------- recording
    def _record(self, result: RenderResult) -> ReportOutcome:
        pending = self._in_flight.pop(result.key)
        if result.version != pending.version:  # both ends are this code: a mix-up is a bug, not a retry
            raise RuntimeError(f"renderer job {result.key} answered for version {result.version}, "
                               f"expected {pending.version} of exam {pending.exam_id}")
        if result.path is None:
            error = result.error or "unknown error"
            with session_scope(self.factory) as session:
                repo.add_event(session, "report_failed", f"exam {pending.exam_id}: {error}")
            log.error("report for exam %s failed, will retry: %s", pending.exam_id, error)
            return ReportFailed(pending.exam_id, pending.version, error)
        with session_scope(self.factory) as session:
            exam = session.get(Exam, pending.exam_id)
            if exam is None:
                raise LookupError(f"exam {pending.exam_id} is not in the database; its report {result.path.name} is unrecorded")
            # created_at = when its content was read, so a result stored after that still counts as unreported
            repo.add_report(session, exam, result.path, self.predictor.version, version=result.version,
                            created_at=pending.snapshot_at)
            for image in exam.images:
                if image.id in pending.image_ids and image.state == ImageState.DONE:
                    repo.set_state(session, image, ImageState.REPORTED)
        log.info("report v%s for exam %s written", result.version, pending.exam_id)
        return ReportWritten(pending.exam_id, result.version, result.path)

    def collect(self, timeout: float = 0.0) -> list[ReportOutcome]:
        """Record the reports the renderer has finished (waiting up to ``timeout`` s for one), failures included."""
        results = self.renderer.results(timeout) if self._in_flight else []
        outcomes: list[ReportOutcome] = []
        for result in results:
            try:
                outcomes.append(self._record(result))
            except Exception:
                log.exception("recording the report of job %s failed; it will be rendered again", result.key)
        return outcomes

    def wait(self, stall_timeout: float = 300.0) -> list[ReportOutcome]:
        """Block until every submitted report is rendered and recorded. If none finishes for ``stall_timeout``
        seconds the renderer is stopped (a hung WeasyPrint) and its reports count as failed: the results stay
        stored and the catch-up renders them again."""
        outcomes: list[ReportOutcome] = []
        last = time.monotonic()
        while self._in_flight:
            got = self.collect(timeout=1.0)
            outcomes += got
            if got:
                last = time.monotonic()
            elif time.monotonic() - last > stall_timeout:
                log.error("no report finished in %.0f s; stopping the renderer, %d report(s) will be retried",
                          stall_timeout, len(self._in_flight))
                self.renderer.close(timeout=5)
                outcomes += self.collect()
                self._in_flight.clear()
                break
        return outcomes

    def close(self) -> None:
        """Wait for the reports on the way (up to 2 minutes without progress), then stop the renderer."""
        self.wait(stall_timeout=120)
        self.renderer.close()


def written(outcomes: list[ReportOutcome]) -> int:
    """How many of ``outcomes`` are reports written."""
    return sum(isinstance(o, ReportWritten) for o in outcomes)


__all__ = ["ReportStage", "written"]

"""The reviewed version of a visit's report: after a sign-off, the PDF is rendered again as a new version
that says who reviewed it and when, with each correction beside the model's answer.

It is rendered where the sign-off is made (the review page or the command line), without the worker: the
model's description (version, status, validation metrics) comes from the checkpoint whose SHA-256 the
visit's results carry, read once per file version (its network is built to read it, then dropped).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session, sessionmaker

from screening.claims import Claimer
from screening.config import ScreeningSettings
from screening.db import repository as repo
from screening.db.models import ClaimKind, Exam, Report
from screening.db.session import session_scope
from screening.findings import refused_page_reasons
from screening.report import (
    EyeResultRule,
    ReportContext,
    ReportError,
    ReportVersionTaken,
    UngradableRule,
    existing_versions,
    model_metrics_for_report,
    printed_referral,
    render_with_retries,
    report_folder,
    with_undetected,
)
from screening.review.eyes import CLAIM_WAIT_S  # longer, and the sign-off is rendered later
from screening.review.visits import ReviewError, Visit, load_visit, review_note

log = logging.getLogger(__name__)
# One render at a time per process: the review page serves from several threads, and WeasyPrint's cached
# stylesheet and font configuration (screening.report) are shared objects not meant for concurrent use.
_RENDER_LOCK = threading.Lock()
VERSION_ATTEMPTS = 5


@dataclass(frozen=True)
class ModelInfo:
    """What a report says about the model that graded the visit."""

    version: str
    checkpoint_sha256: str
    status: Literal["research", "demo"]
    metrics: dict[str, float | str] = field(default_factory=dict)


class ModelCatalog:
    """The checkpoints this installation may have graded with (the configured one and the demo model), read
    as metadata once per file version; :meth:`describe` matches a result's checkpoint hash to one of them."""

    def __init__(self, checkpoints: list[Path]) -> None:
        self.checkpoints = [Path(p) for p in checkpoints]
        self._cache: dict[tuple[Path, int, int], dict[str, Any] | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ScreeningSettings) -> ModelCatalog:
        return cls([settings.checkpoint, settings.demo_checkpoint])

    def _meta(self, path: Path) -> dict[str, Any] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (path.resolve(), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key not in self._cache:
                from training.api import CheckpointError, load_model

                try:
                    _, meta = load_model(path, "cpu")  # the public checkpoint API; only the metadata is kept
                except CheckpointError as exc:  # remembered too: the review page asks on every view
                    log.warning("cannot describe the model from %s: %s", path, exc)
                    meta = None
                self._cache[key] = meta
            return self._cache[key]

    def configured(self) -> ModelInfo:
        """The first of the checkpoints that can be read (the configured one, else the demo model): what a report
        names when the visit has no graded photo (every one ungradable), as the worker's own report does."""
        for path in self.checkpoints:
            meta = self._meta(path)
            if meta is not None:
                version = str(meta["model_version"])
                return self.describe(version, str(meta["checkpoint_sha256"]))
        log.warning("none of %s can be read: the reviewed report names no model", [str(p) for p in self.checkpoints])
        return ModelInfo("unknown", "", "research")

    def metrics(self, checkpoint_sha256: str | None) -> dict[str, float | str]:
        """The report's labelled metrics of the checkpoint with this hash; empty when it is not installed (the
        review page asks for every visit it shows: no warning here, the reviewed report gives one)."""
        for path in self.checkpoints:
            meta = self._meta(path)
            if checkpoint_sha256 and meta is not None and meta["checkpoint_sha256"] == checkpoint_sha256:
                return model_metrics_for_report(meta)
        return {}

    def describe(self, version: str, checkpoint_sha256: str) -> ModelInfo:
        for path in self.checkpoints:
            meta = self._meta(path)
            if meta is not None and meta["checkpoint_sha256"] == checkpoint_sha256:
                kind = meta.get("provenance", {}).get("kind")
                return ModelInfo(version, checkpoint_sha256, "research" if kind == "real" else "demo",
                                 model_metrics_for_report(meta))
        # The checkpoint that graded the visit is gone (replaced by a newer model). Only a demo model's
        # version says "synthetic"; without its metrics the report shows none rather than another model's.
        log.warning("the checkpoint %s... of model %s is not among %s: its metrics are left off the reviewed report",
                    checkpoint_sha256[:12], version, [str(p) for p in self.checkpoints])
        return ModelInfo(version, checkpoint_sha256, "demo" if "synthetic" in version else "research")


def reviewed_context(visit: Visit, model: ModelInfo, clinic_name: str, version: int,
                     refused_pages: tuple[str, ...] = (), catalog: ModelCatalog | None = None) -> ReportContext:
    """The reviewed version's content. ``catalog``: each photo's lesions are then judged by the model that graded
    it (:func:`screening.report.with_undetected`), as on the worker's versions and the review page."""
    review = visit.current_review
    if review is None:
        raise ReviewError(f"visit {visit.exam_id} has not been signed off: there is no reviewed report to make")
    if visit.awaiting_review:
        raise ReviewError(f"visit {visit.exam_id} has a photo graded, or a photo's eye set, after its last sign-off; review it again first")
    return ReportContext(
        clinic_name=clinic_name, patient_id=visit.patient_code, exam_date=visit.exam_date,
        eyes=[f.finding if catalog is None or f.checkpoint_sha256 is None
              else with_undetected(f.finding, catalog.metrics(f.checkpoint_sha256)) for f in visit.fields],
        model_version=model.version, checkpoint_sha256=model.checkpoint_sha256,
        model_status=model.status, model_metrics=model.metrics, generated_at=datetime.now(timezone.utc).astimezone(),
        report_version=version, eye_result_rule=visit.eye_result_rule, review=review_note(review),
        ungradable_rule=visit.ungradable_rule, refused_pages=refused_pages, visit_note=visit.filing_note,
    )


def render_reviewed_report(
    factory: sessionmaker[Session],
    exam_id: int,
    *,
    catalog: ModelCatalog,
    clinic_name: str,
    templates_dir: Path,
    reports_dir: Path,
    retries: int = 3,
    rule: EyeResultRule = "worst",
    ungradable_rule: UngradableRule = "recall",
    claims: Claimer | None = None,
) -> Report:
    """Render and record the reviewed version of the visit's current sign-off. The sign-off is committed
    before this is called, so a failed render (ReportError) loses nothing: ``dr-screen review render``
    makes it later. No database transaction is held while WeasyPrint works.

    ``claims``: where workers share the database, the visit's report claim (:mod:`screening.claims`) is taken
    first, as a worker takes it for its versions, waiting up to ``CLAIM_WAIT_S`` for a worker that is making
    one; the version numbers then stay in order whoever writes them."""
    if claims is None:
        return _render_reviewed(factory, exam_id, catalog=catalog, clinic_name=clinic_name, templates_dir=templates_dir,
                                reports_dir=reports_dir, retries=retries, rule=rule, ungradable_rule=ungradable_rule)
    key = str(exam_id)
    deadline = time.monotonic() + CLAIM_WAIT_S
    while not claims.take(ClaimKind.VISIT, key):
        if time.monotonic() > deadline:
            raise ReportError(f"visit {exam_id}: a worker has been writing a version of this visit's report for over "
                              f"{CLAIM_WAIT_S:.0f} s; the sign-off is recorded and `dr-screen review render` makes the "
                              "reviewed version later")
        time.sleep(0.5)
    try:
        from screening.stages.report import remove_unrecorded_versions

        remove_unrecorded_versions(factory, reports_dir, exam_id)
        return _render_reviewed(factory, exam_id, catalog=catalog, clinic_name=clinic_name, templates_dir=templates_dir,
                                reports_dir=reports_dir, retries=retries, rule=rule, ungradable_rule=ungradable_rule,
                                claims=claims)
    finally:
        claims.release(ClaimKind.VISIT, [key])


def _render_reviewed(
    factory: sessionmaker[Session], exam_id: int, *, catalog: ModelCatalog, clinic_name: str, templates_dir: Path,
    reports_dir: Path, retries: int, rule: EyeResultRule, ungradable_rule: UngradableRule, claims: Claimer | None = None,
) -> Report:
    for _ in range(VERSION_ATTEMPTS):
        with session_scope(factory) as session:
            visit = load_visit(session, exam_id, rule, ungradable_rule)
            graded = visit.newest_graded
            model = (catalog.describe(graded.model_version, graded.checkpoint_sha256)
                     if graded is not None and graded.model_version and graded.checkpoint_sha256 else catalog.configured())
            # past every version recorded and every file on disk (a worker may have published one it has not
            # recorded yet); should the worker take this number meanwhile, the render is refused and repeated
            folder = report_folder(reports_dir, visit.patient_code, visit.exam_date)
            version = max(repo.next_report_version(session, exam_id), max(existing_versions(folder), default=0) + 1)
            ctx = reviewed_context(visit, model, clinic_name, version, refused_page_reasons(session, exam_id), catalog)
            review_id = visit.current_review.id  # type: ignore[union-attr]  # reviewed_context checked it
        try:
            with _RENDER_LOCK:
                path = render_with_retries(ctx, templates_dir, reports_dir, retries=retries)
        except ReportError as exc:
            if isinstance(exc.__cause__, ReportVersionTaken):
                continue
            with session_scope(factory) as session:
                repo.add_event(session, "report_failed", f"exam {exam_id} review {review_id}: {exc.__cause__!r}")
            raise
        with session_scope(factory) as session:
            if claims is not None:
                claims.hold(session, ClaimKind.VISIT, str(exam_id))
            exam = session.get(Exam, exam_id)
            assert exam is not None
            report = repo.add_report(session, exam, path, model.version, version=version, review_id=review_id,
                                     referral_level=printed_referral(ctx))  # the grader's referral
        log.info("reviewed report v%s for exam %s written", report.version, exam_id)
        return report
    raise ReportError(f"visit {exam_id}: another writer took {VERSION_ATTEMPTS} report versions in a row; try again")


__all__ = ["ModelCatalog", "ModelInfo", "render_reviewed_report", "reviewed_context"]

"""The worker as a line of stages, each with one job and a typed outcome.

=========  ==========================================================================  =========================
stage      job                                                                         outcome
=========  ==========================================================================  =========================
intake     a stable inbox entry -> identified, de-duplicated, decoded :class:`Job`,    :data:`IntakeOutcome`
           or a recorded refusal / duplicate / conflict, or deferred (still arriving)
grade      jobs in batches -> predictions, one forward pass per batch                  :class:`GradedBatch`
store      masks and pictures, the result row, then the original to the archive        :class:`Stored`, :class:`Failed`
report     which visits need a new report version, rendering (off the inference        :data:`ReportOutcome`
           path), recording
=========  ==========================================================================  =========================

A TIFF holding several photos goes through intake page by page (:mod:`screening.stages.pages`: each page
through the intake checks as a photo of its own, a job per page admitted, gradable or not,
:class:`AdmittedPages`) and is archived once, after its last page is stored.

:class:`screening.pipeline.Worker` runs them in order. Files leave the inbox only through
:class:`~screening.stages.filing.Filing`, and only after the database state that records them is committed.
"""

from .filing import Filing
from .grade import GradeStage
from .intake import IntakeStage
from .outcomes import (
    Admitted,
    AdmittedPages,
    Deferred,
    Duplicate,
    Failed,
    GradedBatch,
    IntakeOutcome,
    Job,
    PendingReport,
    Rejected,
    ReportFailed,
    ReportOutcome,
    ReportWritten,
    Resumed,
    Stored,
    Unreadable,
    Vanished,
)
from .report import ReportStage
from .store import StoreStage

__all__ = [
    "Admitted", "AdmittedPages", "Deferred", "Duplicate", "Failed", "Filing", "GradeStage", "GradedBatch", "IntakeOutcome", "IntakeStage", "Job",
    "PendingReport", "Rejected", "ReportFailed", "ReportOutcome", "ReportStage", "ReportWritten", "Resumed", "Stored",
    "StoreStage", "Unreadable", "Vanished",
]

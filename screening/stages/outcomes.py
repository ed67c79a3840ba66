"""What each stage hands back: small frozen records, one type per outcome, so the worker's loop reads as a
``match`` over what happened instead of a mix of return values, ``None`` and exceptions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..imaging import DecodedImage
from ..inference import ImagePrediction
from ..rejection import RejectReason

# ------------------------------------------------------------------------------------------------ intake


@dataclass(frozen=True)
class Job:
    """An image admitted: recorded as ``received`` (with its intake checks) and committed, its file still in the
    inbox. ``gradable`` False: the photo is stored as ungradable instead of graded."""

    image_id: int
    exam_id: int
    path: Path
    sha256: str
    decoded: DecodedImage
    gradable: bool = True
    file_sha256: str | None = None  # a page of a multi-page file: the file's hash (it is archived with its last page)


@dataclass(frozen=True)
class Admitted:
    job: Job


@dataclass(frozen=True)
class AdmittedPages:
    """A file holding several photos (:mod:`screening.stages.pages`): a job per page admitted by the intake checks
    (gradable or not, as a single photo's job), and the images of the pages refused now (each recorded as
    ``rejected`` with its reason). The file stays in the inbox until its last page is stored, then it is archived
    once."""

    jobs: tuple[Job, ...]
    refused: tuple[int, ...]


@dataclass(frozen=True)
class Duplicate:
    """The same content as an image already graded or being graded: recorded as a drop, archived under
    ``duplicates/`` (``filed_as`` None when the file left the inbox before it could be moved)."""

    image_id: int
    filed_as: Path | None


@dataclass(frozen=True)
class Rejected:
    """Refused (:class:`~screening.rejection.Rejection`): recorded, moved to ``rejected/`` with a reason file.
    ``image_id`` is None for an inbox entry that is not a file (a link, a folder): its drop has no image."""

    image_id: int | None
    code: RejectReason
    message: str
    filed_as: Path | None


@dataclass(frozen=True)
class Resumed:
    """A file whose database state was committed before the worker stopped, but which had not been moved yet:
    moved now, nothing recorded twice."""

    image_id: int | None
    filed_as: Path | None


@dataclass(frozen=True)
class Vanished:
    """The file was gone before intake could read it."""

    path: Path


@dataclass(frozen=True)
class Deferred:
    """Nothing recorded yet: the file may still be arriving (it changed while it was read, or its image data
    stops short and it changed recently). It stays in the inbox and is read again later."""

    path: Path
    code: RejectReason
    message: str


@dataclass(frozen=True)
class Unreadable:
    """The file could not be read (no permission to, an I/O error): nothing of it is known, so nothing is recorded
    of it but an incident (once per file and cause). It stays in the inbox and is read again later: fixing its
    permissions is enough."""

    path: Path
    message: str


IntakeOutcome = Admitted | AdmittedPages | Deferred | Duplicate | Rejected | Resumed | Unreadable | Vanished

# ------------------------------------------------------------------------------------------------- grade


@dataclass(frozen=True)
class GradedBatch:
    """One batch through the model: a prediction per job, or the error that failed the whole batch."""

    jobs: list[Job]
    predictions: list[ImagePrediction]  # empty when ``error`` is set
    error: Exception | None
    per_image_ms: float  # preparation + forward + finishing, per image of the batch

# ------------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Stored:
    """The result is committed (state ``done``); ``archived_as`` is where the original went (None when it
    could not be moved now: it stays in the inbox and the next intake of it finishes the move)."""

    image_id: int
    exam_id: int
    archived_as: Path | None
    awaits_pages: bool = False  # a page whose file holds pages not stored yet: the file is archived with the last


@dataclass(frozen=True)
class Failed:
    """Grading or storing failed: state ``failed`` with ``error``; the file stays in the inbox for a retry."""

    image_id: int
    error: str

# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class PendingReport:
    """A report handed to the renderer: what it covers, so that its completion is recorded exactly."""

    exam_id: int
    version: int
    image_ids: tuple[int, ...]  # the exam's images that were 'done' when the report's content was read
    snapshot_at: datetime  # when its content was read: results stored later are not in it
    referral_level: str | None = None  # the recommendation its PDF prints (screening.report.printed_referral)


@dataclass(frozen=True)
class ReportWritten:
    exam_id: int
    version: int
    path: Path


@dataclass(frozen=True)
class ReportFailed:
    """Rendering failed; the results stay stored and the catch-up renders the exam again later."""

    exam_id: int
    version: int
    error: str


ReportOutcome = ReportWritten | ReportFailed

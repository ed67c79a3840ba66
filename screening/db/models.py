"""SQLAlchemy 2.0 typed models for the screening records.

Every timestamp is stored as UTC (naive UTC in the database, timezone-aware UTC in Python); a naive
``datetime`` handed to a timestamp column is refused rather than guessed at. ``source_name`` is the
clinic's file name kept as text for display and audit only; it is never joined onto a path.

The schema is owned by the Alembic revisions in ``screening/db/migrations/versions``: a change here
needs a new revision there (``tests/screening/db/test_migrations.py`` fails when the two disagree).
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from training.common import LESION_CODES, LESION_KEYS

# Stable constraint names so that Alembic batch migrations on SQLite can find and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class ImageState(StrEnum):
    RECEIVED = "received"  # hashed and recorded, waiting for (or in) inference
    DONE = "done"  # a Result exists, or the photo was judged ungradable (gradable = False, no Result); not yet reported
    REPORTED = "reported"  # included in a rendered report
    REJECTED = "rejected"  # not gradable input (bad name, not an image, ...); see Image.error
    FAILED = "failed"  # processing raised; see Image.error


class DropOutcome(StrEnum):
    NEW = "new"  # first arrival of this content: an Image was created
    DUPLICATE = "duplicate"  # same SHA-256 as an existing Image: nothing re-processed
    REJECTED = "rejected"  # refused on arrival; see Drop.reason


class Eye(StrEnum):
    LEFT = "L"
    RIGHT = "R"


class EyeSource(StrEnum):
    NAME = "name"  # the file name
    SIDECAR = "sidecar"  # the sidecar JSON
    DICOM = "dicom"  # a DICOM laterality tag (an Identity whose eye_from starts with "DICOM")
    IMAGE = "image"  # read from the photo (no eye stated; confident prediction)


class ReviewOutcome(StrEnum):
    CONFIRMED = "confirmed"  # the grader's answers equal the model's
    CORRECTED = "corrected"  # at least one grade, gradability or the referral differs from the model's


class ReviewSource(StrEnum):
    CLI = "cli"  # dr-screen review confirm/correct
    WEB = "web"  # the review page (dr-screen serve)
    IMPORT = "import"  # a grading centre's CSV (dr-screen review import)


# The lesion vocabulary's lower-case codes name the area columns: area_ma, area_he, area_ex, area_se, area_od.
LESION_COLUMNS: dict[str, str] = {code: f"area_{key}" for code, key in zip(LESION_CODES, LESION_KEYS)}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC ``datetime`` in Python, naive UTC in the database (portable across SQLite/PostgreSQL)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _in(column: str, values: Any) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), str: String(), dict[str, Any]: JSON(), list[float]: JSON(),
                           list[str]: JSON(), dict[str, float]: JSON()}


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    exams: Mapped[list[Exam]] = relationship(back_populates="patient", order_by="Exam.exam_date")

    def __repr__(self) -> str:
        return f"Patient(id={self.id!r}, code={self.code!r})"


class Exam(Base):
    """One visit: a patient's photos taken on one date (the unit a PDF report covers)."""

    __tablename__ = "exams"
    __table_args__ = (UniqueConstraint("patient_id", "exam_date"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    exam_date: Mapped[date]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="exams")
    images: Mapped[list[Image]] = relationship(back_populates="exam", order_by="Image.id")
    reports: Mapped[list[Report]] = relationship(back_populates="exam", order_by="Report.version")

    def __repr__(self) -> str:
        return f"Exam(id={self.id!r}, patient_id={self.patient_id!r}, exam_date={self.exam_date!r})"


class Image(Base):
    """One distinct file content (by SHA-256), however many times it was dropped; or one page of a file holding
    several photos (a multi-page TIFF: ``page`` and ``file_sha256`` set)."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(_in("state", ImageState), name="state"),
        CheckConstraint("eye IS NULL OR " + _in("eye", Eye), name="eye"),
        Index("ix_images_state", "state"),
        Index("ix_images_exam_id", "exam_id"),
        Index("ix_images_received_at", "received_at"),
        Index("ix_images_file_sha256", "file_sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int | None] = mapped_column(ForeignKey("exams.id", ondelete="RESTRICT"))
    eye: Mapped[str | None] = mapped_column(String(1))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source_name: Mapped[str] = mapped_column(Text)
    stored_path: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=ImageState.RECEIVED.value)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(32))  # added in revision 0006: why, as a stable code
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    width: Mapped[int | None]  # added in revision 0002
    height: Mapped[int | None]  # added in revision 0002
    # the camera: DICOM Manufacturer (0008,0070) and Manufacturer's Model Name (0008,1090); revision 0007
    device: Mapped[str | None] = mapped_column(String(128))
    # Intake checks (revision 0005; NULL for images recorded before it, and for refused files). Values are checked
    # by the repository (an added CHECK constraint would need a table rebuild that SQLite's foreign keys forbid).
    gradable: Mapped[bool | None]  # the learned gradability verdict; False: no Result, the report says recapture
    quality_reasons: Mapped[list[str] | None]  # reason codes (training.quality.REASONS) when ungradable, [] when gradable
    quality_scores: Mapped[dict[str, float] | None]  # each reason's probability
    eye_source: Mapped[str | None] = mapped_column(String(8))  # where ``eye`` came from (EyeSource)
    predicted_eye: Mapped[str | None] = mapped_column(String(1))  # the eye the photo shows (L/R)
    eye_confidence: Mapped[float | None] = mapped_column(Float)  # P(predicted_eye)
    eye_mismatch: Mapped[bool | None]  # the photo confidently shows the other eye than the stated one
    eye_note: Mapped[str | None] = mapped_column(Text)  # what the report says about the eye check, if anything
    # Where and when the store stage published the photo (revision 0005): an ungradable image has no Result, so its
    # display photo's folder and the time it joined its visit (what a review compares with its sign-off) are here.
    photo_dir: Mapped[str | None] = mapped_column(Text)
    stored_at: Mapped[datetime | None]
    # a page of a multi-page file (revision 0009_pages): its number in the file (1 = the first directory,
    # thumbnails counted) and the SHA-256 of the whole file (``sha256`` then names the page); NULL otherwise
    page: Mapped[int | None]
    file_sha256: Mapped[str | None] = mapped_column(String(64))

    exam: Mapped[Exam | None] = relationship(back_populates="images")
    result: Mapped[Result | None] = relationship(back_populates="image", uselist=False)
    drops: Mapped[list[Drop]] = relationship(back_populates="image", order_by="Drop.id")

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, sha256={self.sha256[:12]!r}, eye={self.eye!r}, state={self.state!r})"


class Drop(Base):
    """Every arrival of a file in the inbox, including duplicates and rejects."""

    __tablename__ = "drops"
    __table_args__ = (
        CheckConstraint(_in("outcome", DropOutcome), name="outcome"),
        Index("ix_drops_sha256", "sha256"),
        Index("ix_drops_received_at", "received_at"),
        Index("ix_drops_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"))
    sha256: Mapped[str] = mapped_column(String(64))
    source_name: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)  # added in revision 0002
    reason_code: Mapped[str | None] = mapped_column(String(32))  # added in revision 0006: why, as a stable code

    image: Mapped[Image | None] = relationship(back_populates="drops")

    def __repr__(self) -> str:
        return f"Drop(id={self.id!r}, sha256={self.sha256[:12]!r}, outcome={self.outcome!r})"


class Result(Base):
    """The model's output for one image (at most one per image)."""

    __tablename__ = "results"
    __table_args__ = (
        CheckConstraint("dr_grade BETWEEN 0 AND 4", name="dr_grade"),
        CheckConstraint("dme_grade BETWEEN 0 AND 2", name="dme_grade"),
        *(
            CheckConstraint(f"area_{k} >= 0 AND area_{k} <= 1", name=f"area_{k}")
            for k in LESION_KEYS
        ),
        Index("ix_results_model_version", "model_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"), unique=True)
    model_version: Mapped[str] = mapped_column(String(128))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    dr_grade: Mapped[int]
    dr_probs: Mapped[list[float]]
    dme_grade: Mapped[int]
    dme_probs: Mapped[list[float]]
    referable_score: Mapped[float] = mapped_column(Float)
    referable: Mapped[bool]
    area_ma: Mapped[float] = mapped_column(Float, default=0.0)
    area_he: Mapped[float] = mapped_column(Float, default=0.0)
    area_ex: Mapped[float] = mapped_column(Float, default=0.0)
    area_se: Mapped[float] = mapped_column(Float, default=0.0)
    area_od: Mapped[float] = mapped_column(Float, default=0.0)
    mask_dir: Mapped[str | None] = mapped_column(Text)
    overlay_path: Mapped[str | None] = mapped_column(Text)
    dr_cam_path: Mapped[str | None] = mapped_column(Text)
    dme_cam_path: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(32))
    inference_ms: Mapped[float | None] = mapped_column(Float)  # added in revision 0002
    # lesion code -> lossless TIFF mask at the original photo's width and height; revision 0007
    original_masks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="result")

    @property
    def areas(self) -> dict[str, float]:
        """Lesion areas keyed by lower-case code (``ma`` ... ``od``), as the columns are named."""
        return {k: getattr(self, f"area_{k}") for k in LESION_KEYS}

    @property
    def lesion_areas(self) -> dict[str, float]:
        """Lesion areas keyed by lesion code (``MA`` ... ``OD``), as the model and the report name them."""
        return {code: getattr(self, column) for code, column in LESION_COLUMNS.items()}

    def __repr__(self) -> str:
        return (
            f"Result(id={self.id!r}, image_id={self.image_id!r}, model_version={self.model_version!r}, "
            f"dr_grade={self.dr_grade!r}, dme_grade={self.dme_grade!r}, referable={self.referable!r})"
        )


class Report(Base):
    """A rendered PDF for one exam; re-rendering (e.g. the second eye arrived) adds a new version."""

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("exam_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id", ondelete="RESTRICT"))
    version: Mapped[int]
    path: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the sign-off this version shows (revision 0003); empty for the model's draft versions
    review_id: Mapped[int | None] = mapped_column(ForeignKey("reviews.id", ondelete="RESTRICT"))

    exam: Mapped[Exam] = relationship(back_populates="reports")

    def __repr__(self) -> str:
        return f"Report(id={self.id!r}, exam_id={self.exam_id!r}, version={self.version!r})"


class Event(Base):
    """Append-only log of what happened (state changes, results, reports, errors)."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_image_id", "image_id"),
        Index("ix_events_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"))
    drop_id: Mapped[int | None] = mapped_column(ForeignKey("drops.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    code: Mapped[str | None] = mapped_column(String(32))  # added in revision 0006: a reason or incident code
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, kind={self.kind!r}, image_id={self.image_id!r})"


class DatabaseIdentity(Base):
    """One row, written once when the database is made (or migrated to revision 0010_db_identity): a random id
    that names this database, whatever holds it (a SQLite file, a PostgreSQL database). A worker notes it when
    it starts and checks it at the start of every unit of work (:func:`screening.db.session.guard_identity`), so
    a database replaced or re-created under it stops it instead of recording into the wrong database."""

    __tablename__ = "database_identity"

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(32))  # secrets.token_hex(16)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"DatabaseIdentity(token={self.token!r})"


class ReviewUser(Base):
    """Someone who may log in to the review page (``dr-screen user add``). Not a clinical record: the name
    a review was signed with is copied into ``reviews.reviewer``, so renaming or disabling a user never
    changes a past sign-off."""

    __tablename__ = "review_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(Text)  # printed on reviewed reports: "reviewed by <display_name>"
    password_hash: Mapped[str] = mapped_column(Text)  # werkzeug scrypt hash with its own salt and parameters
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"ReviewUser(id={self.id!r}, username={self.username!r}, active={self.active!r})"


class Review(Base):
    """One sign-off of a visit by a clinician: append-only (a later sign-off adds a row; the visit's current
    review is its row with the highest id). Stored beside the model's results, which it never changes."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint(_in("outcome", ReviewOutcome), name="outcome"),
        CheckConstraint(_in("source", ReviewSource), name="source"),
        Index("ix_reviews_exam_id", "exam_id"),
        Index("ix_reviews_reviewed_at", "reviewed_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id", ondelete="RESTRICT"))
    reviewer: Mapped[str] = mapped_column(Text)  # the name as signed (and printed on the reviewed report)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("review_users.id", ondelete="RESTRICT"))
    source: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    referral: Mapped[str] = mapped_column(String(16))  # the grader's referral outcome (screening.report.REFERRAL_LEVELS)
    model_referral: Mapped[str] = mapped_column(String(16))  # the model's, as shown to the grader
    comment: Mapped[str | None] = mapped_column(Text)
    reviewed_at: Mapped[datetime] = mapped_column(default=utcnow)  # when the grader graded (imports: their date)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)  # when this row was recorded

    exam: Mapped[Exam] = relationship()
    eyes: Mapped[list[ReviewEye]] = relationship(back_populates="review", order_by="ReviewEye.eye.desc()")

    def __repr__(self) -> str:
        return f"Review(id={self.id!r}, exam_id={self.exam_id!r}, outcome={self.outcome!r}, referral={self.referral!r})"


class ReviewEye(Base):
    """The grader's answer for one eye of a review: gradable or not, and if gradable its DR grade and DME risk.
    ``image_id`` names the photo (and so the model result) that was reviewed."""

    __tablename__ = "review_eyes"
    __table_args__ = (
        UniqueConstraint("review_id", "eye"),
        CheckConstraint(_in("eye", Eye), name="eye"),
        CheckConstraint("dr_grade IS NULL OR dr_grade BETWEEN 0 AND 4", name="dr_grade"),
        CheckConstraint("dme_grade IS NULL OR dme_grade BETWEEN 0 AND 2", name="dme_grade"),
        CheckConstraint(
            "(gradable = 1 AND dr_grade IS NOT NULL AND dme_grade IS NOT NULL) OR "
            "(gradable = 0 AND dr_grade IS NULL AND dme_grade IS NULL)",
            name="grades_iff_gradable",
        ),
        Index("ix_review_eyes_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id", ondelete="RESTRICT"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"))
    eye: Mapped[str] = mapped_column(String(1))
    gradable: Mapped[bool]
    dr_grade: Mapped[int | None]
    dme_grade: Mapped[int | None]

    review: Mapped[Review] = relationship(back_populates="eyes")
    image: Mapped[Image] = relationship()

    def __repr__(self) -> str:
        return (f"ReviewEye(review_id={self.review_id!r}, eye={self.eye!r}, gradable={self.gradable!r}, "
                f"dr_grade={self.dr_grade!r}, dme_grade={self.dme_grade!r})")


# Sign-offs are never edited or removed, not even by a stray UPDATE in an SQL client: SQLite triggers refuse
# it (revision 0003 creates the same triggers). A correction is a new review.
APPEND_ONLY_TABLES = ("reviews", "review_eyes")


def append_only_triggers(table: str) -> list[str]:
    return [
        f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: record a new review instead'); END"
        for verb in ("UPDATE", "DELETE")
    ]


for _table in APPEND_ONLY_TABLES:
    for _sql in append_only_triggers(_table):
        event.listen(Base.metadata.tables[_table], "after_create",
                     DDL(_sql).execute_if(dialect="sqlite"))  # type: ignore[no-untyped-call]  # SQLAlchemy's DDL is untyped


__all__ = [
    "APPEND_ONLY_TABLES",
    "LESION_COLUMNS",
    "Base",
    "DatabaseIdentity",
    "Drop",
    "DropOutcome",
    "Event",
    "Exam",
    "Eye",
    "EyeSource",
    "Image",
    "ImageState",
    "Patient",
    "Report",
    "Result",
    "Review",
    "ReviewEye",
    "ReviewOutcome",
    "ReviewSource",
    "ReviewUser",
    "UTCDateTime",
    "append_only_triggers",
    "utcnow",
]

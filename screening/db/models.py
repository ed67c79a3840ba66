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
    text,
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
    STAFF = "staff"  # set by a person who checked the label (`dr-screen review eye`; images.refiled_at)


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
    __table_args__ = (
        UniqueConstraint("patient_id", "exam_date"),
        Index("ix_exams_screened_standing", "screened_at", "standing_version", "standing_level", "standing_by_grader"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    exam_date: Mapped[date]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Kept by screening.db.tallies for the audit's visits by standing recommendation (revision
    # 0016_report_referral_level), so a year of visits is one index range, not a walk of a million photos:
    # the arrival of its first photo graded or stored ungradable (NULL: none yet), and its latest report version's
    # number, printed recommendation (reports.referral_level) and whether a grader's sign-off set it.
    screened_at: Mapped[datetime | None]
    standing_version: Mapped[int | None]
    standing_level: Mapped[str | None] = mapped_column(String(16))
    standing_by_grader: Mapped[bool | None]
    # when a person moved a photo of this visit to another (`dr-screen review move`, revision 0018_staff_refiling):
    # a report made before it shows a photo that is not this patient's; ``filing_note``: what its reports say
    refiled_at: Mapped[datetime | None]
    filing_note: Mapped[str | None] = mapped_column(Text)

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
        Index("ix_images_exam_id", "exam_id"),
        Index("ix_images_received_at", "received_at"),
        # work to resume, and the audit's rejected and failed files by date (revision 0003_audit_columns_indexes;
        # was on state alone)
        Index("ix_images_state_received_at", "state", "received_at"),
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
    # when a person set or confirmed ``eye`` (eye_source 'staff'), or moved the photo to another visit, after
    # checking its label (revision 0018_staff_refiling): the visit then needs a new report version, and a sign-off
    # from before it no longer covers the photo; ``filing_note``: what its report section says about a move
    refiled_at: Mapped[datetime | None]
    filing_note: Mapped[str | None] = mapped_column(Text)
    # the models that made those checks, {"gradability": "<format> <sha256 prefix>", "laterality": ...} (revision
    # 0015_check_models; NULL before it)
    check_models: Mapped[dict[str, str] | None] = mapped_column(JSON)
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
        # the audit's duplicates and rejects (revision 0003_audit_columns_indexes)
        Index("ix_drops_outcome_received_at", "outcome", "received_at", "image_id"),
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
        # The audit counted from this table alone, each count a walk along one of these indexes (revision
        # 0003_audit_columns_indexes): grades and referrals per model; distinct exams, pooled and per model;
        # turnaround percentiles per model and pooled; per site (revision 0008_claims_sites, audit --by-site).
        # Since revision 0011_audit_tallies grades and exams come from the day tallies; the exam index still finds
        # the results of visits spread over two days, and the grade indexes serve direct queries (SCHEMA.md).
        Index("ix_results_audit_grades", "model_version", "dr_grade", "dme_grade", "referable", "received_at", "turnaround_s"),
        Index("ix_results_audit_exams", "exam_id", "referable", "received_at"),
        Index("ix_results_audit_model_exams", "model_version", "exam_id", "referable", "received_at"),
        Index("ix_results_audit_turnaround", "model_version", "turnaround_s", "received_at"),
        Index("ix_results_turnaround", "turnaround_s", "received_at"),
        Index("ix_results_image_model", "image_id", "model_version"),  # duplicates per model, from the index alone
        Index("ix_results_audit_site", "site", "turnaround_s", "referable", "received_at"),
        # the images awaiting a report per model: only those rows, a few per cent (revision 0011_audit_tallies)
        Index("ix_results_awaiting", "model_version", "received_at", sqlite_where=text("turnaround_s IS NULL"),
              postgresql_where=text("turnaround_s IS NULL")),
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
    # Revision 0003_audit_columns_indexes, for an audit over millions of rows without a join: the image's exam and
    # arrival time, copied when the result is stored (neither changes afterwards; the image stays their owner), and the
    # turnaround, kept by repository.add_result/add_report.
    exam_id: Mapped[int | None] = mapped_column(ForeignKey("exams.id", ondelete="RESTRICT"))
    received_at: Mapped[datetime]
    # Seconds from received_at to the first report of the exam created at or after this result; NULL while
    # there is none (awaiting report).
    turnaround_s: Mapped[float | None] = mapped_column(Float)
    # The site of the worker that graded it ([screening] site; revision 0008_claims_sites): with several workers
    # writing one database, the audit can count per site. NULL for results stored before that revision.
    site: Mapped[str | None] = mapped_column(String(64))

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
    # the sign-off this version shows (revision 0014_reviews); empty for the model's draft versions
    review_id: Mapped[int | None] = mapped_column(ForeignKey("reviews.id", ondelete="RESTRICT"))
    # the recommendation this version's PDF led with, a key of screening.report.REFERRAL_LEVELS: the model's on a
    # draft, the grader's on a reviewed version (revision 0016_report_referral_level; NULL for reports rendered
    # before it: not guessed). Checked by the repository, as images.gradable is.
    referral_level: Mapped[str | None] = mapped_column(String(16))

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
    # the user's last logout (revision 0017_logout_ends_sessions): a session that logged in before it is refused, so
    # a copied cookie stops working at logout; NULL: never logged out
    sessions_ended_at: Mapped[datetime | None]

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
            # boolean expressions, not "gradable = 1": PostgreSQL has no boolean = integer (same meaning on SQLite)
            "(gradable AND dr_grade IS NOT NULL AND dme_grade IS NOT NULL) OR "
            "(NOT gradable AND dr_grade IS NULL AND dme_grade IS NULL)",
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


class ClaimKind(StrEnum):
    FILE = "file"  # an inbox file, by name: held from intake until the file has left the inbox (or is put off)
    VISIT = "visit"  # an exam's next report version, by exam id: held from choosing the version until it is recorded


class Claim(Base):
    """Work one worker (or one review render) holds so that no other takes it at the same time (revision
    0008_claims_sites). A claim is a row per (kind, key), taken with one INSERT ... ON CONFLICT statement that
    succeeds only when the key is free, already this holder's, or its lease has run out (``expires_at``); the
    holder renews the lease while it works (:mod:`screening.claims`) and deletes the row when done. A holder
    killed with ``kill -9`` renews nothing: its claims are taken over once their lease has passed. Every write
    that acts on claimed work first renews the claim in the same transaction (``claims.hold``), so a holder
    whose lease was taken over commits nothing for it."""

    __tablename__ = "claims"
    __table_args__ = (
        UniqueConstraint("kind", "key"),
        CheckConstraint(_in("kind", ClaimKind), name="kind"),
        Index("ix_claims_holder", "holder"),
        Index("ix_claims_expires_at", "expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    key: Mapped[str] = mapped_column(String(255))  # the file's name in the inbox, or the exam id
    holder: Mapped[str] = mapped_column(String(160))  # "<site>/<host>/<pid>/<random>": unique per worker run
    site: Mapped[str] = mapped_column(String(64))
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"Claim(kind={self.kind!r}, key={self.key!r}, holder={self.holder!r}, expires_at={self.expires_at!r})"


class AuditTally(Base):
    """A running count the audit reads instead of walking a million rows (revision 0011_audit_tallies, issue 15).

    One row per UTC day of arrival and ``metric`` (see :mod:`screening.db.tallies`, the only writer): graded
    images per model and grade (``key`` ``"dr|dme|referable"``), exams and referable exams per model, drops by
    outcome, and per device the photos assessed, ungradable (``detail``: each reason), with a laterality mismatch
    or an eye not confirmed. The repository adds to them in the same transaction as the rows they count, so they
    are exactly what a scan of those rows would give; empty strings stand for "none" (a unique key treats NULLs
    as distinct)."""

    __tablename__ = "audit_tallies"
    __table_args__ = (UniqueConstraint("day", "metric", "model_version", "key", "detail"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[date]
    metric: Mapped[str] = mapped_column(String(24))
    model_version: Mapped[str] = mapped_column(String(128), default="")
    key: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(String(128), default="")
    n: Mapped[int] = mapped_column(default=0)

    def __repr__(self) -> str:
        return (f"AuditTally(day={self.day!r}, metric={self.metric!r}, model_version={self.model_version!r}, "
                f"key={self.key!r}, detail={self.detail!r}, n={self.n!r})")


class ExamTally(Base):
    """Where each exam is counted in the daily exam tallies, per model version (``""``: all models pooled).

    An exam whose graded photos all arrived on one UTC day is counted in that day's tally (``day``, with
    ``referable`` once any of its eyes is). When a photo of it arrives on another day it becomes ``multi_day``:
    its count leaves the tallies and the audit counts such exams from their results, which is exact for any
    date range and cheap because they are few (revision 0011_audit_tallies); its ``day`` and ``referable`` are
    then no longer used."""

    __tablename__ = "exam_tallies"
    __table_args__ = (Index("ix_exam_tallies_multi_day", "model_version", "multi_day", "exam_id"),)

    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id", ondelete="RESTRICT"), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date]
    referable: Mapped[bool] = mapped_column(default=False)
    multi_day: Mapped[bool] = mapped_column(default=False)

    def __repr__(self) -> str:
        return (f"ExamTally(exam_id={self.exam_id!r}, model_version={self.model_version!r}, day={self.day!r}, "
                f"referable={self.referable!r}, multi_day={self.multi_day!r})")


# Sign-offs are never edited or removed, not even by a stray UPDATE in an SQL client: the database refuses it
# (revision 0014_reviews creates the same triggers). A correction is a new review. SQLite: a trigger per verb
# that raises. PostgreSQL: the same trigger names, calling one PL/pgSQL function that raises with SQLSTATE 23001
# (restrict_violation, an IntegrityError as SQLite's RAISE(ABORT) is); the DELETE trigger is per statement and
# also fires on TRUNCATE, which skips row triggers.
APPEND_ONLY_TABLES = ("reviews", "review_eyes")
APPEND_ONLY_FUNCTION = "refuse_review_change"


def append_only_triggers(table: str, dialect: str = "sqlite") -> list[str]:
    """The DDL that makes ``table`` append-only on ``dialect`` ('sqlite' or 'postgresql'); on PostgreSQL it
    expects :func:`append_only_function_ddl` to have run."""
    message = f"{table} is append-only: record a new review instead"
    if dialect == "postgresql":
        return [
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()",
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE OR TRUNCATE ON {table} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()",
        ]
    return [
        f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
        for verb in ("UPDATE", "DELETE")
    ]


def append_only_function_ddl() -> str:
    """PostgreSQL: the function the append-only triggers call (created or replaced; the same for every table)."""
    return (
        f"CREATE OR REPLACE FUNCTION {APPEND_ONLY_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only: record a new review instead', "
        "ERRCODE = 'restrict_violation'; END $$"
    )


for _table in APPEND_ONLY_TABLES:
    _ddl = [(_sql, "sqlite") for _sql in append_only_triggers(_table)]
    _ddl += [(append_only_function_ddl(), "postgresql")]
    _ddl += [(_sql, "postgresql") for _sql in append_only_triggers(_table, "postgresql")]
    for _sql, _dialect in _ddl:
        event.listen(Base.metadata.tables[_table], "after_create",
                     DDL(_sql).execute_if(dialect=_dialect))  # type: ignore[no-untyped-call]  # SQLAlchemy's DDL is untyped


__all__ = [
    "APPEND_ONLY_TABLES",
    "AuditTally",
    "LESION_COLUMNS",
    "Base",
    "Claim",
    "ClaimKind",
    "DatabaseIdentity",
    "Drop",
    "DropOutcome",
    "Event",
    "Exam",
    "ExamTally",
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
    "APPEND_ONLY_FUNCTION",
    "append_only_function_ddl",
    "append_only_triggers",
    "utcnow",
]

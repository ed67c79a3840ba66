"""Review fixtures: visits seeded straight into the database (fast, hand-checkable numbers). The real worker
run (``worked``) is in the parent conftest, shared with the review page's tests."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from sqlalchemy.orm import Session

from screening.db import repository as repo
from screening.db.models import Exam

T0 = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc)
_n = iter(range(1, 100_000))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def seed_visit(
    s: Session, code: str, eyes: dict[str, tuple[int, int, bool]], *, day: date = date(2025, 3, 3),
    model_version: str = "v1", received: datetime = T0, report_at: datetime | None = None,
) -> Exam:
    """A visit whose eyes have results (``eye -> (dr, dme, referable)``), and a draft report when ``report_at``."""
    exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, code), day)
    for eye, (dr, dme, referable) in eyes.items():
        sha = f"{next(_n):064x}"
        img = repo.add_image(s, sha256=sha, source_name=f"{code}_{eye}.jpg", exam=exam, eye=eye, received_at=received)
        dr_probs = [0.05] * 5
        dr_probs[dr] = 0.8
        dme_probs = [0.1] * 3
        dme_probs[dme] = 0.8
        repo.add_result(s, img, model_version=model_version, checkpoint_sha256="c" * 64, dr_grade=dr, dr_probs=dr_probs,
                        dme_grade=dme, dme_probs=dme_probs, referable_score=0.9 if referable else 0.1, referable=referable,
                        created_at=received + timedelta(seconds=30))
        repo.set_state(s, img, "done")
    if report_at is not None:
        repo.add_report(s, exam, f"reports/{code}/v1.pdf", model_version, created_at=report_at)
    return exam


def seed_ungradable(s: Session, exam: Exam, eye: str, *, stored: datetime = T0, reasons: tuple[str, ...] = ("blurred",)) -> int:
    """A photo of ``eye`` the worker's intake checks found ungradable: stored without a result."""
    sha = f"{next(_n):064x}"
    img = repo.add_image(s, sha256=sha, source_name=f"{exam.patient.code}_{eye}_dark.jpg", exam=exam, eye=eye,
                         received_at=stored - timedelta(seconds=30))
    repo.record_checks(s, img, gradable=False, reasons=list(reasons), scores=dict.fromkeys(reasons, 0.9),
                       eye_source="name", predicted_eye=eye, eye_confidence=0.6, eye_mismatch=False)
    img.stored_at = stored
    repo.set_state(s, img, "done")
    s.flush()
    return img.id

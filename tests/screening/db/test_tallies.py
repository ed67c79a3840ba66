"""The audit's day tallies (screening.db.tallies) against a count of the rows themselves, on SQLite and PostgreSQL:
kept by the repository as rows are written, rebuilt from the rows, filled by revision 0011_audit_tallies, and
exact for two workers grading the two eyes of one visit at once."""

from __future__ import annotations

import random
import threading
from collections import Counter
from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from screening.audit import audit_summary
from screening.db import init_db, make_engine, make_session_factory, session_scope, tallies
from screening.db import repository as repo
from screening.db.models import AuditTally, Drop, Event, ExamTally, Image, Result

DAYS = [date(2025, 6, 1) + timedelta(days=k) for k in range(4)]


def _at(day: date, rng: random.Random) -> datetime:
    """A moment of ``day`` (UTC), near either midnight now and then: the day boundaries must hold."""
    seconds = rng.choice([0, 1, 86_399, rng.randrange(86_400)])
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(seconds=seconds)


def _result(s, img, model: str, rng: random.Random, created: datetime) -> None:
    dr = rng.randrange(5)
    repo.add_result(s, img, model_version=model, checkpoint_sha256="c" * 64, dr_grade=dr, dr_probs=[0.2] * 5,
                    dme_grade=rng.randrange(3), dme_probs=[1 / 3] * 3, referable_score=0.5, referable=dr >= 2,
                    created_at=created)


def _checks(s, img, rng: random.Random) -> None:
    gradable = rng.random() < 0.7
    reasons = [] if gradable else rng.sample(["too_dark", "blurred", "over_exposed"], rng.randint(1, 2))
    mismatch = rng.random() < 0.15
    repo.record_checks(s, img, gradable=gradable, reasons=reasons, scores={"q": 0.5}, eye_source="name",
                       predicted_eye="R", eye_confidence=0.9, eye_mismatch=mismatch,
                       eye_confirmed=None if mismatch else rng.random() < 0.8)


def _programme(factory, seed: int) -> None:
    """Four days of a programme written through the repository: visits whose eyes arrive on one day or on two,
    graded by one model or re-graded by a second, verdicts stored twice (checks re-run) and devices changed,
    duplicate and rejected drops."""
    rng = random.Random(seed)
    n = 0
    with session_scope(factory) as s:
        for v in range(40):
            patient = repo.get_or_create_patient(s, f"P{v}")
            exam = repo.get_or_create_exam(s, patient, DAYS[0])
            first = rng.choice(DAYS)
            for eye in "RL":
                day = first if rng.random() < 0.75 else rng.choice(DAYS)  # about one visit in five spans two days
                n += 1
                received = _at(day, rng)
                img = repo.add_image(s, sha256=f"{n:064x}", source_name=f"P{v}_{eye}.jpg", exam=exam, eye=eye,
                                     received_at=received, device=rng.choice([None, "unknown", "cam-a", "cam-b"]))
                repo.record_drop(s, sha256=img.sha256, source_name=img.source_name, outcome="new", image=img,
                                 received_at=received)
                _checks(s, img, rng)
                if rng.random() < 0.2:
                    _checks(s, img, rng)  # checked again after a crash: replaces, never adds
                if rng.random() < 0.1:
                    repo.set_device(s, img, "cam-c")
                if img.gradable:
                    model = "v1" if rng.random() < 0.6 else "v2"
                    _result(s, img, model, rng, received + timedelta(seconds=30))
                if rng.random() < 0.1:
                    repo.record_drop(s, sha256=img.sha256, source_name="again.jpg", outcome="duplicate", image=img,
                                     received_at=_at(rng.choice(DAYS), rng))
            if rng.random() < 0.3:
                repo.add_report(s, exam, f"r{v}.pdf", "v1", created_at=_at(DAYS[-1], rng) + timedelta(days=1))
        for k in range(6):
            repo.record_drop(s, sha256=f"{k:064x}"[::-1], source_name="junk.txt", outcome="rejected",
                             reason="not an image", received_at=_at(rng.choice(DAYS), rng))


def _scan(s, start: date | None, end: date | None, model: str | None) -> dict:
    """The audit's counts, straight from the rows (what the audit computed before the tallies)."""
    def inside(when: datetime) -> bool:
        return (start is None or when.date() >= start) and (end is None or when.date() <= end)

    results = [r for r in s.scalars(select(Result)) if inside(r.received_at) and (model is None or r.model_version == model)]
    per_model: dict[str, Counter] = {}
    for r in results:
        c = per_model.setdefault(r.model_version, Counter())
        c["images"] += 1
        c[f"dr{r.dr_grade}"] += 1
        c[f"dme{r.dme_grade}"] += 1
        c["referable"] += r.referable
        c["awaiting"] += r.turnaround_s is None
    exams = {m: (len({r.exam_id for r in results if r.model_version == m}),
                 len({r.exam_id for r in results if r.model_version == m and r.referable})) for m in per_model}
    pooled = (len({r.exam_id for r in results}), len({r.exam_id for r in results if r.referable}))
    drops = Counter(d.outcome for d in s.scalars(select(Drop)) if inside(d.received_at))
    unconfirmed = {e.image_id for e in s.scalars(select(Event).where(Event.kind == "eye_not_confirmed"))}
    days: dict[tuple[str, str], Counter] = {}
    for img in s.scalars(select(Image).where(Image.gradable.is_not(None))):
        if not inside(img.received_at):
            continue
        c = days.setdefault((img.received_at.date().isoformat(), img.device or "unknown"), Counter())
        c["assessed"] += 1
        c["ungradable"] += not img.gradable
        c["mismatch"] += bool(img.eye_mismatch)
        c["unconfirmed"] += img.id in unconfirmed
        for reason in ([] if img.gradable else img.quality_reasons):
            c[f"reason {reason}"] += 1
    return {"per_model": per_model, "exams": exams, "pooled": pooled, "drops": drops, "days": days}


def _from_audit(summary) -> dict:
    per_model = {}
    for mv, st in summary.by_model.items():
        if not st.images:
            continue
        c = Counter({"images": st.images, "referable": st.referable, "awaiting": st.awaiting_report,
                     **{f"dr{g}": n for g, n in st.dr_grades.items()}, **{f"dme{g}": n for g, n in st.dme_grades.items()}})
        per_model[mv] = +c
    days = {(d.day, d.device): +Counter({"assessed": d.assessed, "ungradable": d.ungradable, "mismatch": d.eye_mismatches,
                                        "unconfirmed": d.eyes_not_confirmed,
                                        **{f"reason {r}": n for r, n in d.reasons.items()}})
            for d in summary.ungradable_by_day}
    return {"per_model": per_model,
            "exams": {mv: (st.exams, st.referable_exams) for mv, st in summary.by_model.items() if st.images},
            "pooled": (summary.overall.exams, summary.overall.referable_exams),
            "drops": +Counter(summary.drops), "days": days}


RANGES = [(None, None), (DAYS[0], DAYS[0]), (DAYS[1], DAYS[2]), (DAYS[2], None), (None, DAYS[1]), (DAYS[3], DAYS[3])]


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_from_tallies_equals_a_count_of_the_rows(factory, seed):
    _programme(factory, seed)
    with factory() as s:
        multi = s.scalar(select(ExamTally.exam_id).where(ExamTally.multi_day.is_(True)).limit(1))
        assert multi is not None, "the programme must have a visit whose eyes arrived on two days"
        assert tallies.check(s) == []  # kept as written == rebuilt from the rows
        for start, end in RANGES:
            for model in (None, "v1", "v2"):
                want = _scan(s, start, end, model)
                got = _from_audit(audit_summary(s, start, end, model))
                if model is None:
                    assert got == want, (start, end, model)
                else:  # one model: its column and the pooled one are the same counts
                    assert (got["per_model"], got["pooled"], got["drops"], got["days"]) == \
                           (want["per_model"], want["pooled"], want["drops"], want["days"]), (start, end, model)


def test_rebuild_restores_tallies_from_the_rows_and_check_names_what_differs(factory):
    _programme(factory, 3)
    with session_scope(factory) as s:
        kept = sorted(tuple(r) for r in s.execute(select(AuditTally.day, AuditTally.metric, AuditTally.model_version,
                                                         AuditTally.key, AuditTally.detail, AuditTally.n)
                                                  .where(AuditTally.n != 0)))
        row = s.scalars(select(AuditTally).where(AuditTally.metric == tallies.GRADED).limit(1)).one()
        row.n += 5  # a tally out of step with its rows (a row written behind the repository's back)
        s.flush()
        problems = tallies.check(s)
        assert len(problems) == 1 and "graded" in problems[0] and f"kept {row.n}" in problems[0]
        tallies.rebuild(s)
    with factory() as s:
        again = sorted(tuple(r) for r in s.execute(select(AuditTally.day, AuditTally.metric, AuditTally.model_version,
                                                          AuditTally.key, AuditTally.detail, AuditTally.n)
                                                   .where(AuditTally.n != 0)))
        assert again == kept and tallies.check(s) == []


def test_revision_0011_fills_the_tallies_from_existing_rows(db_url):
    """A database with rows from before the tallies: taken below revision 0011_audit_tallies and upgraded again, it
    gets exactly the tallies the repository kept."""
    from alembic import command

    from screening.db.migrate import alembic_config

    engine = make_engine(db_url)
    init_db(engine)
    factory = make_session_factory(engine)
    _programme(factory, 4)

    def snapshot():
        with factory() as s:
            return (sorted(tuple(r) for r in s.execute(select(AuditTally.day, AuditTally.metric, AuditTally.model_version,
                                                              AuditTally.key, AuditTally.detail, AuditTally.n))),
                    sorted(tuple(r) for r in s.execute(select(ExamTally.exam_id, ExamTally.model_version, ExamTally.day,
                                                              ExamTally.multi_day))))

    def drop_zeros(snap):
        """A tally that went back to zero is a row a count of the rows does not make; a visit over several days is
        counted from its results, so the day it was first seen on is not kept as data."""
        return [r for r in snap[0] if r[-1] != 0], [(e, m, None if multi else d, multi) for e, m, d, multi in snap[1]]

    kept = drop_zeros(snapshot())
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0008_claims_sites")
    init_db(engine, backup=False)
    assert drop_zeros(snapshot()) == kept
    engine.dispose()


def test_two_workers_grading_one_visit_at_once_count_it_once(factory):
    """The two eyes of one visit stored by two sessions at the same time (two workers): the second waits for the
    first's exam row and the visit is counted once, referable when either eye is."""
    with session_scope(factory) as s:
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "P1"), DAYS[0])
        when = datetime(2025, 6, 1, 9, tzinfo=timezone.utc)
        ids = [repo.add_image(s, sha256=f"{k:064x}", source_name=f"P1_{eye}.jpg", exam=exam, eye=eye, received_at=when).id
               for k, eye in enumerate("RL")]

    def grade(image_id: int, dr: int, session=None):
        s = session or factory()
        img = s.get(Image, image_id)
        repo.add_result(s, img, model_version="v1", checkpoint_sha256="c" * 64, dr_grade=dr, dr_probs=[0.2] * 5,
                        dme_grade=0, dme_probs=[1 / 3] * 3, referable_score=0.5, referable=dr >= 2, created_at=when)
        if session is None:
            s.commit()
            s.close()

    first = factory()
    grade(ids[0], 0, first)  # flushed, not committed: its exam row is taken
    errors: list[BaseException] = []

    def second():
        try:
            grade(ids[1], 3)
        except Exception as exc:  # noqa: BLE001 - any failure of the thread is reported by the assert below
            errors.append(exc)

    worker = threading.Thread(target=second)
    worker.start()
    worker.join(0.5)
    first.commit()
    first.close()
    worker.join(30)
    assert not worker.is_alive() and errors == []
    with factory() as s:
        summary = audit_summary(s)
        assert (summary.overall.images, summary.overall.exams, summary.overall.referable_exams) == (2, 1, 1)
        assert tallies.check(s) == []

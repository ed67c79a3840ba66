"""Running counts the audit reads, kept by the repository as the rows they count are written (issue 15).

Why: the audit of a year (a million results) must answer in under a second on SQLite and on PostgreSQL. Counting
grades, exams, drops and gradability verdicts by walking their rows costs a pass over a million index entries per
count (BENCHMARKS.md: 1.3 s and more). Here each of those counts is kept per UTC day of arrival in
``audit_tallies``, added to in the same transaction as the row it counts, so the audit sums a few hundred rows a
year instead. A scan of the rows and the tallies give the same numbers (tests/screening/db/test_tallies.py
checks it on both databases), because:

* results, drops and verdicts never move to another day: their arrival time is fixed when they are stored;
* a result is stored once (one per image) and never changes its model, grades or referral;
* an exam is counted in the day its graded photos arrived on. The rare exam whose photos arrived on two days
  (``exam_tallies.multi_day``) leaves the tallies and is counted from its results instead, so a date range
  that covers only one of its days counts it exactly as a scan would;
* a verdict stored again (the checks re-run after a crash) replaces its old contribution, it does not add.

The visits by standing recommendation are kept on the visit's own row instead (``exams.screened_at`` and the
``standing_*`` columns, revision 0016_report_referral_level): a visit's recommendation changes with each new
report version, long after the day it is counted on, so a day tally would go stale; one value per visit, counted
by an index range over ``exams``, does not. A visit counts once, in the period its first screened photo arrived in.

Only this module writes the two tables and those columns. ``rebuild`` recomputes them from the rows, for a database filled by
other means (a bulk import, a benchmark) or after an upgrade to revision 0011_audit_tallies, which fills them
the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, NamedTuple

from sqlalchemy import Boolean, Integer, String, Text, bindparam, case, column, delete, func, or_, select, text, update
from sqlalchemy import cast as cast_
from sqlalchemy.orm import Session

from screening.db.dialect import insert_on_conflict
from screening.db.models import AuditTally, Drop, Event, Exam, ExamTally, Image, Result, UTCDateTime

# metrics (AuditTally.metric)
GRADED = "graded"  # per model, key "dr|dme|referable": graded images
EXAMS = "exams"  # per model (POOLED: all models): exams counted on their one day
REFERABLE_EXAMS = "referable_exams"  # the same, with a referable eye
DROPS = "drops"  # key: the drop's outcome
ASSESSED = "assessed"  # key: device; photos with a gradability verdict
UNGRADABLE = "ungradable"  # key: device
UNGRADABLE_REASON = "ungradable_reason"  # key: device, detail: one reason of an ungradable photo
EYE_MISMATCH = "eye_mismatch"  # key: device; a stated eye the photo contradicts
EYE_NOT_CONFIRMED = "eye_not_confirmed"  # key: device; a stated eye the photo was too unclear to check
CHECK_METRICS = (ASSESSED, UNGRADABLE, UNGRADABLE_REASON, EYE_MISMATCH, EYE_NOT_CONFIRMED)

POOLED = ""  # ExamTally.model_version for an exam counted over every model
UNKNOWN_DEVICE = "unknown"  # a photo with no device recorded (NULL and 'unknown' are one device)
NO_REASON = "(no reason given)"


class Key(NamedTuple):
    day: date
    metric: str
    model_version: str = ""
    key: str = ""
    detail: str = ""


def utc_day(when: datetime) -> date:
    """The UTC calendar day of an aware timestamp (the stored naive UTC value's date)."""
    return when.astimezone(timezone.utc).date() if when.tzinfo is not None else when.date()


def utc_bounds(start: date | None, end: date | None) -> tuple[datetime | None, datetime | None]:
    """The UTC days ``start``..``end`` (inclusive; None: open) as times: ``lo <= t < hi``."""
    lo = None if start is None else datetime.combine(start, time.min, tzinfo=timezone.utc)
    hi = None if end is None else datetime.combine(end + timedelta(days=1), time.min, tzinfo=timezone.utc)
    return lo, hi


def grade_key(dr_grade: int, dme_grade: int, referable: bool) -> str:
    return f"{int(dr_grade)}|{int(dme_grade)}|{int(bool(referable))}"


def parse_grade_key(key: str) -> tuple[int, int, bool]:
    dr, dme, referable = key.split("|")
    return int(dr), int(dme), referable == "1"


def add(session: Session, counts: Mapping[Key, int]) -> None:
    """Add each non-zero count to its tally (created at zero), in key order: every writer takes the rows' locks in
    the same order, so two workers adding to the same days cannot deadlock on them."""
    for k in sorted(k for k, n in counts.items() if n):
        stmt = insert_on_conflict(session, AuditTally).values(**k._asdict(), n=counts[k])
        session.execute(stmt.on_conflict_do_update(
            index_elements=["day", "metric", "model_version", "key", "detail"],
            set_={"n": AuditTally.n + stmt.excluded.n},
        ))


# --- what each stored row adds ------------------------------------------------------------------------


def count_result(session: Session, result: Result) -> None:
    """A result was stored: its grades, and its exam (per model and pooled) unless the exam is already counted."""
    day = utc_day(result.received_at)
    counts: dict[Key, int] = {Key(day, GRADED, result.model_version, grade_key(result.dr_grade, result.dme_grade,
                                                                                result.referable)): 1}
    if result.exam_id is not None:
        for model in sorted({result.model_version, POOLED}):  # a fixed order of the exam rows' locks too
            for k, n in _exam_change(session, result.exam_id, model, day, bool(result.referable)).items():
                counts[k] = counts.get(k, 0) + n
    add(session, counts)


def _exam_change(session: Session, exam_id: int, model: str, day: date, referable: bool) -> dict[Key, int]:
    """How one more graded photo of exam ``exam_id`` (arrived on ``day``) changes the exam tallies of ``model``."""
    first = insert_on_conflict(session, ExamTally).values(exam_id=exam_id, model_version=model, day=day, referable=referable,
                                                 multi_day=False)
    # RETURNING says whether the row was made (psycopg reports no rowcount for a skipped ON CONFLICT insert)
    made = first.on_conflict_do_nothing(index_elements=["exam_id", "model_version"]).returning(ExamTally.exam_id)
    if session.execute(made).first() is not None:
        return {Key(day, EXAMS, model): 1, **({Key(day, REFERABLE_EXAMS, model): 1} if referable else {})}
    this = (ExamTally.exam_id == exam_id) & (ExamTally.model_version == model)
    # the row lock (PostgreSQL) orders two workers grading the two eyes of one exam; SQLite has one writer
    known = session.execute(select(ExamTally.day, ExamTally.referable, ExamTally.multi_day).where(this)
                            .with_for_update()).one()
    if known.multi_day:
        return {}
    if known.day == day:
        if referable and not known.referable:
            session.execute(update(ExamTally).where(this).values(referable=True))
            return {Key(day, REFERABLE_EXAMS, model): 1}
        return {}
    session.execute(update(ExamTally).where(this).values(multi_day=True))  # counted from its results from now on
    return {Key(known.day, EXAMS, model): -1, **({Key(known.day, REFERABLE_EXAMS, model): -1} if known.referable else {})}


def count_drop(session: Session, drop: Drop) -> None:
    add(session, {Key(utc_day(drop.received_at), DROPS, "", drop.outcome): 1})


def checks_contribution(image: Image, eye_not_confirmed: bool) -> dict[Key, int]:
    """What ``image``'s stored gradability verdict and eye check add to the tallies (nothing without a verdict)."""
    if image.gradable is None:
        return {}
    day, device = utc_day(image.received_at), image.device or UNKNOWN_DEVICE
    out = {Key(day, ASSESSED, "", device): 1}
    if not image.gradable:
        out[Key(day, UNGRADABLE, "", device)] = 1
        for reason in dict.fromkeys(str(r) for r in (image.quality_reasons or [NO_REASON])):
            out[Key(day, UNGRADABLE_REASON, "", device, reason)] = 1
    if image.eye_mismatch:
        out[Key(day, EYE_MISMATCH, "", device)] = 1
    if eye_not_confirmed:
        out[Key(day, EYE_NOT_CONFIRMED, "", device)] = 1
    return out


def current_checks(session: Session, image: Image) -> tuple[dict[Key, int], bool]:
    """What ``image`` adds to the tallies now, and whether its stated eye was already left unconfirmed: taken
    before its checks or device change, so that :func:`count_checks` replaces them instead of adding."""
    not_confirmed = image.gradable is not None and eye_was_not_confirmed(session, image)
    return checks_contribution(image, not_confirmed), not_confirmed


def count_checks(session: Session, before: Mapping[Key, int], after: Mapping[Key, int]) -> None:
    """A verdict was stored: replace ``before`` (the image's contribution until now) by ``after``."""
    add(session, {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)})


def eye_was_not_confirmed(session: Session, image: Image) -> bool:
    """Whether ``image`` already has an ``eye_not_confirmed`` event (what the audit counts, once per photo)."""
    if image.id is None:
        return False
    return session.scalar(select(Event.id).where(Event.image_id == image.id, Event.kind == "eye_not_confirmed").limit(1)) \
        is not None


# --- reading --------------------------------------------------------------------------------------


def _days(start: date | None, end: date | None) -> list[Any]:
    conds = []
    if start is not None:
        conds.append(AuditTally.day >= start)
    if end is not None:
        conds.append(AuditTally.day <= end)
    return conds


def sums(session: Session, metrics: Sequence[str], start: date | None, end: date | None, *,
         model_version: str | None = None, by_day: bool = False) -> list[tuple[Any, ...]]:
    """``(metric, model_version, key, detail, n)`` summed over the days ``start``..``end`` (inclusive; None: open),
    or ``(day, metric, model_version, key, detail, n)`` per day with ``by_day``; zero sums are left out."""
    cols: list[Any] = [AuditTally.metric, AuditTally.model_version, AuditTally.key, AuditTally.detail]
    if by_day:
        cols.insert(0, AuditTally.day)
    where = [AuditTally.metric.in_(list(metrics)), *_days(start, end)]
    if model_version is not None:
        where.append(AuditTally.model_version == model_version)
    total = func.sum(AuditTally.n)
    rows = session.execute(select(*cols, total).where(*where).group_by(*cols).having(total != 0)).all()
    out = [tuple(r) for r in rows]
    if by_day:
        out = [(_as_date(r[0]), *r[1:]) for r in out]
    return out


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def exam_counts(session: Session, start: date | None, end: date | None, models: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(exams, exams with a referable eye) with a result in ``start``..``end`` per tallied model key (``POOLED``:
    over all models): the day tallies, plus the exams whose photos arrived on several days, counted from their
    results in the range."""
    keys = sorted(set(models))
    out = {m: (0, 0) for m in keys}
    for metric, model, _key, _detail, n in sums(session, [EXAMS, REFERABLE_EXAMS], start, end):
        if model in out:
            exams, referable = out[model]
            out[model] = (exams + int(n), referable) if metric == EXAMS else (exams, referable + int(n))
    lo, hi = utc_bounds(start, end)
    for model in keys:
        where = [ExamTally.model_version == model, ExamTally.multi_day.is_(True)]
        if model != POOLED:
            where.append(Result.model_version == model)
        if lo is not None:
            where.append(Result.received_at >= lo)
        if hi is not None:
            where.append(Result.received_at < hi)
        n, referable = session.execute(
            select(func.count(Result.exam_id.distinct()),
                   func.count(case((Result.referable.is_(True), Result.exam_id)).distinct()))
            .select_from(ExamTally).join(Result, Result.exam_id == ExamTally.exam_id).where(*where)
        ).one()
        exams, ref = out[model]
        out[model] = (exams + int(n or 0), ref + int(referable or 0))
    return out


# --- rebuilding from the rows ----------------------------------------------------------------------

# The statements that fill both tables from the rows (the same as revision 0011_audit_tallies runs), portable
# between SQLite and PostgreSQL: date() of a naive UTC timestamp is its UTC day on both.
REBUILD_SQL = (
    f"""INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT date(received_at), '{GRADED}', model_version,
           CAST(dr_grade AS VARCHAR) || '|' || CAST(dme_grade AS VARCHAR) || '|' || CASE WHEN referable THEN '1' ELSE '0' END,
           '', count(*)
    FROM results GROUP BY date(received_at), model_version, dr_grade, dme_grade, referable""",
    """INSERT INTO exam_tallies (exam_id, model_version, day, referable, multi_day)
    SELECT exam_id, model_version, min(date(received_at)), max(CASE WHEN referable THEN 1 ELSE 0 END) = 1,
           min(date(received_at)) <> max(date(received_at))
    FROM results WHERE exam_id IS NOT NULL GROUP BY exam_id, model_version""",
    f"""INSERT INTO exam_tallies (exam_id, model_version, day, referable, multi_day)
    SELECT exam_id, '{POOLED}', min(date(received_at)), max(CASE WHEN referable THEN 1 ELSE 0 END) = 1,
           min(date(received_at)) <> max(date(received_at))
    FROM results WHERE exam_id IS NOT NULL GROUP BY exam_id""",
    f"""INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT day, '{EXAMS}', model_version, '', '', count(*) FROM exam_tallies WHERE NOT multi_day
    GROUP BY day, model_version""",
    f"""INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT day, '{REFERABLE_EXAMS}', model_version, '', '', count(*) FROM exam_tallies WHERE NOT multi_day AND referable
    GROUP BY day, model_version""",
    f"""INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT date(received_at), '{DROPS}', '', outcome, '', count(*) FROM drops GROUP BY date(received_at), outcome""",
    *(f"""INSERT INTO audit_tallies (day, metric, model_version, key, detail, n)
    SELECT date(received_at), '{metric}', '', COALESCE(device, '{UNKNOWN_DEVICE}'), '', count(*) FROM images
    WHERE gradable IS NOT NULL AND {cond} GROUP BY date(received_at), COALESCE(device, '{UNKNOWN_DEVICE}')"""
      for metric, cond in ((ASSESSED, "TRUE"), (UNGRADABLE, "NOT gradable"), (EYE_MISMATCH, "eye_mismatch"),
                           (EYE_NOT_CONFIRMED, "EXISTS (SELECT 1 FROM events WHERE events.kind = 'eye_not_confirmed' "
                                               "AND events.image_id = images.id)"))),
)


def reason_counts(session: Session) -> dict[Key, int]:
    """The ungradable photos' reasons per day and device: grouped by their stored list (few distinct lists, whatever
    the number of photos), each list then split into its reasons."""
    listed = cast_(Image.quality_reasons, Text)  # JSON as its text: groupable on both (PostgreSQL's json is not)
    out: dict[Key, int] = {}
    rows: Sequence[Any] = session.execute(
        select(func.date(Image.received_at), Image.device, listed, func.count())
        .where(Image.gradable.is_(False)).group_by(func.date(Image.received_at), Image.device, listed)
    ).all()
    for day, device, listing, n in rows:
        reasons = (json.loads(listing) if listing else None) or [NO_REASON]
        for reason in dict.fromkeys(str(r) for r in reasons):
            k = Key(_as_date(day), UNGRADABLE_REASON, "", device or UNKNOWN_DEVICE, reason)
            out[k] = out.get(k, 0) + int(n)
    return out


def screen_exam(session: Session, image: Image) -> None:
    """``image`` was graded or stored ungradable: its visit counts as screened from its first such photo's arrival
    (``exams.screened_at``, the earliest, whatever order they are graded in)."""
    if image.exam_id is None:
        return
    session.execute(update(Exam).where(Exam.id == image.exam_id,
                                       or_(Exam.screened_at.is_(None), Exam.screened_at > image.received_at))
                    .values(screened_at=image.received_at).execution_options(synchronize_session="fetch"))


def stand_exam(session: Session, exam_id: int, version: int, level: str | None, by_grader: bool) -> None:
    """Report ``version`` of the visit was recorded: it stands for the visit unless a later one already does."""
    session.execute(update(Exam).where(Exam.id == exam_id, or_(Exam.standing_version.is_(None),
                                                                Exam.standing_version <= version))
                    .values(standing_version=version, standing_level=level, standing_by_grader=by_grader)
                    .execution_options(synchronize_session="fetch"))


# Each visit's standing columns as the rows give them. The same statement is copied in the migration that adds the
# columns (0016_report_referral_level), which cannot import this module.
# "i.state || ''" keeps SQLite on ix_images_exam_id: on ix_images_state_received_at (state = ?) each visit's
# look-up walked every stored photo (a rebuild of 500,000 visits did not end in minutes)
STANDING_COLUMNS = {
    "screened_at": """(SELECT min(i.received_at) FROM images i WHERE i.exam_id = exams.id
                                                 AND i.state || '' IN ('done', 'reported'))""",
    "standing_version": "(SELECT max(r.version) FROM reports r WHERE r.exam_id = exams.id)",
    "standing_level": "(SELECT r.referral_level FROM reports r WHERE r.exam_id = exams.id ORDER BY r.version DESC LIMIT 1)",
    "standing_by_grader": """(SELECT r.review_id IS NOT NULL FROM reports r WHERE r.exam_id = exams.id
                          ORDER BY r.version DESC LIMIT 1)""",
}
STANDING_SQL = "UPDATE exams SET\n" + ",\n".join(f"    {name} = {expr}" for name, expr in STANDING_COLUMNS.items())
# the same columns read, not written: what tallies check compares, without locking a row workers update
_STANDING_SELECT = (text("SELECT exams.id, " + ", ".join(f"{expr} AS {name}" for name, expr in STANDING_COLUMNS.items())
                         + " FROM exams")
                    .columns(column("id", Integer), column("screened_at", UTCDateTime()),
                             column("standing_version", Integer), column("standing_level", String()),
                             column("standing_by_grader", Boolean())))


def _rebuild_tallies(session: Session) -> None:
    session.execute(delete(AuditTally))
    session.execute(delete(ExamTally))
    for sql in REBUILD_SQL:
        session.execute(text(sql))
    add(session, reason_counts(session))


def recount_exams(session: Session, exam_ids: Iterable[int]) -> None:
    """Recompute the exam tallies and the standing columns of ``exam_ids`` from their rows, as :func:`rebuild` would,
    touching only those visits' rows: a photo moved from one visit to another (``dr-screen review move``) moves its
    result's visit, so one visit may stop counting and another start. The photo's own tallies (its grades, its checks,
    its drops) keep their day and are not touched. Rows are locked and added to in key order, as :func:`add` does."""
    ids = sorted(set(exam_ids))
    if not ids:
        return
    counts: dict[Key, int] = {}

    def bump(key: Key, n: int) -> None:
        counts[key] = counts.get(key, 0) + n

    for row in session.execute(select(ExamTally.day, ExamTally.model_version, ExamTally.referable, ExamTally.multi_day)
                                .where(ExamTally.exam_id.in_(ids))
                                .order_by(ExamTally.exam_id, ExamTally.model_version).with_for_update()).all():
        if not row.multi_day:
            bump(Key(row.day, EXAMS, row.model_version), -1)
            if row.referable:
                bump(Key(row.day, REFERABLE_EXAMS, row.model_version), -1)
    session.execute(delete(ExamTally).where(ExamTally.exam_id.in_(ids)))
    groups: dict[tuple[int, str], tuple[set[date], bool]] = {}
    for exam_id, model, received_at, referable in session.execute(
            select(Result.exam_id, Result.model_version, Result.received_at, Result.referable)
            .where(Result.exam_id.in_(ids))).all():
        if exam_id is None:
            continue
        for key in ((exam_id, model), (exam_id, POOLED)):
            days, any_referable = groups.get(key, (set(), False))
            groups[key] = (days | {utc_day(received_at)}, any_referable or bool(referable))
    for (exam_id, model), (days, referable) in sorted(groups.items()):
        multi_day = len(days) > 1
        session.add(ExamTally(exam_id=exam_id, model_version=model, day=min(days), referable=referable,
                              multi_day=multi_day))
        if not multi_day:
            bump(Key(min(days), EXAMS, model), 1)
            if referable:
                bump(Key(min(days), REFERABLE_EXAMS, model), 1)
    session.flush()
    add(session, counts)
    session.execute(text(STANDING_SQL + "\nWHERE exams.id IN :ids").bindparams(bindparam("ids", expanding=True)),
                    {"ids": ids})
    session.expire_all()  # the columns changed under any loaded Exam


def rebuild(session: Session) -> None:
    """Recompute both tables and the visits' standing columns from the rows (in the caller's transaction)."""
    _rebuild_tallies(session)
    session.execute(text(STANDING_SQL))
    session.expire_all()  # the columns changed under any loaded Exam


def check(session: Session) -> list[str]:
    """The differences between the stored tallies and a rebuild from the rows (empty: they agree). The tally
    tables are rebuilt in a savepoint it rolls back, so nothing is changed; the visits' standing columns are only
    read (:data:`STANDING_COLUMNS` as a query), so the check holds no lock on the ``exams`` rows workers update."""
    def snapshot() -> dict[tuple[Any, ...], int]:
        rows = session.execute(select(AuditTally.day, AuditTally.metric, AuditTally.model_version, AuditTally.key,
                                      AuditTally.detail, AuditTally.n).where(AuditTally.n != 0)).all()
        return {(_as_date(r[0]), *r[1:5]): int(r[5]) for r in rows}

    def standing(rows: Any) -> dict[int, tuple[Any, ...]]:
        return {int(r[0]): (r[1], r[2], r[3], None if r[4] is None else bool(r[4])) for r in rows}

    kept_standing = standing(session.execute(select(Exam.id, Exam.screened_at, Exam.standing_version,
                                                    Exam.standing_level, Exam.standing_by_grader)).all())
    want_standing = standing(session.execute(_STANDING_SELECT).all())
    kept = snapshot()
    nested = session.begin_nested()
    try:
        _rebuild_tallies(session)
        want = snapshot()
    finally:
        nested.rollback()
        session.expire_all()
    names = tuple(STANDING_COLUMNS)
    return [f"{' '.join(str(p) for p in k)}: kept {kept.get(k, 0)}, rows say {want.get(k, 0)}"
            for k in sorted(set(kept) | set(want), key=str) if kept.get(k, 0) != want.get(k, 0)] + [
        f"exam {exam_id} {name}: kept {a}, rows say {b}"
        for exam_id in sorted(set(kept_standing) | set(want_standing))
        for name, a, b in zip(names, kept_standing.get(exam_id, (None,) * 4), want_standing.get(exam_id, (None,) * 4))
        if a != b]


__all__ = [
    "ASSESSED",
    "CHECK_METRICS",
    "DROPS",
    "EXAMS",
    "EYE_MISMATCH",
    "EYE_NOT_CONFIRMED",
    "GRADED",
    "NO_REASON",
    "POOLED",
    "REFERABLE_EXAMS",
    "UNGRADABLE",
    "UNGRADABLE_REASON",
    "UNKNOWN_DEVICE",
    "Key",
    "add",
    "check",
    "checks_contribution",
    "count_checks",
    "current_checks",
    "count_drop",
    "count_result",
    "exam_counts",
    "eye_was_not_confirmed",
    "grade_key",
    "parse_grade_key",
    "rebuild",
    "reason_counts",
    "screen_exam",
    "stand_exam",
    "sums",
    "utc_bounds",
    "utc_day",
]

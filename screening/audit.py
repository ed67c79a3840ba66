"""Audit statistics over the screening database.

Which rows a date range selects
    ``start``/``end`` (inclusive, either may be ``None``) filter on the **UTC calendar date the file was
    received**: ``images.received_at`` for graded, failed and rejected images and ``drops.received_at``
    for duplicate and rejected arrivals. The exam date from the file name is *not* used: it may be
    missing (rejected files) or typed wrongly, while the arrival time is always known.

What is counted
    * grades, referrals, exams: one per image that has a Result (each eye counts once); ``exams`` is
      the number of distinct exams among them and ``referable_exams`` those with a referable eye;
    * duplicates: drops with outcome ``duplicate`` (the same content dropped again);
    * drops: every arrival of a file (or of anything else in the inbox: a link, a folder) exactly once, by
      its outcome (``new``, ``duplicate``, ``rejected``);
    * rejected: every refused arrival (drops with outcome ``rejected``: the same bytes refused under three
      names are three refusals, each with its own reason) plus every page refused inside a multi-page file
      that was otherwise admitted (a ``rejected`` image with a page number; its file's drop is ``new``), grouped
      by their reason code (``drops.reason_code`` / ``images.error_code``, see :mod:`screening.rejection`;
      rows from before revision 0006 have no code and are grouped by their message text);
    * failed: images in state ``failed``, grouped the same way;
    * incidents: events with an incident code (a move retried, an orphan report removed, a state repaired
      at start-up...), by ``events.created_at``;
    * turnaround: seconds from ``images.received_at`` to the first report of the image's exam created
      at or after the image's result; images with a result but no such report count as
      ``awaiting_report``. Percentiles use linear interpolation between ranks (numpy's default,
      Excel's PERCENTILE.INC). The database keeps this per result (``results.turnaround_s``, updated
      as reports are recorded), and the result's copy of ``received_at`` selects the date range.

Where the counts come from
    Grades, referrals, exams, drops and the gradability counts are read from the day tallies the repository
    keeps as it writes (:mod:`screening.db.tallies`; the same numbers as a count of the rows, which the tests
    check on both databases), so a year of a million results sums a few hundred rows. Turnaround percentiles,
    duplicates per model, rejected and failed files, incidents and agreement are read from their rows, each
    along an index that holds only what they count.

Model versus grader
    ``agreement`` (:mod:`screening.review.agreement`): for the visits in the period, the share whose sign-off by a
    clinician is current (a visit with a photo graded after its sign-off is back in the review queue: counted as
    reopened, not reviewed; its sign-off is still compared for the photos it covered), quadratic kappa of the DR grade, sensitivity and specificity of the model's referral
    against the graders', and the median time from report to review; overall, per model version and per
    reviewer.

Ungradable photos, per day and device
    Every photo admitted since the intake checks exist has a gradability verdict (``images.gradable``). Per UTC
    day of arrival and per device (``images.device`` where the database records one, else ``unknown``): how
    many photos were assessed, how many were ungradable (the rate), the reasons given, how many carried a
    laterality mismatch, and how many stated eyes the photo was too unclear to confirm (``eye_not_confirmed``
    events: the laterality model abstained). Pictures refused as not a fundus photo are not photos of an eye: they are counted
    with the other refusals.

Visits screened, by the recommendation standing
    The programme's unit is the visit: :class:`VisitStats` counts every visit with a photo received in the period
    that was graded or stored as ungradable (so a visit whose photos were all ungradable, recalled or referred as
    such, counts: it is in no grade or "Visits graded" count), by the recommendation its latest report version
    printed (``reports.referral_level``: the model's on a draft, the grader's on a reviewed version), plus those
    with no report yet and those whose latest version predates revision 0016_report_referral_level. A visit counts
    in the period its first screened photo arrived in. Not a day tally (the standing recommendation changes with
    each new version): each visit keeps it on its row (``exams.screened_at``, ``standing_*``, written by
    screening.db.tallies), counted along one index, for every model version and site: ``--model-version`` and
    ``--by-site`` do not apply to it, and the output says so.

Per model version
    Grades, referrals, duplicates (of images graded by that version) and turnaround are broken down by
    ``results.model_version``; ``overall`` pools them (and counts every duplicate drop, including those of
    images not graded yet). Rejected and failed files never reached a model, so they are reported once
    for the whole period and do not depend on the ``model_version`` filter.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from os import PathLike
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from screening.db import tallies
from screening.db.models import Drop, DropOutcome, Event, Exam, Image, ImageState, Result
from screening.db.repository import REFERRAL_LEVEL_KEYS
from screening.db.tallies import NO_REASON
from screening.rejection import Incident, code_text
from screening.review.agreement import AgreementStats, AgreementSummary, agreement_summary
from screening.review.agreement import groups as agreement_groups
from screening.review.agreement import stat_rows as agreement_rows

ALL = "ALL"
DR_GRADES = range(5)
DME_GRADES = range(3)
PERCENTILES = (50, 90, 99)
DATE_BASIS = "received_at (UTC date, inclusive)"
NO_SITE = "(no site)"  # results stored before revision 0008_claims_sites recorded the grading worker's site


@dataclass
class ModelStats:
    model_version: str
    images: int = 0
    dr_grades: dict[int, int] = field(default_factory=lambda: {g: 0 for g in DR_GRADES})
    dme_grades: dict[int, int] = field(default_factory=lambda: {g: 0 for g in DME_GRADES})
    referable: int = 0
    not_referable: int = 0
    exams: int = 0
    referable_exams: int = 0
    duplicates: int = 0
    reported: int = 0  # images whose turnaround is known
    awaiting_report: int = 0
    turnaround_p50_s: float | None = None
    turnaround_p90_s: float | None = None
    turnaround_p99_s: float | None = None


@dataclass
class SiteStats:
    """Per ``[screening] site`` of the worker that graded (``results.site``): where the work was done."""

    site: str
    images: int = 0
    referable: int = 0
    reported: int = 0
    awaiting_report: int = 0
    turnaround_p50_s: float | None = None
    turnaround_p90_s: float | None = None
    turnaround_p99_s: float | None = None


@dataclass
class UngradableDay:
    """Gradability on one UTC day of arrival for one device."""

    day: str  # YYYY-MM-DD
    device: str
    assessed: int = 0
    ungradable: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    eye_mismatches: int = 0
    eyes_not_confirmed: int = 0  # a stated eye the photo was too unclear to check (the laterality model abstained)

    @property
    def rate(self) -> float | None:
        return self.ungradable / self.assessed if self.assessed else None


NO_REPORT = "no_report"  # a visit screened in the period with no report version recorded yet
NOT_RECORDED = "not_recorded"  # its latest version was rendered before revision 0016_report_referral_level
VISIT_OUTCOMES = (*REFERRAL_LEVEL_KEYS, NO_REPORT, NOT_RECORDED)
VISITS_SCOPE = "every model version and site (--model-version and --by-site do not apply)"
_VISIT_LABELS = {
    "urgent": "Urgent referral", "soon": "Referral within weeks", "routine": "Routine referral",
    "refer_ungradable": "Refer (ungradable)", "ungradable": "Recall (ungradable)", "rescreen_12": "Rescreen 12 months",
    "rescreen_24": "Rescreen 12-24 months", "no_images": "No gradable images", NO_REPORT: "No report yet",
    NOT_RECORDED: "Recorded before this count",
}


@dataclass
class VisitStats:
    """Visits screened in the period by the recommendation standing for them: the programme's unit of work.

    ``screened``: visits (exams) with a photo that arrived in the period and was graded or stored as ungradable
    (state ``done`` or ``reported``), counted in the period its first such photo arrived in (a visit whose photos
    arrived on two days counts on the first; "Visits graded" counts it in each). ``by_recommendation``: those visits by the level printed
    on their latest report version (``reports.referral_level``: the model's on a draft, the grader's on a reviewed
    version), plus ``no_report`` (no version yet) and ``not_recorded`` (the latest version was rendered before
    revision 0016_report_referral_level). ``set_by_grader``: visits whose latest version is a reviewed one. The
    recommendation belongs to the visit, not to a model version or a grading site (an ungradable photo has
    neither), so these counts ignore ``--model-version`` and ``--by-site``."""

    screened: int = 0
    by_recommendation: dict[str, int] = field(default_factory=lambda: {k: 0 for k in VISIT_OUTCOMES})
    set_by_grader: int = 0
    share_set_by_grader: float | None = None
    scope: str = VISITS_SCOPE


@dataclass
class AuditSummary:
    start: date | None
    end: date | None
    model_version: str | None
    overall: ModelStats
    by_model: dict[str, ModelStats]
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in DropOutcome})
    incidents: dict[str, int] = field(default_factory=dict)
    ungradable_by_day: list[UngradableDay] = field(default_factory=list)
    date_basis: str = DATE_BASIS
    agreement: AgreementSummary | None = None  # model versus grader; None in exports made before it existed
    by_site: dict[str, SiteStats] = field(default_factory=dict)  # filled when asked for (audit --by-site)
    visits: VisitStats | None = None  # visits by standing recommendation; None in exports made before it existed

    @property
    def duplicates(self) -> int:
        return self.overall.duplicates

    @property
    def assessed(self) -> int:
        return sum(d.assessed for d in self.ungradable_by_day)

    @property
    def ungradable(self) -> int:
        return sum(d.ungradable for d in self.ungradable_by_day)

    @property
    def ungradable_rate(self) -> float | None:
        return self.ungradable / self.assessed if self.assessed else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"] = None if self.start is None else self.start.isoformat()
        d["end"] = None if self.end is None else self.end.isoformat()
        for day, row in zip(self.ungradable_by_day, d["ungradable_by_day"]):
            row["rate"] = day.rate
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditSummary:
        def stats(s: dict[str, Any]) -> ModelStats:
            s = dict(s)
            s["dr_grades"] = {int(k): int(v) for k, v in s["dr_grades"].items()}
            s["dme_grades"] = {int(k): int(v) for k, v in s["dme_grades"].items()}
            return ModelStats(**s)

        return cls(
            start=None if d["start"] is None else date.fromisoformat(d["start"]),
            end=None if d["end"] is None else date.fromisoformat(d["end"]),
            model_version=d["model_version"],
            overall=stats(d["overall"]),
            by_model={k: stats(v) for k, v in d["by_model"].items()},
            rejected=d["rejected"],
            rejected_reasons=dict(d["rejected_reasons"]),
            failed=d["failed"],
            failed_reasons=dict(d["failed_reasons"]),
            drops={str(k): int(v) for k, v in d.get("drops", {}).items()},
            incidents={str(k): int(v) for k, v in d.get("incidents", {}).items()},
            ungradable_by_day=[UngradableDay(**{k: v for k, v in day.items() if k != "rate"})
                               for day in d.get("ungradable_by_day", [])],
            date_basis=d.get("date_basis", DATE_BASIS),
            agreement=AgreementSummary.from_dict(d["agreement"]) if d.get("agreement") else None,
            by_site={str(k): SiteStats(**v) for k, v in d.get("by_site", {}).items()},
            visits=VisitStats(**d["visits"]) if d.get("visits") else None,
        )


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; ``None`` for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _in_range(column: Any, lo: datetime | None, hi: datetime | None) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if lo is not None:
        conds.append(column >= lo)
    if hi is not None:
        conds.append(column < hi)
    return conds


def _consistent_snapshot(session: Session) -> None:
    """Every query of one audit must see the same rows, or a rank computed from one count would point past
    the values another query sees while workers write. SQLite's read transaction is one snapshot already;
    PostgreSQL's default READ COMMITTED takes a new one per statement, so ask it for REPEATABLE READ (only
    possible before the session's transaction has begun, which is how the CLI calls this)."""
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def _grade_counts(session: Session, start: date | None, end: date | None, model_version: str | None,
                  where: list[ColumnElement[bool]]) -> dict[str, ModelStats]:
    """Images, grades and referrals per model from the day tallies (screening.db.tallies); the images still
    awaiting a report per model along ix_results_awaiting (only those rows: a few per cent)."""
    by_model: dict[str, ModelStats] = {}
    for _metric, mv, key, _detail, n in tallies.sums(session, [tallies.GRADED], start, end, model_version=model_version):
        dr, dme, referable = tallies.parse_grade_key(key)
        st = by_model.setdefault(mv, ModelStats(mv))
        st.images += int(n)
        st.dr_grades[dr] = st.dr_grades.get(dr, 0) + int(n)
        st.dme_grades[dme] = st.dme_grades.get(dme, 0) + int(n)
        if referable:
            st.referable += int(n)
        else:
            st.not_referable += int(n)
    awaiting: dict[str, int] = {mv: n for mv, n in session.execute(
        select(Result.model_version, func.count()).where(Result.turnaround_s.is_(None), *where).group_by(Result.model_version))}
    for mv, st in by_model.items():
        st.awaiting_report = int(awaiting.get(mv, 0))
        st.reported = st.images - st.awaiting_report
    return by_model


def _exam_counts(session: Session, start: date | None, end: date | None, model_version: str | None,
                 models: list[str]) -> dict[str | None, tuple[int, int]]:
    """(exams, exams with a referable eye) among the graded images in the range: pooled under ``None`` and, when
    there are several ``models``, per model; from the day tallies (screening.db.tallies)."""
    pooled = tallies.POOLED if model_version is None else model_version
    split = models if len(models) > 1 else []
    counted = tallies.exam_counts(session, start, end, [pooled, *split])
    out: dict[str | None, tuple[int, int]] = {mv: counted[mv] for mv in split}
    out[None] = counted[pooled]
    return out


def _turnaround_percentiles(session: Session, where: list[ColumnElement[bool]], n: int) -> dict[int, float | None]:
    """The percentiles of :func:`percentile` over the ``n`` known turnarounds matching ``where``, reading only
    the values at the two ranks around each: ``ORDER BY ... OFFSET`` along a turnaround index, from the low
    end for ranks in the lower half and from the high end above it (p99 walks 1 % of the index, not 99 %)."""
    out: dict[int, float | None] = {q: None for q in PERCENTILES}
    if n == 0:
        return out
    values: list[float]
    for q in PERCENTILES:
        pos = (n - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        stmt = select(Result.turnaround_s).where(Result.turnaround_s.is_not(None), *where).limit(hi - lo + 1)
        if hi <= (n - 1) / 2:
            values = [v for v in session.scalars(stmt.order_by(Result.turnaround_s).offset(lo)) if v is not None]
        else:
            values = [v for v in session.scalars(stmt.order_by(Result.turnaround_s.desc()).offset(n - 1 - hi))
                      if v is not None][::-1]
        if values:
            out[q] = values[0] + (values[-1] - values[0]) * (pos - lo)
    return out


def _site_counts(session: Session, where: list[ColumnElement[bool]]) -> dict[str, SiteStats]:
    """Images, referrals and turnaround per grading site: one walk along ix_results_audit_site (site first),
    and the percentiles of each site from the two values around each rank, as per model."""
    out: dict[str, SiteStats] = {}
    stmt = (select(Result.site, func.count(), func.count(case((Result.referable, 1))), func.count(Result.turnaround_s))
            .where(*where).group_by(Result.site))
    for site, n, referable, reported in session.execute(stmt).all():
        st = SiteStats(site if site is not None else NO_SITE, int(n), int(referable), int(reported), int(n) - int(reported))
        same_site = Result.site.is_(None) if site is None else Result.site == site
        pct = _turnaround_percentiles(session, [*where, same_site], st.reported)
        for q in PERCENTILES:
            setattr(st, f"turnaround_p{q}_s", pct[q])
        out[st.site] = st
    return dict(sorted(out.items()))


def _ungradable_days(session: Session, start: date | None, end: date | None,
                     ordered: Callable[[Counter[str]], dict[str, int]]) -> list[UngradableDay]:
    """Photos assessed, ungradable (with each reason), with a laterality mismatch and with an eye not confirmed,
    per UTC day of arrival and device, from the day tallies (screening.db.tallies)."""
    days: dict[tuple[str, str], UngradableDay] = {}
    reasons: dict[tuple[str, str], Counter[str]] = {}
    for day, metric, _mv, device, detail, n in tallies.sums(session, tallies.CHECK_METRICS, start, end, by_day=True):
        key = (day.isoformat(), device)
        row = days.setdefault(key, UngradableDay(*key))
        if metric == tallies.UNGRADABLE_REASON:
            reasons.setdefault(key, Counter())[detail] += int(n)
        else:
            attr = {tallies.ASSESSED: "assessed", tallies.UNGRADABLE: "ungradable", tallies.EYE_MISMATCH: "eye_mismatches",
                    tallies.EYE_NOT_CONFIRMED: "eyes_not_confirmed"}[metric]
            setattr(row, attr, getattr(row, attr) + int(n))
    for key, counter in reasons.items():
        days[key].reasons = ordered(counter)
    return [days[k] for k in sorted(days) if days[k].assessed]


def _visit_recommendations(session: Session, lo: datetime | None, hi: datetime | None) -> VisitStats:
    """:class:`VisitStats` for visits whose first screened photo arrived in ``[lo, hi)``: one GROUP BY over the
    range of ``ix_exams_screened_standing`` (each visit's ``screened_at`` and standing version, level and grader,
    kept by screening.db.tallies as photos and reports are recorded). Walking the photos of a year and each visit's
    latest report instead took 1.2 s for half a million visits (BENCHMARKS.md)."""
    outcome = case((Exam.standing_version.is_(None), NO_REPORT), else_=func.coalesce(Exam.standing_level, NOT_RECORDED))
    by_grader = case((Exam.standing_by_grader.is_(True), 1), else_=0)
    stats = VisitStats()
    rows: Sequence[Any] = session.execute(
        select(outcome, by_grader, func.count())
        .where(Exam.screened_at.is_not(None), *_in_range(Exam.screened_at, lo, hi))
        .group_by(outcome, by_grader)
    ).all()
    for level, graded_by, n in rows:
        key = str(level) if str(level) in stats.by_recommendation else NOT_RECORDED  # a value no release wrote
        stats.by_recommendation[key] += int(n)
        stats.screened += int(n)
        stats.set_by_grader += int(n) if graded_by else 0
    stats.share_set_by_grader = stats.set_by_grader / stats.screened if stats.screened else None
    return stats


def audit_summary(
    session: Session, start: date | None = None, end: date | None = None, model_version: str | None = None,
    *, by_site: bool = False,
) -> AuditSummary:
    """Statistics for files received between ``start`` and ``end`` (UTC dates, inclusive); ``by_site`` adds the
    graded images per site of the worker that graded them (several workers writing one database).

    Graded images, exams, drops and gradability are summed from the day tallies (screening.db.tallies); the
    turnaround from ``results`` alone (its copy of the arrival time, its turnaround) along its indexes; so that a
    million results take well under a second (BENCHMARKS.md)."""
    if start is not None and end is not None and end < start:
        raise ValueError(f"end {end} is before start {start}")
    lo, hi = tallies.utc_bounds(start, end)
    _consistent_snapshot(session)
    where = _in_range(Result.received_at, lo, hi)
    if model_version is not None:
        where.append(Result.model_version == model_version)

    graded = _grade_counts(session, start, end, model_version, where)
    models = sorted(graded)
    exams: dict[str | None, tuple[int, int]] = (_exam_counts(session, start, end, model_version, models) if models
                                                 else {None: (0, 0)})

    dup_stmt = (
        select(Result.model_version, func.count(Drop.id))
        .select_from(Drop)
        .outerjoin(Result, Result.image_id == Drop.image_id)
        .where(Drop.outcome == DropOutcome.DUPLICATE.value, *_in_range(Drop.received_at, lo, hi))
        .group_by(Result.model_version)
    )
    if model_version is not None:
        dup_stmt = dup_stmt.where(Result.model_version == model_version)
    dups: dict[str | None, int] = {mv: n for mv, n in session.execute(dup_stmt).all()}

    overall = ModelStats(ALL if model_version is None else model_version)
    by_model: dict[str, ModelStats] = {}
    for mv in sorted(set(models) | {mv for mv in dups if mv is not None}):
        st = by_model[mv] = graded.get(mv, ModelStats(mv))
        st.duplicates = dups.get(mv, 0)
        if mv in graded:
            st.exams, st.referable_exams = exams[mv] if mv in exams else exams[None]  # one model: the pooled counts
            pct = _turnaround_percentiles(session, [*where, Result.model_version == mv], st.reported)
            for q in PERCENTILES:
                setattr(st, f"turnaround_p{q}_s", pct[q])
        for key in ("images", "referable", "not_referable", "reported", "awaiting_report"):
            setattr(overall, key, getattr(overall, key) + getattr(st, key))
        for g, n in st.dr_grades.items():
            overall.dr_grades[g] = overall.dr_grades.get(g, 0) + n
        for g, n in st.dme_grades.items():
            overall.dme_grades[g] = overall.dme_grades.get(g, 0) + n
    overall.duplicates = sum(dups.values())
    overall.exams, overall.referable_exams = exams[None]
    if len(models) == 1:  # the pooled column is that model's
        for q in PERCENTILES:
            setattr(overall, f"turnaround_p{q}_s", getattr(by_model[models[0]], f"turnaround_p{q}_s"))
    else:
        pct = _turnaround_percentiles(session, where, overall.reported)
        for q in PERCENTILES:
            setattr(overall, f"turnaround_p{q}_s", pct[q])

    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for state, error, code in session.execute(
        select(Image.state, Image.error, Image.error_code).where(
            (Image.state == ImageState.FAILED.value)
            | ((Image.state == ImageState.REJECTED.value) & Image.page.is_not(None)),  # a page refused in its file
            *_in_range(Image.received_at, lo, hi),
        )
    ).all():
        (rejected if state == ImageState.REJECTED else failed)[reason_key(code, error)] += 1
    for reason, code, image_error, image_code in session.execute(
        select(Drop.reason, Drop.reason_code, Image.error, Image.error_code)
        .outerjoin(Image, Image.id == Drop.image_id)
        .where(Drop.outcome == DropOutcome.REJECTED.value, *_in_range(Drop.received_at, lo, hi))
    ).all():
        if code is None and reason is None:  # a drop recorded before revision 0002 kept its reason on the image
            code, reason = image_code, image_error
        rejected[reason_key(code, reason)] += 1
    drops = {o.value: 0 for o in DropOutcome}
    for _metric, _mv, outcome, _detail, n in tallies.sums(session, [tallies.DROPS], start, end):
        drops[outcome] = int(n)
    incidents: Counter[str] = Counter()
    for code, n in session.execute(
        select(Event.code, func.count(Event.id))
        .where(Event.code.in_([i.value for i in Incident]), *_in_range(Event.created_at, lo, hi))
        .group_by(Event.code)
    ).all():
        incidents[code or NO_REASON] = n

    def ordered(c: Counter[str]) -> dict[str, int]:
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


    return AuditSummary(
        start=start,
        end=end,
        model_version=model_version,
        # the visits graded in the period are the exams counted above: handed over, not counted again
        agreement=agreement_summary(session, lo, hi, model_version,
                                    graded={None: overall.exams, **{mv: by_model[mv].exams for mv in graded}}),
        overall=overall,
        by_model=by_model,
        rejected=sum(rejected.values()),
        rejected_reasons=ordered(rejected),
        failed=sum(failed.values()),
        failed_reasons=ordered(failed),
        drops=drops,
        incidents=ordered(incidents),
        by_site=_site_counts(session, where) if by_site else {},
        ungradable_by_day=_ungradable_days(session, start, end, ordered),
        visits=_visit_recommendations(session, lo, hi),
    )


def model_versions(session: Session) -> list[str]:
    """Every model version that graded a photo, at any time (from the day tallies: a few hundred rows a year).
    Versions name models, not patients: an unknown ``--model-version`` is answered with this list."""
    return sorted({str(mv) for _metric, mv, _key, _detail, _n in tallies.sums(session, [tallies.GRADED], None, None)})


def reason_key(code: str | None, message: str | None) -> str:
    """What a rejection or failure is grouped by: its stable code; rows from before revision 0006 have none and
    are grouped by their message."""
    return code or message or NO_REASON


# --- output -------------------------------------------------------------------------------------


def _stat_rows(s: ModelStats) -> list[tuple[str, str, Any]]:
    """(section, key, value) rows for one column of statistics."""
    rows: list[tuple[str, str, Any]] = [("images", "graded", s.images)]
    rows += [("dr_grade", str(g), s.dr_grades.get(g, 0)) for g in sorted(s.dr_grades)]
    rows += [("dme_grade", str(g), s.dme_grades.get(g, 0)) for g in sorted(s.dme_grades)]
    rows += [
        ("referral", "referable", s.referable),
        ("referral", "not_referable", s.not_referable),
        ("exams", "graded", s.exams),
        ("exams", "referable", s.referable_exams),
        ("duplicates", "drops", s.duplicates),
        ("turnaround_s", "reported", s.reported),
        ("turnaround_s", "awaiting_report", s.awaiting_report),
    ]
    rows += [("turnaround_s", f"p{q}", getattr(s, f"turnaround_p{q}_s")) for q in PERCENTILES]
    return rows


CSV_FIELDS = ["section", "model_version", "key", "value", "reviewer", "site", "day", "device", "reason"]
_SITE_KEYS = ("images", "referable", "reported", "awaiting_report", *(f"turnaround_p{q}_s" for q in PERCENTILES))


def summary_rows(summary: AuditSummary) -> list[dict[str, str]]:
    """The summary as tidy rows, one number each, with the columns of :data:`CSV_FIELDS` (what :func:`write_csv`
    writes), so a spreadsheet can filter on any of them:

    * ``section``: what the row belongs to; ``key``: what is counted (``value``);
    * ``model_version``: ``ALL`` for the pooled column, a version for its own, empty for period-wide rows;
    * ``reviewer``: only on the per-reviewer agreement rows (section ``agreement``);
    * ``site``: only on the per-site rows (section ``site``, with ``audit --by-site``);
    * ``day`` (YYYY-MM-DD, UTC day of arrival) and ``device``: only on the gradability rows per day and device
      (sections ``ungradable_by_day`` and ``ungradable_reason``);
    * ``reason``: the reason code on the rows counted per reason (sections ``rejected_reason``,
      ``failed_reason``, ``ungradable_reason``; ``key`` then says what was counted: ``rejected``, ``failed``,
      ``ungradable``);
    * visits screened by their standing recommendation (section ``visits_by_recommendation``): ``key`` is the
      level (``urgent`` ... ``rescreen_24``, ``no_images``, ``no_report``, ``not_recorded``); ``model_version`` is
      empty, as these rows cover every model version and site.
    Empty where a column does not apply."""
    out: list[dict[str, Any]] = []

    def add(section: str, model_version: str, key: str, value: Any, **extra: str) -> None:
        out.append({"section": section, "model_version": model_version, "key": key, "value": value, **extra})

    add("filter", "", "start", summary.start.isoformat() if summary.start else "")
    add("filter", "", "end", summary.end.isoformat() if summary.end else "")
    add("filter", "", "model_version", summary.model_version or "")
    add("filter", "", "date_basis", summary.date_basis)
    for col in [summary.overall, *summary.by_model.values()]:
        label = ALL if col is summary.overall else col.model_version
        for sec, key, val in _stat_rows(col):
            add(sec, label, key, val)
    add("rejected", "", "total", summary.rejected)
    for reason, n in summary.rejected_reasons.items():
        add("rejected_reason", "", "rejected", n, reason=reason)
    add("failed", "", "total", summary.failed)
    for reason, n in summary.failed_reasons.items():
        add("failed_reason", "", "failed", n, reason=reason)
    for outcome, n in summary.drops.items():
        add("drops", "", outcome, n)
    for code, n in summary.incidents.items():
        add("incident", "", code, n)
    add("gradability", "", "assessed", summary.assessed)
    add("gradability", "", "ungradable", summary.ungradable)
    add("gradability", "", "ungradable_rate", summary.ungradable_rate)
    for day in summary.ungradable_by_day:
        where = {"day": day.day, "device": day.device}
        for key in ("assessed", "ungradable", "rate", "eye_mismatches", "eyes_not_confirmed"):
            add("ungradable_by_day", "", key, getattr(day, key), **where)
        for reason, n in day.reasons.items():
            add("ungradable_reason", "", "ungradable", n, reason=reason, **where)
    if summary.agreement is not None:
        for label, reviewer, stats in agreement_groups(summary.agreement):
            for key, val in agreement_rows(stats):
                add("agreement", label, key, val, reviewer=reviewer)
        for key, val in asdict(summary.agreement.model_ungradable).items():  # period-wide: no version graded them
            add("agreement_model_ungradable", "", key, val)
    for site, site_stats in summary.by_site.items():
        for key in _SITE_KEYS:
            add("site", summary.model_version or ALL, key, getattr(site_stats, key), site=site)
    if summary.visits is not None:  # period-wide: every model version and site
        v = summary.visits
        add("visits", "", "screened", v.screened)
        for level, n in v.by_recommendation.items():
            add("visits_by_recommendation", "", level, n)
        add("visits", "", "set_by_grader", v.set_by_grader)
        add("visits", "", "share_set_by_grader", v.share_set_by_grader)
        add("visits", "", "scope", v.scope)

    def text(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return repr(round(v, 3))
        return str(v)

    return [{name: text(row.get(name)) for name in CSV_FIELDS} for row in out]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A text cell a spreadsheet would read as a formula (a camera name from a DICOM tag, a reviewer's name:
    ``=HYPERLINK(...)``) written with a leading apostrophe, as OWASP advises for CSV exports; numbers unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def write_csv(summary: AuditSummary, path: str | PathLike[str]) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in summary_rows(summary))
    return path


def write_json(summary: AuditSummary, path: str | PathLike[str]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_json(path: str | PathLike[str]) -> AuditSummary:
    return AuditSummary.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.0f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def format_table(summary: AuditSummary) -> str:
    """A plain-text table for the terminal: one column per model version plus the pooled one."""
    period = f"{summary.start or 'beginning'} .. {summary.end or 'now'}"
    lines = [f"Screening audit, files received {period} (UTC dates, by the day each file arrived in the inbox)"]
    if summary.model_version:
        lines.append(f"Model version: {summary.model_version}")
    cols = [summary.overall, *summary.by_model.values()]
    headers = ["", *(ALL if c is summary.overall else c.model_version for c in cols)]
    labels = {
        ("images", "graded"): "Images graded",
        ("referral", "referable"): "Referable",
        ("referral", "not_referable"): "Not referable",
        ("exams", "graded"): "Visits graded",  # an exam is a visit: the rest of the audit says visits
        ("exams", "referable"): "Visits referable",
        ("duplicates", "drops"): "Duplicate drops",
        ("turnaround_s", "reported"): "Reported images",
        ("turnaround_s", "awaiting_report"): "Awaiting report",
    }
    body: list[list[str]] = []
    per_col = [_stat_rows(c) for c in cols]
    for i, (sec, key, _) in enumerate(per_col[0]):
        if sec == "dr_grade":
            label = f"DR grade {key}"
        elif sec == "dme_grade":
            label = f"DME risk {key}"
        elif sec == "turnaround_s" and key.startswith("p"):
            label = f"Turnaround {key}"
        else:
            label = labels[(sec, key)]
        vals = [c[i][2] for c in per_col]
        body.append([label, *(_fmt_seconds(v) if label.startswith("Turnaround") else str(v) for v in vals)])
    widths = [max(len(r[j]) for r in [headers, *body]) for j in range(len(headers))]

    def fmt(r: list[str]) -> str:
        return "  ".join(r[0].ljust(widths[0]) if j == 0 else r[j].rjust(widths[j]) for j in range(len(r))).rstrip()

    lines += ["", fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in body]
    lines.append("(Referable: a grade that refers, or the model's referable-DR score at or above its threshold, which can "
                 "refer a photo whose most likely grade is DR 0-1.)")
    for title, total, reasons in (
        ("Rejected", summary.rejected, summary.rejected_reasons),
        ("Failed", summary.failed, summary.failed_reasons),
    ):
        lines += ["", f"{title}: {total}"]
        lines += [f"  {n:>6}  {code_text(reason)}" for reason, n in reasons.items()]
    lines += ["", f"Files dropped: {sum(summary.drops.values())} "
              f"({', '.join(f'{outcome} {n}' for outcome, n in summary.drops.items())})"]
    if summary.incidents:
        lines += ["", "Repaired or retried:"]
        lines += [f"  {n:>6}  {code_text(code)}" for code, n in summary.incidents.items()]
    rate = summary.ungradable_rate
    lines += ["", f"Ungradable: {summary.ungradable} of {summary.assessed} photos assessed"
              + (f" ({rate:.1%})" if rate is not None else "")]
    if summary.ungradable_by_day:
        lines.append(f"  {'day':<10}  {'device':<16}  {'assessed':>8}  {'ungradable':>10}  {'rate':>6}  {'eye mismatch':>12}  "
                     f"{'eye unconfirmed':>15}  reasons")
        for d in summary.ungradable_by_day:
            why = ", ".join(f"{r} {n}" for r, n in d.reasons.items())
            lines.append(f"  {d.day:<10}  {d.device[:16]:<16}  {d.assessed:>8}  {d.ungradable:>10}  "
                         f"{(d.rate or 0):>6.1%}  {d.eye_mismatches:>12}  {d.eyes_not_confirmed:>15}  {why}")
    if summary.visits is not None:
        lines += ["", *_visit_table(summary.visits)]
    if summary.agreement is not None:
        lines += ["", *_agreement_table(summary.agreement)]
        u = summary.agreement.model_ungradable
        lines += [f"Visits the model found wholly ungradable (not in the table above: no grade to compare; all model "
                  f"versions): {u.visits}; "
                  f"signed off {u.signed_off}, of which the grader graded an eye in {u.graded_by_grader} and referred "
                  f"{u.referred_by_grader}"]
    if summary.by_site:
        lines += ["", *_site_table(summary.by_site)]
    return "\n".join(lines) + "\n"


def _visit_table(v: VisitStats) -> list[str]:
    """Visits screened, by the recommendation standing now (their latest report version)."""
    share = f" ({v.share_set_by_grader:.1%})" if v.share_set_by_grader is not None else ""
    return [f"Visits screened (a photo graded or ungradable): {v.screened}; {v.scope}",
            "  by the recommendation standing (latest report version):",
            *(f"  {n:>6}  {_VISIT_LABELS[level]}" for level, n in v.by_recommendation.items()),
            f"  Standing recommendation set by a grader (reviewed version): {v.set_by_grader} of {v.screened}{share}"]


def _site_table(by_site: dict[str, SiteStats]) -> list[str]:
    """Graded images per site of the grading worker: one column per site."""
    labels = {"images": "Images graded", "referable": "Referable", "reported": "Reported images",
              "awaiting_report": "Awaiting report", **{f"turnaround_p{q}_s": f"Turnaround p{q}" for q in PERCENTILES}}
    headers = ["By site", *by_site]
    body = [[label, *(_fmt_seconds(getattr(st, key)) if key.startswith("turnaround") else str(getattr(st, key))
                      for st in by_site.values())] for key, label in labels.items()]
    widths = [max(len(r[j]) for r in [headers, *body]) for j in range(len(headers))]

    def fmt(r: list[str]) -> str:
        return "  ".join(r[0].ljust(widths[0]) if j == 0 else r[j].rjust(widths[j]) for j in range(len(r))).rstrip()

    return [fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


_AGREEMENT_LABELS = {
    "visits_graded": "Visits graded", "visits_reviewed": "Visits reviewed (sign-off current)",
    "visits_reopened": "Visits reopened (photo after sign-off)", "share_reviewed": "Share reviewed (current)",
    "visits_corrected": "Visits corrected (of all signed off)", "eyes_compared": "Eyes compared (all signed off)",
    "eyes_ungradable": "Eyes ungradable (grader)", "eyes_model_ungradable": "Eyes ungradable (model)",
    "dr_kappa": "DR kappa (quadratic)", "dr_exact_agreement": "DR exact agreement",
    "dme_kappa": "DME kappa (quadratic)", "dme_exact_agreement": "DME exact agreement",
    "referral_true_pos": "Referral: both refer", "referral_false_pos": "Referral: model only",
    "referral_false_neg": "Referral: grader only", "referral_true_neg": "Referral: neither",
    "referral_sensitivity": "Referral sensitivity", "referral_specificity": "Referral specificity",
    "visits_ungradable": "Visits ungradable (grader)", "review_time_n": "Visits timed",
    "review_time_p50_s": "Report to review, median",
}


def _agreement_table(agreement: AgreementSummary) -> list[str]:
    """Model versus grader: one column per model version and per reviewer, beside the pooled one."""
    cols = list(agreement_groups(agreement))
    headers = ["Model vs grader", *(f"{r} (reviewer)" if r else m for m, r, _ in cols)]

    def fmt_value(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if key == "review_time_p50_s":
            return _fmt_seconds(v)
        if key.startswith("share") or key.endswith(("agreement", "sensitivity", "specificity")):
            return f"{100 * v:.1f}%"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    body = [[label, *(fmt_value(key, getattr(s, key)) for _, _, s in cols)] for key, label in _AGREEMENT_LABELS.items()]
    widths = [max(len(r[j]) for r in [headers, *body]) for j in range(len(headers))]

    def fmt(r: list[str]) -> str:
        return "  ".join(r[0].ljust(widths[0]) if j == 0 else r[j].rjust(widths[j]) for j in range(len(r))).rstrip()

    return [fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


__all__ = [
    "ALL",
    "CSV_FIELDS",
    "AgreementStats",
    "AgreementSummary",
    "AuditSummary",
    "ModelStats",
    "SiteStats",
    "UngradableDay",
    "VisitStats",
    "audit_summary",
    "format_table",
    "model_versions",
    "percentile",
    "read_json",
    "reason_key",
    "summary_rows",
    "write_csv",
    "write_json",
]

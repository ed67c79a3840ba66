"""How often the model and the graders agree: the audit's answer to a clinical lead's first question.

For the visits in the audit's period (a visit counts when one of its graded photos arrived in the period; with
a model-version filter, when that photo was graded by that version). A visit whose every eye the model found
ungradable has no grade to compare and is not graded in the audit's sense: it is not in these statistics; its own
counts (:class:`ModelUngradableVisits`: how many, signed off, graded or referred by their grader) stand beside them.

* **reviewed**: a visit whose current sign-off covers it as it is now, by the review queue's own rule
  (:attr:`screening.review.visits.Visit.awaiting_review`: an eye it did not answer for, or a photo graded after it
  was recorded, puts the visit back in the queue, "changed since sign-off"). Such a visit is **reopened**: it
  awaits review and is not counted as reviewed (``visits_reopened``, beside ``visits_reviewed``); **share
  reviewed** is visits reviewed / visits graded, so 1 - share is the share awaiting review, as the queue shows it
  now. A reopened visit's sign-off still answered for the photos it covered: it is compared with the model's
  results for those very photos (eyes, corrections, referral) like any other, so the comparisons are over the
  visits signed off, ``visits_reviewed + visits_reopened``;
* **DR agreement**: quadratic-weighted Cohen's kappa (:func:`quadratic_kappa`, from the confusion counts)
  between the model's DR grade and the grader's, over the eyes the grader found gradable, plus the share of exact
  agreement; the same for DME risk. Each eye is compared with the model's result for the very photo the grader reviewed; an eye whose photo
  the model found ungradable (the intake checks: no grade) is not in the kappas: it is counted as
  ``eyes_model_ungradable``, and as ``eyes_ungradable`` too when the grader agreed. ``eyes_ungradable`` is every
  eye the grader found ungradable, whether the model graded its photo or not;
* **referral**: sensitivity and specificity of the model's referral (``urgent``/``soon``/``routine`` =
  refer, as shown to the grader) against the grader's; visits the grader could not grade (``ungradable``)
  are left out and counted;
* **time to review**: median seconds from the visit's first report (its draft) to its first sign-off.

Overall and per model version, the visit's **current** (latest) sign-off is compared. Per reviewer, each
reviewer's own latest sign-off of each visit they reviewed is compared (reviewed or reopened by whether that
sign-off covers the visit now), and their time to review is to their first sign-off of it; their
``share_reviewed`` is of all visits graded in the period. Per model version,
a visit counts for each version that graded one of its photos in the period (as the audit counts exams per
version; a visit graded by one version, the usual case, counts once); an eye for the version that graded it, and
an eye the model found ungradable (no version graded its photo) for the versions its visit counts for, as that
visit does. With one model version its column and the overall one are therefore the same.

It scales with the sign-offs, not with the photos: the visits graded in the period are counted in SQL (or
handed in by the audit, which has counted them already), and only the visits with a sign-off are read: their
sign-offs as rows, the model versions and first reports as columns, all filtered by one subquery (no id lists).
Whether a sign-off covers its visit now comes from the review queue's SQL prefilter; only the visits it names (and
a reviewer's sign-off that is no longer the current one) are read as outlines
(:class:`~screening.review.visits.VisitOutline`) and asked the rule. No visit is built as the review page shows it
(benchmarks/bench_agreement.py: 46 s before, about 5 s now, for 48,000 signed-off visits).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from screening.db import reviews as rrepo
from screening.db.models import Image, ImageState, Result, Review, ReviewEye, ReviewOutcome
from screening.db.reviews import SignOffRow
from screening.report import NO_GRADE_LEVELS, REFER_LEVELS
from screening.review.visits import IN_LIST_CHUNK, VisitOutline, load_outlines

ALL = "ALL"


@dataclass
class AgreementStats:
    group: str  # the model version, the reviewer's name, or ALL
    visits_graded: int = 0
    visits_reviewed: int = 0  # the current sign-off covers every photo (not back in the review queue)
    visits_reopened: int = 0  # signed off, then a photo was graded: awaiting review again (its sign-off is compared)
    share_reviewed: float | None = None
    visits_corrected: int = 0
    eyes_compared: int = 0  # gradable for the grader
    eyes_ungradable: int = 0  # the grader found the eye ungradable (whether the model graded it or not)
    eyes_model_ungradable: int = 0  # the model found the photo ungradable: no grade to compare
    dr_kappa: float | None = None  # quadratic weights
    dr_exact_agreement: float | None = None
    dme_kappa: float | None = None
    dme_exact_agreement: float | None = None
    referral_true_pos: int = 0
    referral_false_pos: int = 0
    referral_false_neg: int = 0
    referral_true_neg: int = 0
    referral_sensitivity: float | None = None
    referral_specificity: float | None = None
    visits_ungradable: int = 0  # the grader's referral says no grade could be given: not in sensitivity/specificity
    review_time_n: int = 0  # visits with both a report and a sign-off
    review_time_p50_s: float | None = None


@dataclass
class ModelUngradableVisits:
    """The visits left out of the comparison because the model found every photo of them ungradable (no grade to
    compare), and what their graders did: where the two disagree on gradability, a clinical lead wants to see it.
    Visits with a photo stored ungradable in the period and no graded photo at all; period-wide (no model version
    graded them)."""

    visits: int = 0
    signed_off: int = 0
    graded_by_grader: int = 0  # the current sign-off grades at least one eye (the grader found it gradable)
    referred_by_grader: int = 0  # the current sign-off refers to ophthalmology


@dataclass
class AgreementSummary:
    overall: AgreementStats
    by_model: dict[str, AgreementStats] = field(default_factory=dict)
    by_reviewer: dict[str, AgreementStats] = field(default_factory=dict)
    model_ungradable: ModelUngradableVisits = field(default_factory=ModelUngradableVisits)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgreementSummary:
        return cls(
            overall=AgreementStats(**d["overall"]),
            by_model={k: AgreementStats(**v) for k, v in d["by_model"].items()},
            by_reviewer={k: AgreementStats(**v) for k, v in d["by_reviewer"].items()},
            model_ungradable=ModelUngradableVisits(**d.get("model_ungradable", {})),  # absent in older exports
        )


@dataclass
class _Acc:
    """What one group collects before its statistics are computed."""

    visits: set[int] = field(default_factory=set)
    reviewed: set[int] = field(default_factory=set)  # the sign-off covers the visit as it is now
    reopened: set[int] = field(default_factory=set)  # a photo was graded after it: back in the review queue
    corrected: int = 0
    dr: Counter[tuple[int, int]] = field(default_factory=Counter)  # (model, grader) -> eyes
    dme: Counter[tuple[int, int]] = field(default_factory=Counter)
    ungradable_eyes: int = 0  # model graded the photo, the grader found it ungradable (per version: eye level)
    model_ungradable_eyes: int = 0
    both_ungradable_eyes: int = 0  # neither model nor grader could grade it (no version: visit level)
    referral: Counter[tuple[bool, bool]] = field(default_factory=Counter)  # (model refers, grader refers) -> visits
    no_grade_visits: int = 0
    waits: list[float] = field(default_factory=list)


def quadratic_kappa(counts: Mapping[tuple[int, int], int], labels: int) -> float | None:
    """Cohen's kappa with quadratic weights from a confusion table (``counts[(a, b)]``: items rater one put in
    class ``a`` and rater two in ``b``, classes ``0..labels-1``); None when undefined (no items, or both raters put
    every item in one and the same class). The same number as scikit-learn's ``cohen_kappa_score(...,
    weights="quadratic")`` (a test checks it), from the counts: the audit compares hundreds of thousands of eyes,
    and importing scikit-learn for it cost the command 1-2 s (up to 6 s on a busy machine) before the first row."""
    n = sum(counts.values())
    if n == 0:
        return None
    rows, cols = [0] * labels, [0] * labels
    for (a, b), k in counts.items():
        rows[a] += k
        cols[b] += k
    observed = sum(k * (a - b) ** 2 for (a, b), k in counts.items())
    expected = sum(rows[a] * cols[b] * (a - b) ** 2 for a in range(labels) for b in range(labels)) / n
    return None if expected == 0 else 1.0 - observed / expected


def _stats(group: str, acc: _Acc, visits_graded: int) -> AgreementStats:
    s = AgreementStats(group, visits_graded=visits_graded, visits_reviewed=len(acc.reviewed),
                       visits_reopened=len(acc.reopened), visits_corrected=acc.corrected)
    s.share_reviewed = len(acc.reviewed) / visits_graded if visits_graded else None
    eyes = sum(acc.dr.values())
    s.eyes_compared, s.eyes_ungradable = eyes, acc.ungradable_eyes + acc.both_ungradable_eyes
    s.eyes_model_ungradable = acc.model_ungradable_eyes
    s.dr_kappa, s.dme_kappa = quadratic_kappa(acc.dr, 5), quadratic_kappa(acc.dme, 3)
    if eyes:
        s.dr_exact_agreement = sum(k for (m, g), k in acc.dr.items() if m == g) / eyes
        s.dme_exact_agreement = sum(k for (m, g), k in acc.dme.items() if m == g) / sum(acc.dme.values())
    if acc.referral:
        tp, fp = acc.referral[(True, True)], acc.referral[(True, False)]
        fn, tn = acc.referral[(False, True)], acc.referral[(False, False)]
        s.referral_true_pos, s.referral_false_pos, s.referral_false_neg, s.referral_true_neg = tp, fp, fn, tn
        s.referral_sensitivity = tp / (tp + fn) if tp + fn else None
        s.referral_specificity = tn / (tn + fp) if tn + fp else None
    s.visits_ungradable = acc.no_grade_visits
    s.review_time_n = len(acc.waits)
    s.review_time_p50_s = statistics.median(acc.waits) if acc.waits else None
    return s


def _covers(visit: VisitOutline, review: SignOffRow) -> bool:
    """Whether ``review`` covers ``visit`` as it is now: the review queue's rule (:func:`screening.review.visits.covers`,
    as :attr:`~screening.review.visits.Visit.awaiting_review` asks it), asked of this sign-off (a reviewer's own latest
    one need not be the visit's current one)."""
    return visit.covered_by(review.created_at, ((e.image_id, e.eye) for e in review.eyes))


def _compare(acc: _Acc, covered: bool, review: SignOffRow, model_of: dict[int, tuple[int, int, str]],
             eye_acc: dict[str, _Acc] | None) -> None:
    """Add one sign-off's comparison with the model to ``acc`` (eyes also to their model version's ``eye_acc``):
    the visit counts as reviewed when the sign-off covers it now (``covered``: :func:`_covers`), else as
    reopened; either way its answers are compared with the model's results for the photos it answered for."""
    (acc.reviewed if covered else acc.reopened).add(review.exam_id)
    acc.corrected += review.outcome == ReviewOutcome.CORRECTED
    for e in review.eyes:
        graded = model_of.get(e.image_id)
        if graded is None:  # the model found this photo ungradable: nothing to compare the grader's grade with
            acc.model_ungradable_eyes += 1
            acc.both_ungradable_eyes += not e.gradable
            continue
        dr, dme, version = graded
        targets = [acc] if eye_acc is None else [acc, eye_acc.get(version) or eye_acc.setdefault(version, _Acc())]
        for t in targets:
            if e.gradable:
                assert e.dr_grade is not None and e.dme_grade is not None
                t.dr[(dr, e.dr_grade)] += 1
                t.dme[(dme, e.dme_grade)] += 1
            else:
                t.ungradable_eyes += 1
    if review.referral in NO_GRADE_LEVELS:
        acc.no_grade_visits += 1
    else:
        acc.referral[(review.model_referral in REFER_LEVELS, review.referral in REFER_LEVELS)] += 1


def _wait(first_report_at: datetime | None, review: SignOffRow) -> float | None:
    if first_report_at is None:
        return None
    return (review.reviewed_at - first_report_at).total_seconds()


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    """``ids`` a statement's worth at a time (PostgreSQL takes at most 65,535 parameters a statement)."""
    return (ids[k:k + IN_LIST_CHUNK] for k in range(0, len(ids), IN_LIST_CHUNK))


def _period_versions(session: Session, exams: rrepo.Exams, lo: datetime | None, hi: datetime | None,
                     model_version: str | None) -> dict[int, set[str]]:
    """Per visit of ``exams``, the model versions that graded a photo of it (one its report shows) received in
    ``[lo, hi)`` (only ``model_version``'s); a visit none graded in the period is absent."""
    out: dict[int, set[str]] = {}
    for exam_id, version in rrepo.graded_versions(session, exams, _photo_period(lo, hi, model_version)):
        out.setdefault(exam_id, set()).add(version)
    return out


def _coverage(session: Session, exams: rrepo.Exams, history: dict[int, list[SignOffRow]]) -> dict[int, bool]:
    """Per sign-off id that the comparison uses (each visit's current one, each reviewer's own latest one), whether it
    covers its visit as it is now (``history``: the sign-offs of each visit of ``exams``, oldest first). The review
    queue's SQL prefilter (``exams_maybe_awaiting_review``) settles most: a visit it does not name is covered by its
    current sign-off. Only the visits it names, and sign-offs that are not their visit's current one, are read as
    outlines and asked the rule (:func:`_covers`)."""
    maybe = set(rrepo.exams_maybe_awaiting_review(session, exams))
    out: dict[int, bool] = {}
    to_check: list[SignOffRow] = []
    for exam_id, reviews in history.items():
        latest_own = {r.reviewer: r for r in reviews}.values()  # oldest first: each reviewer's latest stays
        for r in latest_own:
            if r is reviews[-1] and exam_id not in maybe:
                out[r.id] = True
            else:
                to_check.append(r)
    outlines = {o.exam_id: o for o in load_outlines(session, {r.exam_id for r in to_check})}
    for r in to_check:
        out[r.id] = _covers(outlines[r.exam_id], r)
    return out


def _period(lo: datetime | None, hi: datetime | None, model_version: str | None,
            arrived: Any = Result.received_at) -> list[ColumnElement[bool]]:
    """The audit's period and model version as conditions: the result's arrival, or ``arrived`` (the photo's,
    ``Image.received_at``, for reads joined from the images)."""
    where: list[ColumnElement[bool]] = []
    if lo is not None:
        where.append(arrived >= lo)
    if hi is not None:
        where.append(arrived < hi)
    if model_version is not None:
        where.append(Result.model_version == model_version)
    return where


def _signed_in_period(lo: datetime | None, hi: datetime | None, model_version: str | None) -> Select[Any]:
    """The visits with a sign-off and a photo graded in ``[lo, hi)`` (by ``model_version``), as a query. Without
    dates it is driven by the sign-offs, each checked along ix_results_audit_exams (never a pass over the results);
    with dates by the period's photos (ix_images_received_at), each checked along ix_reviews_exam_id: a month of a
    signed-off year is a twelfth of the photos but every sign-off (3 s a read, on a year's database)."""
    if lo is None and hi is None:
        in_period = select(Result.id).where(Result.exam_id == Review.exam_id, Result.exam_id.is_not(None),
                                            *_period(lo, hi, model_version)).exists()
        return select(Review.exam_id).where(in_period).distinct()
    signed = select(Review.id).where(Review.exam_id == Image.exam_id).exists()
    return (select(Image.exam_id).join(Result, Result.image_id == Image.id)
            .where(Image.exam_id.is_not(None), signed, *_photo_period(lo, hi, model_version)).distinct())


def _photo_period(lo: datetime | None, hi: datetime | None, model_version: str | None) -> list[ColumnElement[bool]]:
    return _period(lo, hi, model_version, Image.received_at)


def visits_graded(session: Session, lo: datetime | None = None, hi: datetime | None = None,
                  model_version: str | None = None) -> dict[str | None, int]:
    """Visits with a photo graded in the period: pooled under None, and per model version that graded one."""
    where = [Result.exam_id.is_not(None), *_period(lo, hi, model_version)]
    pooled = select(Result.exam_id).where(*where).distinct().subquery()
    out: dict[str | None, int] = {None: int(session.scalar(select(func.count()).select_from(pooled)) or 0)}
    for version, n in session.execute(select(Result.model_version, func.count(Result.exam_id.distinct()))
                                      .where(*where).group_by(Result.model_version)).all():
        out[str(version)] = int(n)
    return out


def model_ungradable_visits(session: Session, lo: datetime | None = None, hi: datetime | None = None) -> ModelUngradableVisits:
    """:class:`ModelUngradableVisits` for the photos received in ``[lo, hi)``."""
    where: list[ColumnElement[bool]] = [
        Image.gradable.is_(False), Image.state.in_([ImageState.DONE.value, ImageState.REPORTED.value]),
        ~select(Result.id).where(Result.exam_id == Image.exam_id).exists()]
    if lo is not None:
        where.append(Image.received_at >= lo)
    if hi is not None:
        where.append(Image.received_at < hi)
    ids = sorted({e for e in session.scalars(select(Image.exam_id).where(*where)) if e is not None})
    out = ModelUngradableVisits(visits=len(ids))
    current: dict[int, SignOffRow] = {}
    for chunk in _chunks(ids):
        for r in rrepo.sign_off_rows(session, chunk):  # oldest first
            current[r.exam_id] = r  # the latest sign-off of each visit
    out.signed_off = len(current)
    out.graded_by_grader = sum(any(e.gradable for e in r.eyes) for r in current.values())
    out.referred_by_grader = sum(r.referral in REFER_LEVELS for r in current.values())
    return out


def agreement_summary(
    session: Session, lo: datetime | None = None, hi: datetime | None = None, model_version: str | None = None,
    graded: dict[str | None, int] | None = None,
) -> AgreementSummary:
    """Agreement statistics for visits with a photo received in ``[lo, hi)`` (UTC; None = open). ``graded``: the
    visits graded in the period as :func:`visits_graded` gives them, when the caller has counted them already."""
    if graded is None:
        graded = visits_graded(session, lo, hi, model_version)
    # driven by the sign-offs, each checked along ix_results_audit_exams: never a pass over the results. The reads
    # below filter by the signed-off visits' ids when they fit one statement (a month's), else by the subquery itself
    # (a year's would be hundreds of thousands of parameters, and expanding them cost more than the reads)
    signed_query = _signed_in_period(lo, hi, model_version)
    signed_ids = list(session.scalars(signed_query))
    signed: rrepo.Exams = signed_ids if len(signed_ids) <= IN_LIST_CHUNK else signed_query
    versions_of = _period_versions(session, signed, lo, hi, model_version)  # a photo its report shows, graded then
    per_visit: dict[int, list[SignOffRow]] = {}
    for r in rrepo.sign_off_rows(session, signed):  # oldest first
        if r.exam_id in versions_of:
            per_visit.setdefault(r.exam_id, []).append(r)
    first_reports = rrepo.first_report_times(session, signed)
    answered = select(ReviewEye.image_id).join(Review, Review.id == ReviewEye.review_id).where(Review.exam_id.in_(signed))
    model_of = {image_id: (dr, dme, version) for image_id, dr, dme, version in session.execute(
        select(Result.image_id, Result.dr_grade, Result.dme_grade, Result.model_version).where(Result.image_id.in_(answered)))}
    covered = _coverage(session, signed, per_visit)

    overall, eye_models, reviewers = _Acc(), {}, {}  # type: ignore[var-annotated]
    models: dict[str, _Acc] = {str(version): _Acc() for version in graded if version is not None}
    for exam_id, history in sorted(per_visit.items()):
        current, first, report_at = history[-1], history[0], first_reports.get(exam_id)
        groups_of_visit = [models.get(version) or models.setdefault(version, _Acc())
                           for version in sorted(versions_of[exam_id])]
        _compare(overall, covered[current.id], current, model_of, eye_models)
        for group in groups_of_visit:
            _compare(group, covered[current.id], current, model_of, None)
        if (w := _wait(report_at, first)) is not None:
            overall.waits.append(w)
            for group in groups_of_visit:
                group.waits.append(w)
        for name in dict.fromkeys(r.reviewer for r in history):
            own = [r for r in history if r.reviewer == name]
            acc = reviewers.get(name) or reviewers.setdefault(name, _Acc())
            _compare(acc, covered[own[-1].id], own[-1], model_of, None)
            if (w := _wait(report_at, own[0])) is not None:
                acc.waits.append(w)
    # per model version: visits with a photo it graded in the period, eyes by the version that graded them (an eye
    # no version graded, both_ungradable_eyes and model_ungradable_eyes, stays with its visit's versions)
    by_model = {}
    for version in sorted(set(models) | set(eye_models)):
        acc = models.get(version, _Acc())
        eyes = eye_models.get(version, _Acc())
        acc.dr, acc.dme, acc.ungradable_eyes = eyes.dr, eyes.dme, eyes.ungradable_eyes
        by_model[version] = _stats(version, acc, graded.get(version, 0))
    total = graded.get(None, 0)
    return AgreementSummary(
        overall=_stats(ALL if model_version is None else model_version, overall, total),
        by_model=by_model,
        by_reviewer={name: _stats(name, acc, total) for name, acc in sorted(reviewers.items())},
        model_ungradable=model_ungradable_visits(session, lo, hi),
    )


def stat_rows(s: AgreementStats) -> list[tuple[str, Any]]:
    """(key, value) rows of one group, in the order the audit prints them."""
    keys = [k for k in AgreementStats.__dataclass_fields__ if k != "group"]
    return [(k, getattr(s, k)) for k in keys]


def groups(summary: AgreementSummary) -> Iterable[tuple[str, str, AgreementStats]]:
    """(model version label, reviewer label, stats) for each column of the summary."""
    yield summary.overall.group, "", summary.overall
    for version, s in summary.by_model.items():
        yield version, "", s
    for name, s in summary.by_reviewer.items():
        yield summary.overall.group, name, s


__all__ = ["ALL", "AgreementStats", "AgreementSummary", "ModelUngradableVisits", "agreement_summary", "groups", "stat_rows", "visits_graded"]

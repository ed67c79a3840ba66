"""Terminal output of ``dr-screen review``: the queue, one visit, an import. Plain text, one owner for the
wording so that the commands themselves stay thin."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from screening.db.models import Report, Review
from screening.report import EYE_NAMES, REFERRAL_LEVELS
from screening.review.grading_csv import ImportOutcome
from screening.review.visits import GRADER_REFERRALS, Visit
from training.common import DME_GRADES, DR_GRADES


def _ago(at: datetime, now: datetime | None = None) -> str:
    s = ((now or datetime.now(timezone.utc)) - at).total_seconds()
    if s < 3600:
        return f"{max(s, 0) / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in [headers, *rows]) for j in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return [fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def format_queue(visits: Sequence[Visit], now: datetime | None = None, limit: int = 0) -> str:
    """The queue as a table; ``limit`` > 0 shows its first ``limit`` visits and says so (the count is the whole
    backlog's, never the shown rows')."""
    if not visits:
        return "No visits await review.\n"
    shown = visits[:limit] if limit > 0 else visits
    rows = []
    for v in shown:
        model = "; ".join(f"{e.eye} DR{e.finding.dr_grade} DME{e.finding.dme_grade}" if e.finding.gradable
                          else f"{e.eye} ungradable" for e in v.eyes)
        status = (f"changed since sign-off ({REFERRAL_LEVELS[v.current_review.referral].text})" if v.current_review
                  else ("report pending" if v.first_report_at is None else ""))
        status = "; ".join([*filter(None, [status]), *(c.note for c in v.cautions)])
        rows.append([str(v.exam_id), v.patient_code, v.exam_date.isoformat(), model, REFERRAL_LEVELS[v.model_referral.level].text,
                     _ago(v.ready_at, now), status])
    showing = f"; the first {len(shown)} shown" if len(shown) < len(visits) else ""
    lines = [f"{len(visits)} visit(s) await review (the model's referrals first, or a reopened sign-off's when more "
             f"urgent; then oldest first{showing}):", ""]
    lines += _table(["visit", "patient", "exam date", "model grades", "model's recommendation", "waiting", "note"], rows)
    return "\n".join(lines) + "\n"


def _answer(review: Review) -> str:
    parts = []
    for e in review.eyes:
        if not e.gradable:
            parts.append(f"{EYE_NAMES[e.eye]}: ungradable")
        else:
            parts.append(f"{EYE_NAMES[e.eye]}: DR {e.dr_grade}, DME {e.dme_grade}")
    return "; ".join(parts)


def format_review(review: Review) -> str:
    when = review.reviewed_at.strftime("%Y-%m-%d %H:%M UTC")
    text = (f"review {review.id}: {review.outcome} by {review.reviewer} on {when} ({review.source}); "
            f"{_answer(review)}; referral: {REFERRAL_LEVELS[review.referral].text}")
    return text + (f"; comment: {review.comment}" if review.comment else "")


def format_visit(visit: Visit, history: Sequence[Review], reports: Sequence[Report]) -> str:
    lines = [f"Visit {visit.exam_id}: patient {visit.patient_code}, exam {visit.exam_date.isoformat()}",
             "status: " + ("awaiting review" if visit.awaiting_review else "signed off"),
             *([f"note: {visit.filing_note}"] if visit.filing_note else []),
             *(f"caution ({c.note}): {c.text}" for c in visit.cautions), ""]
    for e in visit.eyes:
        f = e.finding
        for k, fld in enumerate(e.fields, start=1):
            tag = " <- the eye's result" if fld is e.result and len(e.fields) > 1 else ""
            answer = (f"model {fld.model_version}: DR {fld.finding.dr_grade}, DME {fld.finding.dme_grade}" if fld.finding.gradable
                      else f"ungradable ({fld.finding.short_reasons}), not graded")
            lines.append(f"{e.name} field {k} of {len(e.fields)}: image {fld.image_id}, {fld.source_name}, {answer}{tag}")
            for note in (fld.finding.filing_note, fld.finding.eye_note):
                if note:
                    lines.append(f"  {note}")
        lines.append(f"{e.name}, the model's answer for the eye:")
        if not f.gradable or f.dr_grade is None or f.dme_grade is None:
            lines.append(f"  ungradable: {f.short_reasons}")
            continue
        lines.append(f"  DR grade  {f.dr_grade} {DR_GRADES[f.dr_grade]} ({f.dr_confidence:.0%})")
        lines.append(f"  DME risk  {f.dme_grade} {DME_GRADES[f.dme_grade]} ({f.dme_confidence:.0%})")
        lines.append(f"  referable {'yes' if f.referable else 'no'} (score {f.referable_score:.0%})")
    r = visit.model_referral
    # the level's key is what --referral takes; in brackets after the text it read "(routine) (routine)"
    key = f" [--referral {r.level}]" if r.level in GRADER_REFERRALS else ""  # only a key --referral takes
    lines += ["", f"model's recommendation: {r.text}{key} - {r.reason}", ""]
    lines.append("sign-offs (newest first):" if history else "sign-offs: none yet")
    lines += [f"  {format_review(h)}" for h in history]
    lines.append("")
    lines.append("reports (newest first):" if reports else "reports: none yet")
    lines += [f"  v{rp.version} {rp.created_at:%Y-%m-%d %H:%M} UTC {'reviewed (review ' + str(rp.review_id) + ')' if rp.review_id else 'draft'}: {rp.path}"
              for rp in reports]
    return "\n".join(lines) + "\n"


def format_import(outcome: ImportOutcome, dry_run: bool) -> str:
    lines = [f"warning: {w}" for w in outcome.warnings]
    verb = "would record" if dry_run else "recorded"
    for v in outcome.visits:
        where = f"line{'s' if len(v.lines) > 1 else ''} {', '.join(map(str, v.lines))}: visit {v.exam_id} ({v.patient}, {v.exam_date})"
        if v.review is None:
            lines.append(f"{where}: unchanged, already signed off the same way; skipped")
        else:
            lines.append(f"{where}: {verb} {v.review.outcome}, referral {v.review.referral}, by {v.review.reviewer}")
    recorded = sum(not v.skipped for v in outcome.visits)
    if outcome.errors:
        lines.append(f"{len(outcome.errors)} error(s); nothing was recorded:" if not dry_run else f"{len(outcome.errors)} error(s):")
    elif dry_run:
        lines.append(f"dry run: {recorded} sign-off(s) would be recorded, {len(outcome.visits) - recorded} skipped; nothing was written")
    else:
        lines.append(f"{recorded} sign-off(s) recorded, {len(outcome.visits) - recorded} skipped")
    return "\n".join(lines) + "\n"


__all__ = ["format_import", "format_queue", "format_review", "format_visit"]

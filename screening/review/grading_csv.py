"""Bulk import of a grading centre's results: one CSV line per eye, recorded as one sign-off per visit.

Columns (a header line names them, in any order, any case; other columns are ignored with a warning):

=============  ========  ==========================================================================
column         required  value
=============  ========  ==========================================================================
patient        yes       the patient id as in the photo's file name
eye            yes       ``R``/``L``, ``OD``/``OS`` or ``right``/``left``
date           yes       the exam date, ``YYYY-MM-DD`` or ``YYYYMMDD``
dr_grade       yes       ICDR grade 0-4, or ``U`` (ungradable); empty when ``gradable`` is ``no``
dme_grade      yes       DME risk 0-2, or ``U``; empty when ``gradable`` is ``no``
gradable       no        ``yes``/``no`` (default ``yes``)
referral       no        ``urgent``, ``soon``, ``routine``, ``refer_ungradable``, ``ungradable``, ``rescreen_12``, ``rescreen_24``;
                         empty: the referral the grades imply (worse-eye rule)
reviewer       no        the grader's name (default: ``--reviewer``)
reviewed_at    no        when it was graded, ``YYYY-MM-DD`` (00:00 UTC) or ISO date-time (UTC unless it has
                         an offset); default: the time of the import
comment        no        free text; the comments of a visit's lines are joined
=============  ========  ==========================================================================

Every line is checked and every problem is reported as ``line N, column 'x': what is wrong``; the import is
all or nothing (a file with any error records nothing). A dry run goes through exactly the same steps,
sign-off rules included, and then rolls back. A visit whose current sign-off already says the same (same
answers, referral and reviewer) is skipped, so importing a file twice records it once.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from screening.db.models import Exam, Patient, Review, ReviewSource
from screening.intake import normalise_eye, parse_exam_date
from screening.report import EYE_NAMES, EyeResultRule, EyeReview, UngradableRule
from screening.review.visits import (
    COMMENT_MAX_CHARS,
    GRADER_REFERRALS,
    REVIEWER_MAX_CHARS,
    ReviewError,
    answers_of,
    clean_text,
    load_visit,
    referral_from_answers,
    sign_off,
)

REQUIRED_COLUMNS = ("patient", "eye", "date", "dr_grade", "dme_grade")
OPTIONAL_COLUMNS = ("gradable", "referral", "reviewer", "reviewed_at", "comment")
_YES = {"yes", "y", "true", "1"}
_NO = {"no", "n", "false", "0"}
_UNGRADABLE = {"u", "ungradable"}


@dataclass(frozen=True)
class LineError:
    line: int  # 1 = the header
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", column '{self.column}'" if self.column else "")
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class GradingLine:
    line: int
    patient: str
    exam_date: date
    answer: EyeReview
    referral: str | None
    reviewer: str | None
    reviewed_at: datetime | None
    comment: str | None


@dataclass
class ImportedVisit:
    exam_id: int
    patient: str
    exam_date: date
    lines: list[int]
    review: Review | None  # None: skipped, the current sign-off already says the same

    @property
    def skipped(self) -> bool:
        return self.review is None


@dataclass
class ImportOutcome:
    visits: list[ImportedVisit] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ------------------------------------------------------------------------------------------------ parsing


def _grade(raw: str, column: str, top: int, line: int, errors: list[LineError]) -> int | str | None:
    """An int in 0..top, 'U' for ungradable, None for empty; an error (and None) otherwise."""
    value = raw.strip()
    if not value:
        return None
    if value.lower() in _UNGRADABLE:
        return "U"
    if value.isdigit() and 0 <= int(value) <= top:
        return int(value)
    errors.append(LineError(line, column, f"{value!r} is not a grade: write 0-{top}, or U when the eye is ungradable"))
    return None


def _reviewed_at(raw: str, line: int, errors: list[LineError]) -> datetime | None:
    value = raw.strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        errors.append(LineError(line, "reviewed_at", f"{value!r} is not a date (YYYY-MM-DD) or ISO date-time (YYYY-MM-DDTHH:MM)"))
        return None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def _parse_line(n: int, row: dict[str, str], default_reviewer: str | None, errors: list[LineError]) -> GradingLine | None:
    before = len(errors)

    def get(column: str) -> str:
        return (row.get(column) or "").strip()

    patient = get("patient")
    if not patient:
        errors.append(LineError(n, "patient", "empty: give the patient id as in the photo's file name"))
    eye = normalise_eye(get("eye"))
    if eye is None:
        errors.append(LineError(n, "eye", f"{get('eye')!r} is not an eye: write R or L (RE/LE, OD/OS, right/left)"))
    exam_date = parse_exam_date(get("date"))
    if exam_date is None:
        errors.append(LineError(n, "date", f"{get('date')!r} is not an exam date: write YYYY-MM-DD"))
    dr = _grade(get("dr_grade"), "dr_grade", 4, n, errors)
    dme = _grade(get("dme_grade"), "dme_grade", 2, n, errors)
    gradable_raw = get("gradable").lower()
    if gradable_raw and gradable_raw not in _YES | _NO:
        errors.append(LineError(n, "gradable", f"{get('gradable')!r}: write yes or no"))
    if gradable_raw in _NO or (not gradable_raw and "U" in (dr, dme)):
        gradable = False
        for col, value in (("dr_grade", dr), ("dme_grade", dme)):
            if isinstance(value, int):
                errors.append(LineError(n, col, f"a grade ({value}) is given for an eye marked ungradable; leave it empty"))
    else:
        gradable = True
        for col, value in (("dr_grade", dr), ("dme_grade", dme)):
            if value is None and not get(col):
                errors.append(LineError(n, col, "empty: give the grade, or write U (or gradable = no) for an ungradable eye"))
            elif value == "U" and gradable_raw:
                errors.append(LineError(n, col, "U (ungradable) contradicts gradable = yes"))
    referral = get("referral").lower() or None
    if referral is not None and referral not in GRADER_REFERRALS:
        errors.append(LineError(n, "referral", f"{get('referral')!r} is not a referral outcome; write one of "
                                               f"{', '.join(GRADER_REFERRALS)}, or leave it empty to follow the grades"))
    reviewer = comment = None
    try:
        reviewer = clean_text(get("reviewer") or default_reviewer, "the reviewer's name", REVIEWER_MAX_CHARS, required=False)
    except ReviewError as exc:
        errors.append(LineError(n, "reviewer", str(exc)))
    try:
        comment = clean_text(get("comment"), "the comment", COMMENT_MAX_CHARS, required=False, multiline=True)
    except ReviewError as exc:
        errors.append(LineError(n, "comment", str(exc)))
    reviewed_at = _reviewed_at(get("reviewed_at"), n, errors)
    if len(errors) > before:
        return None
    assert eye is not None and exam_date is not None
    if gradable:
        assert isinstance(dr, int) and isinstance(dme, int)  # checked above: both given, neither 'U'
        answer = EyeReview(eye, True, dr, dme)
    else:
        answer = EyeReview(eye, False, None, None)
    return GradingLine(n, patient, exam_date, answer, referral, reviewer, reviewed_at, comment)


def read_grading_csv(path: Path, default_reviewer: str | None = None) -> tuple[list[GradingLine], list[LineError], list[str]]:
    """Parse and check every line (no database): the lines that are valid, the errors, warnings."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return [], [LineError(1, None, f"{path} is not UTF-8 text: save it from the spreadsheet as 'CSV UTF-8'")], []
    except OSError as exc:
        return [], [LineError(0, None, f"cannot read {path}: {exc.strerror}")], []
    first = text.splitlines()[0] if text.strip() else ""
    if not first:
        return [], [LineError(1, None, f"{path} is empty; expected a header line naming {', '.join(REQUIRED_COLUMNS)}")], []
    delimiter = max(",;\t", key=first.count)  # spreadsheets in some locales write ';'
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    errors: list[LineError] = []
    warnings: list[str] = []
    if missing := [c for c in REQUIRED_COLUMNS if c not in header]:
        return [], [LineError(1, None, f"missing column(s) {', '.join(missing)}; the header must name "
                                       f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})")], []
    if dupes := sorted({h for h in header if header.count(h) > 1}):
        return [], [LineError(1, None, f"column(s) {', '.join(dupes)} appear more than once")], []
    if unknown := [h for h in header if h and h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]:
        warnings.append(f"column(s) {', '.join(unknown)} are not used and were ignored")
    lines: list[GradingLine] = []
    start = 2
    for row in reader:
        n, start = start, reader.line_num + 1  # the line the record starts on (a quoted field may span lines)
        if None in row:
            errors.append(LineError(n, None, f"{len(row[None])} more value(s) than the header has columns"))
            continue
        if not any((v or "").strip() for v in row.values()):
            continue
        parsed = _parse_line(n, row, default_reviewer, errors)
        if parsed is not None:
            lines.append(parsed)
    if not lines and not errors:
        errors.append(LineError(1, None, "no grading lines below the header"))
    return lines, errors, warnings


# ------------------------------------------------------------------------------------------------ import


def _group(lines: Sequence[GradingLine], errors: list[LineError]) -> dict[tuple[str, date], list[GradingLine]]:
    groups: dict[tuple[str, date], list[GradingLine]] = {}
    for ln in lines:
        group = groups.setdefault((ln.patient, ln.exam_date), [])
        if clash := next((g for g in group if g.answer.eye == ln.answer.eye), None):
            errors.append(LineError(ln.line, "eye", f"the {EYE_NAMES[ln.answer.eye].lower()} of this visit is already on line {clash.line}"))
            continue
        first = group[0] if group else None
        if first is not None:
            for column in ("referral", "reviewer", "reviewed_at"):
                a, b = getattr(first, column), getattr(ln, column)
                if b is not None and a is not None and a != b:
                    errors.append(LineError(ln.line, column, f"differs from line {first.line} of the same visit ({a} vs {b}); "
                                                             "a visit has one sign-off"))
        group.append(ln)
    return groups


def _same_as_current(review: Review | None, answers: tuple[EyeReview, ...], referral: str, reviewer: str) -> bool:
    return (review is not None and review.referral == referral and review.reviewer == reviewer
            and set(answers_of(review)) == set(answers))


def import_grading(
    session: Session, lines: Sequence[GradingLine], *, source: str = ReviewSource.IMPORT.value, rule: EyeResultRule = "worst",
    ungradable_rule: UngradableRule = "recall",
) -> ImportOutcome:
    """Record one sign-off per visit in ``lines`` (flushes only). The caller commits when ``outcome.ok``
    and this is not a dry run, and rolls back otherwise. ``rule``: the worker's ``[screening] eye_result``,
    ``ungradable_rule`` its ``[screening] ungradable_rule``."""
    out = ImportOutcome()
    groups = _group(lines, out.errors)
    for (patient, exam_date), group in groups.items():
        first = group[0]
        exam = session.scalars(
            select(Exam).join(Patient, Patient.id == Exam.patient_id).where(Patient.code == patient, Exam.exam_date == exam_date)
        ).one_or_none()
        if exam is None:
            known = session.scalars(select(Patient.id).where(Patient.code == patient)).first() is not None
            column, why = ("date", f"patient {patient!r} has no visit on {exam_date}") if known else (
                "patient", f"no patient {patient!r} in the database (check the id as written in the photo's file name)")
            out.errors.append(LineError(first.line, column, why))
            continue
        try:
            visit = load_visit(session, exam.id, rule, ungradable_rule)
        except ReviewError as exc:
            out.errors.append(LineError(first.line, None, str(exc)))
            continue
        for ln in group:
            if visit.eye(ln.answer.eye) is None:
                out.errors.append(LineError(ln.line, "eye", f"the visit has no graded photo of the {EYE_NAMES[ln.answer.eye].lower()}"))
        if missing := [e for e in visit.eyes if all(ln.answer.eye != e.eye for ln in group)]:
            names = " and ".join(e.name.lower() for e in missing)
            out.errors.append(LineError(first.line, None, f"the visit of {patient} on {exam_date} also has a graded photo of the "
                                                          f"{names}; add a line for it (gradable = no if it could not be graded)"))
        if any(e.line in {ln.line for ln in group} for e in out.errors):
            continue
        answers = tuple(sorted((ln.answer for ln in group), key=lambda a: a.eye, reverse=True))
        referral = next((ln.referral for ln in group if ln.referral), None)
        reviewer = next((ln.reviewer for ln in group if ln.reviewer), None)
        if reviewer is None:
            out.errors.append(LineError(first.line, "reviewer", "empty on every line of this visit, and no --reviewer was "
                                                                "given: say who graded it"))
            continue
        reviewed_at = next((ln.reviewed_at for ln in group if ln.reviewed_at), None)
        comments = [ln.comment for ln in group if ln.comment]
        if len(joined := "; ".join(comments)) > COMMENT_MAX_CHARS:  # each line's own length was checked as it was read
            where = [ln.line for ln in group if ln.comment]
            out.errors.append(LineError(where[-1], "comment", f"the comments on lines {', '.join(map(str, where))} of this "
                                        f"visit make {len(joined)} characters together (a visit has one sign-off, "
                                        f"one comment); at most {COMMENT_MAX_CHARS} are kept: shorten them"))
            continue
        if _same_as_current(visit.current_review, answers, referral or referral_from_answers(answers), reviewer) and not visit.awaiting_review:
            out.visits.append(ImportedVisit(exam.id, patient, exam_date, [ln.line for ln in group], None))
            continue
        try:
            review = sign_off(session, exam.id, reviewer=reviewer, source=source, answers=answers, referral=referral, rule=rule,
                               ungradable_rule=ungradable_rule,
                              comment="; ".join(comments) or None, reviewed_at=reviewed_at)
        except ReviewError as exc:  # on the line that gave the value at fault, where the error names its column
            line = next((ln.line for ln in group if exc.column and getattr(ln, exc.column, None) is not None), first.line)
            out.errors.append(LineError(line, exc.column, str(exc)))
            continue
        out.visits.append(ImportedVisit(exam.id, patient, exam_date, [ln.line for ln in group], review))
    out.errors.sort(key=lambda e: (e.line, e.column or ""))
    return out


__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "GradingLine",
    "ImportOutcome",
    "ImportedVisit",
    "LineError",
    "import_grading",
    "read_grading_csv",
]

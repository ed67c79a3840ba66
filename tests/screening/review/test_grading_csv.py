"""Bulk import of a grading centre's CSV: per-line errors, dry run, all or nothing, re-import."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from sqlalchemy import func, select

from screening.db import reviews as rrepo
from screening.db import session_scope
from screening.db.models import Review
from screening.review.grading_csv import import_grading, read_grading_csv

from .conftest import seed_visit

HEADER = "patient,eye,date,dr_grade,dme_grade,gradable,referral,reviewer,reviewed_at,comment\n"


@pytest.fixture
def visits(factory):
    with session_scope(factory) as s:
        both = seed_visit(s, "P1", {"R": (2, 0, True), "L": (0, 0, False)}, day=date(2025, 3, 3)).id
        right = seed_visit(s, "P2", {"R": (1, 0, False)}, day=date(2025, 3, 4)).id
    return {"P1": both, "P2": right}


def _write(tmp_path, text, name="grading.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def _run(factory, path, dry_run=False, reviewer=None):
    lines, errors, warnings = read_grading_csv(path, reviewer)
    session = factory()
    try:
        out = import_grading(session, lines)
        out.errors = errors + out.errors
        out.warnings = warnings + out.warnings
        if out.ok and not dry_run:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()
    return out


def _reviews(factory):
    with session_scope(factory) as s:
        return s.scalar(select(func.count()).select_from(Review))


def test_import_records_one_sign_off_per_visit(factory, visits, tmp_path):
    path = _write(tmp_path, HEADER
                  + "P1,OD,2025-03-03,3,0,,,Dr Grey,2025-03-05,beading\n"
                  + "P1,left,20250303,U,U,,,Dr Grey,,\n"
                  + "P2,R,2025-03-04,1,0,yes,routine,,2025-03-05T14:30:00+01:00,\"refer: \"\"cataract\"\"\"\n")
    out = _run(factory, path, reviewer="Grading Centre North")
    assert out.ok and out.warnings == [] and [v.lines for v in out.visits] == [[2, 3], [4]]
    with session_scope(factory) as s:
        p1 = rrepo.current_review(s, visits["P1"])
        assert (p1.outcome, p1.referral, p1.reviewer, p1.source, p1.comment) == ("corrected", "soon", "Dr Grey", "import", "beading")
        assert [(e.eye, e.gradable, e.dr_grade) for e in p1.eyes] == [("R", True, 3), ("L", False, None)]
        assert p1.reviewed_at == datetime(2025, 3, 5, tzinfo=timezone.utc)
        p2 = rrepo.current_review(s, visits["P2"])
        assert (p2.reviewer, p2.referral, p2.outcome) == ("Grading Centre North", "routine", "corrected")
        assert p2.reviewed_at == datetime(2025, 3, 5, 13, 30, tzinfo=timezone.utc) and p2.comment == 'refer: "cataract"'
    # the same file again: both visits already say so, nothing new is recorded
    again = _run(factory, path, reviewer="Grading Centre North")
    assert again.ok and [v.skipped for v in again.visits] == [True, True] and _reviews(factory) == 2


def test_dry_run_checks_everything_and_writes_nothing(factory, visits, tmp_path):
    path = _write(tmp_path, HEADER + "P2,R,2025-03-04,1,0,,,Dr Grey,,\n")
    out = _run(factory, path, dry_run=True)
    assert out.ok and out.visits[0].review.outcome == "confirmed"
    assert _reviews(factory) == 0


def test_every_bad_line_is_reported_with_line_and_column_and_nothing_is_recorded(factory, visits, tmp_path):
    path = _write(tmp_path, HEADER
                  + "P2,R,2025-03-04,1,0,,,Dr Grey,,\n"  # 2: fine on its own
                  + ",X,2025-13-01,7,,maybe,later,,yesterday,\n"  # 3: everything wrong
                  + "P1,R,2025-03-03,U,0,yes,,Dr Grey,,\n"  # 4: U contradicts gradable = yes
                  + "P1,L,2025-03-03,2,1,no,,Dr Grey,,\n"  # 5: grades on an ungradable eye
                  + "P9,R,2025-03-03,0,0,,,Dr Grey,,\n"  # 6: unknown patient
                  + "P2,R,2025-03-09,0,0,,,Dr Grey,,\n"  # 7: no visit that day
                  + "P2,L,2025-03-04,0,0,,,Dr Grey,,\n"  # 8: P2 has no left photo
                  + "P2,R,2025-03-04,0,0,,,Dr Grey,,\n"  # 9: P2's right eye again
                  + "P1,R,2025-03-03,2,0,,,Dr Grey,,,extra\n")  # 10: one value too many
    out = _run(factory, path)
    got = [str(e) for e in out.errors]
    expected = [
        "line 3, column 'date': '2025-13-01' is not an exam date: write YYYY-MM-DD",
        "line 3, column 'dme_grade': empty: give the grade, or write U (or gradable = no) for an ungradable eye",
        "line 3, column 'dr_grade': '7' is not a grade: write 0-4, or U when the eye is ungradable",
        "line 3, column 'eye': 'X' is not an eye: write R or L (RE/LE, OD/OS, right/left)",
        "line 3, column 'gradable': 'maybe': write yes or no",
        "line 3, column 'patient': empty: give the patient id as in the photo's file name",
        "line 3, column 'referral': 'later' is not a referral outcome; write one of urgent, soon, routine, refer_ungradable, ungradable, "
        "rescreen_12, rescreen_24, or leave it empty to follow the grades",
        "line 3, column 'reviewed_at': 'yesterday' is not a date (YYYY-MM-DD) or ISO date-time (YYYY-MM-DDTHH:MM)",
        "line 4, column 'dr_grade': U (ungradable) contradicts gradable = yes",
        "line 5, column 'dme_grade': a grade (1) is given for an eye marked ungradable; leave it empty",
        "line 5, column 'dr_grade': a grade (2) is given for an eye marked ungradable; leave it empty",
        "line 6, column 'patient': no patient 'P9' in the database (check the id as written in the photo's file name)",
        "line 7, column 'date': patient 'P2' has no visit on 2025-03-09",
        "line 8, column 'eye': the visit has no graded photo of the left eye",
        "line 9, column 'eye': the right eye of this visit is already on line 2",
        "line 10: 1 more value(s) than the header has columns",
    ]
    assert sorted(got) == sorted(expected)
    assert _reviews(factory) == 0  # the good line 2 is not recorded either: all or nothing


def test_a_visit_needs_a_line_for_each_graded_eye_one_referral_and_a_reviewer(factory, visits, tmp_path):
    out = _run(factory, _write(tmp_path, HEADER + "P1,R,2025-03-03,2,0,,,Dr Grey,,\n"))
    assert [str(e) for e in out.errors] == [
        "line 2: the visit of P1 on 2025-03-03 also has a graded photo of the left eye; add a line for it "
        "(gradable = no if it could not be graded)"]
    out = _run(factory, _write(tmp_path, HEADER + "P1,R,2025-03-03,2,0,,routine,Dr Grey,,\nP1,L,2025-03-03,0,0,,soon,Dr Abbot,,\n"))
    assert sorted(str(e) for e in out.errors) == [
        "line 3, column 'referral': differs from line 2 of the same visit (routine vs soon); a visit has one sign-off",
        "line 3, column 'reviewer': differs from line 2 of the same visit (Dr Grey vs Dr Abbot); a visit has one sign-off"]
    out = _run(factory, _write(tmp_path, HEADER + "P1,R,2025-03-03,4,0,,,Dr Grey,,\nP1,L,2025-03-03,0,0,,routine,,,\n"))
    assert [str(e) for e in out.errors] == [  # the sign-off rules apply to imports too, on the line that says it
        "line 3, column 'referral': the referral 'Refer to ophthalmology (routine)' is less urgent than the grades "
        "given imply ('Urgent referral (proliferative DR)'); choose the referral again, or let it follow the grades"]
    long = "x" * 1500  # each line's comment within the limit, the visit's one comment over it
    out = _run(factory, _write(tmp_path, HEADER + f"P1,R,2025-03-03,2,0,,,Dr Grey,,{long}\nP1,L,2025-03-03,0,0,,,,,{long}\n"))
    assert [str(e) for e in out.errors] == [
        "line 3, column 'comment': the comments on lines 2, 3 of this visit make 3002 characters together (a visit has "
        "one sign-off, one comment); at most 2000 are kept: shorten them"]
    out = _run(factory, _write(tmp_path, HEADER + "P2,R,2025-03-04,1,0,,,,,\n"))
    assert [str(e) for e in out.errors] == [
        "line 2, column 'reviewer': empty on every line of this visit, and no --reviewer was given: say who graded it"]
    assert _reviews(factory) == 0


def test_header_problems_and_spreadsheet_dialects(factory, visits, tmp_path):
    _, errors, _ = read_grading_csv(_write(tmp_path, "patient;eye;grade\nP1;R;2\n"))
    assert [str(e) for e in errors] == ["line 1: missing column(s) date, dr_grade, dme_grade; the header must name patient, "
                                        "eye, date, dr_grade, dme_grade (optional: gradable, referral, reviewer, reviewed_at, comment)"]
    _, errors, _ = read_grading_csv(_write(tmp_path, ""))
    assert "is empty" in str(errors[0])
    _, errors, _ = read_grading_csv(_write(tmp_path, "patient,eye,date,dr_grade,dme_grade\n"))
    assert str(errors[0]) == "line 1: no grading lines below the header"
    (tmp_path / "latin1.csv").write_bytes("patient,eye,date,dr_grade,dme_grade\nJos\xe9,R,2025-03-03,0,0\n".encode("latin-1"))
    _, errors, _ = read_grading_csv(tmp_path / "latin1.csv")
    assert "not UTF-8" in str(errors[0])
    # Excel in many locales: BOM, semicolons, upper-case headers, an extra column, blank lines
    path = _write(tmp_path, "PATIENT;Eye;Date;DR_grade;DME_grade;Site\n\nP2;R;2025-03-04;1;0;north\n", encoding="utf-8-sig")
    out = _run(factory, path, reviewer="Dr Grey")
    assert out.ok and out.warnings == ["column(s) site are not used and were ignored"]
    assert [v.review.outcome for v in out.visits] == ["confirmed"]

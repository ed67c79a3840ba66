"""Audit statistics on a small seeded database with hand-computed answers."""

from __future__ import annotations

import csv
import json
from datetime import date, datetime, timedelta, timezone

import pytest

from screening.audit import (
    AuditSummary,
    audit_summary,
    format_table,
    percentile,
    read_json,
    summary_rows,
    write_csv,
    write_json,
)
from screening.db import init_db, make_engine, make_session_factory, session_scope
from screening.db import repository as repo

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
DAY = date(2024, 5, 1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


_n = iter(range(1, 10_000))


def _image(s, exam, eye, received, *, state=None, error=None, result=None):
    sha = f"{next(_n):064x}"
    name = f"{exam.patient.code if exam else 'unknown'}_{eye}_{received:%Y%m%d}.jpg"
    img = repo.add_image(s, sha256=sha, source_name=name, exam=exam, eye=eye, received_at=received)
    repo.record_drop(s, sha256=sha, source_name=name, outcome="new", image=img, received_at=received)
    if result is not None:
        mv, dr, dme, referable, created = result
        repo.add_result(
            s, img, model_version=mv, checkpoint_sha256="c" * 64, dr_grade=dr, dr_probs=[0.2] * 5, dme_grade=dme,
            dme_probs=[1 / 3] * 3, referable_score=0.9 if referable else 0.1, referable=referable, created_at=created,
        )
        repo.set_state(s, img, "done")
    if state is not None:
        repo.set_state(s, img, state, error)
    return img


@pytest.fixture
def programme(factory):
    """A small programme on 2024-05-01 (and a day either side): visits graded by two model versions, duplicates,
    failures and rejections."""
    with session_scope(factory) as s:
        exam = lambda code, d=DAY: repo.get_or_create_exam(s, repo.get_or_create_patient(s, code), d)  # noqa: E731
        e1, e2, e3 = exam("P1"), exam("P2"), exam("P3")
        # model v1: exam 1 both eyes, reported at +100 s -> turnaround 100 s (L) and 90 s (R)
        _image(s, e1, "L", at(0), result=("v1", 2, 1, True, at(60)))
        _image(s, e1, "R", at(10), result=("v1", 0, 0, False, at(70)))
        repo.add_report(s, e1, "r/e1v1.pdf", "v1", created_at=at(100))
        # exam 2, reported at +1300 s -> 300 s; then the same file is dropped again
        dup_src = _image(s, e2, "L", at(1000), result=("v1", 4, 2, True, at(1010)))
        repo.add_report(s, e2, "r/e2v1.pdf", "v1", created_at=at(1300))
        repo.record_drop(s, sha256=dup_src.sha256, source_name="again.jpg", outcome="duplicate", image=dup_src, received_at=at(2000))
        # model v2: exam 3, left reported at +5015 s (15 s); right's result is newer than the report -> awaiting
        _image(s, e3, "L", at(5000), result=("v2", 1, 0, False, at(5010)))
        repo.add_report(s, e3, "r/e3v1.pdf", "v2", created_at=at(5015))
        _image(s, e3, "R", at(5020), result=("v2", 3, 0, True, at(5030)))
        # failures (no result): two OOM, one decode error; the OOM file is dropped again
        oom = _image(s, None, None, at(6000), state="failed", error="CUDA out of memory")
        repo.record_drop(s, sha256=oom.sha256, source_name="retry.jpg", outcome="duplicate", image=oom, received_at=at(6100))
        _image(s, None, None, at(6001), state="failed", error="CUDA out of memory")
        _image(s, None, None, at(6002), state="failed", error="decode error")
        # rejects: one rejected image with its rejected drop (counted once), three drops refused on arrival
        bad = repo.add_image(s, sha256="f" * 64, source_name="holiday.jpg", received_at=at(7000))
        repo.set_state(s, bad, "rejected", "unparseable file name")
        repo.record_drop(s, sha256="f" * 64, source_name="holiday.jpg", outcome="rejected", image=bad, reason="unparseable file name", received_at=at(7000))
        for i, reason in enumerate(["not an image", "not an image", None]):
            repo.record_drop(s, sha256=f"{i:064x}"[::-1], source_name=f"junk{i}.txt", outcome="rejected", reason=reason, received_at=at(7100 + i))
        # outside 2024-05-01 (UTC): a v1 result received the day before (never reported), a reject the day after
        _image(s, exam("P9", date(2024, 4, 30)), "L", T0 - timedelta(hours=9), result=("v1", 1, 0, False, T0 - timedelta(hours=8)))
        repo.record_drop(s, sha256="e" * 64, source_name="late.txt", outcome="rejected", reason="not an image", received_at=T0 + timedelta(days=1))
    return factory


def test_percentile_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([90, 100, 300], 50) == 100
    assert percentile([300, 100, 90], 90) == pytest.approx(260)
    assert percentile([15, 90, 100, 300], 50) == pytest.approx(95)


def test_summary_for_one_day(programme):
    with programme() as s:
        summary = audit_summary(s, DAY, DAY)
    v1, v2, all_ = summary.by_model["v1"], summary.by_model["v2"], summary.overall
    assert list(summary.by_model) == ["v1", "v2"]

    assert v1.images == 3
    assert v1.dr_grades == {0: 1, 1: 0, 2: 1, 3: 0, 4: 1}
    assert v1.dme_grades == {0: 1, 1: 1, 2: 1}
    assert (v1.referable, v1.not_referable, v1.exams, v1.referable_exams) == (2, 1, 2, 2)
    assert (v1.duplicates, v1.reported, v1.awaiting_report) == (1, 3, 0)
    assert v1.turnaround_p50_s == pytest.approx(100)
    assert v1.turnaround_p90_s == pytest.approx(260)
    assert v1.turnaround_p99_s == pytest.approx(296)

    assert v2.images == 2
    assert v2.dr_grades == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}
    assert v2.dme_grades == {0: 2, 1: 0, 2: 0}
    assert (v2.referable, v2.not_referable, v2.exams, v2.referable_exams) == (1, 1, 1, 1)
    assert (v2.duplicates, v2.reported, v2.awaiting_report) == (0, 1, 1)
    assert v2.turnaround_p50_s == v2.turnaround_p90_s == v2.turnaround_p99_s == pytest.approx(15)

    assert all_.model_version == "ALL"
    assert all_.images == 5 and all_.dr_grades == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}
    assert (all_.referable, all_.not_referable, all_.exams, all_.referable_exams) == (3, 2, 3, 3)
    assert all_.duplicates == summary.duplicates == 2  # includes the duplicate of the failed file
    assert all_.turnaround_p50_s == pytest.approx(95)
    assert all_.turnaround_p90_s == pytest.approx(240)
    assert all_.turnaround_p99_s == pytest.approx(294)

    assert summary.failed == 3
    assert summary.failed_reasons == {"CUDA out of memory": 2, "decode error": 1}
    assert summary.rejected == 4
    assert list(summary.rejected_reasons.items()) == [
        ("not an image", 2), ("(no reason given)", 1), ("unparseable file name", 1)
    ]


def test_date_range_and_model_filter(programme):
    with programme() as s:
        everything = audit_summary(s, None, None)
        assert everything.by_model["v1"].images == 4 and everything.by_model["v1"].awaiting_report == 1
        assert everything.rejected == 5 and everything.rejected_reasons["not an image"] == 3
        before = audit_summary(s, None, date(2024, 4, 30))
        assert before.overall.images == 1 and before.rejected == 0 and before.failed == 0
        assert before.overall.turnaround_p50_s is None
        after = audit_summary(s, date(2024, 5, 2), None)
        assert after.overall.images == 0 and after.by_model == {} and after.rejected == 1
        only_v2 = audit_summary(s, DAY, DAY, model_version="v2")
        assert list(only_v2.by_model) == ["v2"] and only_v2.overall.model_version == "v2"
        assert only_v2.overall.images == 2 and only_v2.overall.duplicates == 0
        assert only_v2.failed == 3 and only_v2.rejected == 4  # not model-specific
        with pytest.raises(ValueError):
            audit_summary(s, date(2024, 5, 2), DAY)


def test_json_round_trip(programme, tmp_path):
    with programme() as s:
        summary = audit_summary(s, DAY, DAY)
    path = write_json(summary, tmp_path / "audit.json")
    assert json.loads(path.read_text())["by_model"]["v1"]["dr_grades"]["4"] == 1
    back = read_json(path)
    assert isinstance(back, AuditSummary) and back == summary


def test_csv_round_trip(programme, tmp_path):
    with programme() as s:
        summary = audit_summary(s, DAY, DAY)
    path = write_csv(summary, tmp_path / "audit.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == summary_rows(summary)
    index = {(r["section"], r["model_version"], r["key"]): r["value"] for r in rows}
    assert index[("filter", "", "start")] == "2024-05-01"
    assert index[("dr_grade", "v1", "4")] == "1"
    assert index[("referral", "ALL", "referable")] == "3"
    assert float(index[("turnaround_s", "v1", "p90")]) == pytest.approx(260)
    assert index[("turnaround_s", "v2", "awaiting_report")] == "1"
    by_reason = {(r["section"], r["reason"]): (r["key"], r["value"]) for r in rows if r["reason"]}
    assert by_reason[("failed_reason", "CUDA out of memory")] == ("failed", "2")
    assert index[("rejected", "", "total")] == "4"


def test_format_table(programme):
    with programme() as s:
        text = format_table(audit_summary(s, DAY, DAY))
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("ALL"))
    assert header.split() == ["ALL", "v1", "v2"]
    assert next(line for line in lines if line.startswith("DR grade 4")).split()[-3:] == ["1", "1", "0"]
    assert next(line for line in lines if line.startswith("Turnaround p50")).split()[2:] == ["95", "s", "100", "s", "15", "s"]
    assert "Rejected: 4" in text and "Failed: 3" in text and "CUDA out of memory" in text


def test_every_reason_code_is_explained_where_the_audit_prints_it(programme):
    """The audit printed bare codes ("identity" beside "identity_conflict"): a manager-style check."""
    from screening.rejection import CODE_TEXT, FailReason, Incident, RejectReason, code_text

    assert {c for enum in (RejectReason, FailReason, Incident) for c in enum} <= set(CODE_TEXT)
    assert code_text("identity").startswith("identity (patient, eye or exam date missing or invalid")
    assert code_text("no_such_code") == "no_such_code"
    with programme() as s:
        summary = audit_summary(s, DAY, DAY)
    text = format_table(summary)
    for code in summary.rejected_reasons:
        assert code_text(code) in text


def _reference_summary(session, start, end, model_version):
    """The audit's definitions computed the slow, obvious way (every row in Python, turnaround from the
    reports themselves): what audit_summary gave before results carried their own copy (revision 0003_audit_columns_indexes)."""
    from sqlalchemy import select

    from screening.audit import ALL, ModelStats, percentile
    from screening.db.models import Drop, Image, Report, Result

    lo = None if start is None else datetime.combine(start, datetime.min.time(), tzinfo=timezone.utc)
    hi = None if end is None else datetime.combine(end + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc)
    inside = lambda t: (lo is None or t >= lo) and (hi is None or t < hi)  # noqa: E731
    reports = session.execute(select(Report.exam_id, Report.created_at)).all()
    rows = []
    for res, img in session.execute(select(Result, Image).join(Image, Image.id == Result.image_id)).all():
        if not inside(img.received_at) or (model_version is not None and res.model_version != model_version):
            continue
        first = min((at for e, at in reports if e == img.exam_id and at >= res.created_at), default=None)
        rows.append((res, img, None if first is None else (first - img.received_at).total_seconds()))
    dups = {}
    for drop, res in session.execute(select(Drop, Result).outerjoin(Result, Result.image_id == Drop.image_id)).all():
        if drop.outcome == "duplicate" and inside(drop.received_at):
            mv = None if res is None else res.model_version
            if model_version is None or mv == model_version:
                dups[mv] = dups.get(mv, 0) + 1

    def stats(name, subset, duplicates):
        st = ModelStats(name)
        for res, _img, _t in subset:
            st.images += 1
            st.dr_grades[res.dr_grade] += 1
            st.dme_grades[res.dme_grade] += 1
            st.referable += res.referable
            st.not_referable += not res.referable
        st.exams = len({img.exam_id for _, img, _ in subset if img.exam_id is not None})
        st.referable_exams = len({img.exam_id for res, img, _ in subset if img.exam_id is not None and res.referable})
        times = [t for _, _, t in subset if t is not None]
        st.reported, st.awaiting_report, st.duplicates = len(times), len(subset) - len(times), duplicates
        for q in (50, 90, 99):
            setattr(st, f"turnaround_p{q}_s", percentile(times, q))
        return st

    models = sorted({res.model_version for res, _, _ in rows} | {mv for mv in dups if mv is not None})
    by_model = {mv: stats(mv, [r for r in rows if r[0].model_version == mv], dups.get(mv, 0)) for mv in models}
    return stats(ALL if model_version is None else model_version, rows, sum(dups.values())), by_model


def _fields(stats):
    """A ModelStats as a dict, turnarounds to the microsecond (the reference sums floats in another order)."""
    from dataclasses import asdict

    return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(stats).items()}


def test_audit_matches_the_reference_definitions_on_random_data(factory):
    """A random programme (three models, late and out-of-order reports, re-gradings of the same exam on
    other days, duplicates) audited for several periods and models: every count and percentile equals the
    row-by-row reference, on each database."""
    import random

    from sqlalchemy import func, select

    from screening.db.models import Result

    rng = random.Random(7)
    base = datetime(2024, 6, 1, tzinfo=timezone.utc)
    with session_scope(factory) as s:
        exams = [repo.get_or_create_exam(s, repo.get_or_create_patient(s, f"R{i % 25}"), date(2024, 6, 1 + i // 25))
                 for i in range(60)]
        images = []
        for k in range(160):
            exam = rng.choice(exams)
            received = base + timedelta(days=rng.randrange(4), seconds=rng.randrange(86400))
            img = repo.add_image(s, sha256=f"{k + 1:064x}", source_name=f"r{k}.jpg", exam=exam, eye=rng.choice("LR"),
                                 received_at=received)
            if rng.random() < 0.9:
                repo.add_result(
                    s, img, model_version=rng.choice(["m1", "m2", "m3"]), checkpoint_sha256="c" * 64,
                    dr_grade=rng.randrange(5), dr_probs=[0.2] * 5, dme_grade=rng.randrange(3), dme_probs=[1 / 3] * 3,
                    referable_score=0.5, referable=rng.random() < 0.4,
                    created_at=received + timedelta(seconds=rng.randrange(1, 600)),
                )
            images.append(img)
            if rng.random() < 0.3:  # a report for some exam, at a random time (sometimes before some results)
                version = repo.next_report_version(s, exam.id)
                repo.add_report(s, exam, f"r/{exam.id}/v{version}.pdf", "m", version=version,
                                created_at=received + timedelta(seconds=rng.randrange(-3600, 7200)))
        for _ in range(30):
            img = rng.choice(images)
            repo.record_drop(s, sha256=img.sha256, source_name="again.jpg", outcome="duplicate", image=img,
                             received_at=base + timedelta(days=rng.randrange(4), seconds=rng.randrange(86400)))
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Result).where(Result.turnaround_s.is_not(None))) > 20
    spans = [(None, None), (date(2024, 6, 2), date(2024, 6, 3)), (date(2024, 6, 4), None), (None, date(2024, 6, 1))]
    for start, end in spans:
        for model in (None, "m2"):
            with factory() as s:
                got = audit_summary(s, start, end, model)
                want_overall, want_by_model = _reference_summary(s, start, end, model)
            assert _fields(got.overall) == _fields(want_overall), (start, end, model)
            assert list(got.by_model) == list(want_by_model)
            for mv, want in want_by_model.items():
                assert _fields(got.by_model[mv]) == _fields(want), (start, end, model, mv)


# ------------------------------------------------------------------------------------ ungradable per day and device


def _checked(s, exam, eye, received, gradable, reasons=(), mismatch=False, device=None, confirmed=True):
    img = _image(s, exam, eye, received)
    img.device = device
    repo.record_checks(s, img, gradable=gradable, reasons=list(reasons), scores={"blurred": 0.9 if reasons else 0.01},
                       eye_source="name", predicted_eye="R" if mismatch else eye, eye_confidence=0.9 if confirmed else 0.6,
                       eye_mismatch=mismatch, eye_confirmed=confirmed and not mismatch)
    return img


@pytest.fixture
def checked(factory):
    """Gradability verdicts over two UTC days, grouped by the database (its own date()): SQLite and PostgreSQL."""
    with session_scope(factory) as s:
        e = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "Q1"), DAY)
        _checked(s, e, "L", at(0), True)
        _checked(s, e, "L", at(10), False, ["blurred", "haze"])
        _checked(s, e, "L", at(20), True, mismatch=True)
        _checked(s, e, "L", at(30), True, confirmed=False)  # the photo too unclear to check the name's eye
        _checked(s, e, "R", at(86_400), False, ["too_dark"])  # the next day
        _checked(s, e, "R", at(86_450), True, device="Topcon TRC-NW8")  # a DICOM photo names its camera
        _image(s, e, "R", at(86_500))  # recorded before the intake checks existed: not counted
    return factory


def test_ungradable_rate_per_day_and_device(checked):
    with session_scope(checked) as s:
        summary = audit_summary(s)
    assert (summary.assessed, summary.ungradable, summary.ungradable_rate) == (6, 2, pytest.approx(1 / 3))
    first, camera, second = summary.ungradable_by_day
    assert (camera.day, camera.device, camera.assessed, camera.ungradable, camera.rate) == ("2024-05-02", "Topcon TRC-NW8", 1, 0, 0.0)
    assert (first.day, first.device, first.assessed, first.ungradable, first.eye_mismatches) == ("2024-05-01", "unknown", 4, 1, 1)
    assert first.reasons == {"blurred": 1, "haze": 1} and first.rate == pytest.approx(1 / 4) and first.eyes_not_confirmed == 1
    assert (second.day, second.assessed, second.ungradable, second.reasons) == ("2024-05-02", 1, 1, {"too_dark": 1})
    with session_scope(checked) as s:
        assert audit_summary(s, DAY, DAY).ungradable_by_day == [first]


def test_the_csv_gives_day_device_and_reason_their_own_columns(checked, tmp_path):
    """Found in a staff-style check of the audit: the CSV packed day, device and metric into one key
    ("2026-12-02 Topcon TRC-NW8 assessed"), so a spreadsheet could not filter per device or per day. They are
    columns now, as in the JSON, and so is the reason of every per-reason row."""
    with session_scope(checked) as s:
        summary = audit_summary(s)
    with write_csv(summary, tmp_path / "a.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["section", "model_version", "key", "value", "reviewer", "site", "day", "device", "reason"]
        rows = list(reader)
    camera = [r for r in rows if r["device"] == "Topcon TRC-NW8"]
    assert {(r["section"], r["day"], r["key"], r["value"]) for r in camera} == {
        ("ungradable_by_day", "2024-05-02", "assessed", "1"), ("ungradable_by_day", "2024-05-02", "ungradable", "0"),
        ("ungradable_by_day", "2024-05-02", "rate", "0.0"), ("ungradable_by_day", "2024-05-02", "eye_mismatches", "0"),
        ("ungradable_by_day", "2024-05-02", "eyes_not_confirmed", "0")}
    first_day = {(r["section"], r["device"], r["reason"], r["key"]): r["value"] for r in rows if r["day"] == "2024-05-01"}
    assert first_day[("ungradable_by_day", "unknown", "", "assessed")] == "4"
    assert first_day[("ungradable_reason", "unknown", "haze", "ungradable")] == "1"
    assert all(r["key"] in {"assessed", "ungradable", "rate", "eye_mismatches", "eyes_not_confirmed"}
               for r in rows if r["section"] == "ungradable_by_day")


def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_written_as_text(factory, tmp_path):
    """A camera name comes from a DICOM tag, any printable text: in its own CSV column, '=HYPERLINK(...)' would be a
    live formula when staff open the file (review finding). Such cells start with an apostrophe; numbers do not."""
    with session_scope(factory) as s:
        e = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "Q3"), DAY)
        _checked(s, e, "R", at(10), True, device='=HYPERLINK("http://x","y")')
        _checked(s, e, "L", at(20), True, device="-1+1")
    with session_scope(factory) as s:
        summary = audit_summary(s)
    with write_csv(summary, tmp_path / "a.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    devices = {r["device"] for r in rows if r["device"]}
    assert devices == {"'=HYPERLINK(\"http://x\",\"y\")", "'-1+1"}
    assert all(not v.startswith(("=", "+", "@")) for r in rows for v in r.values() if v)
    assert any(r["value"] == "1" for r in rows if r["device"] == "'-1+1")  # counts stay numbers


def test_ungradable_days_split_at_utc_midnight(factory):
    """The database groups by the stored (naive UTC) arrival time's date: a photo a millisecond before midnight UTC
    and one at midnight fall on two days, on each database."""
    midnight = datetime(2024, 5, 2, tzinfo=timezone.utc)
    with session_scope(factory) as s:
        e = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "Q2"), DAY)
        _checked(s, e, "L", midnight - timedelta(milliseconds=1), False, ["blurred"])
        _checked(s, e, "R", midnight, True)
    with session_scope(factory) as s:
        days = audit_summary(s).ungradable_by_day
        assert [(d.day, d.assessed, d.ungradable, d.reasons) for d in days] == [
            ("2024-05-01", 1, 1, {"blurred": 1}), ("2024-05-02", 1, 0, {})]
        assert [d.day for d in audit_summary(s, date(2024, 5, 2), date(2024, 5, 2)).ungradable_by_day] == ["2024-05-02"]


def test_ungradable_rates_in_table_csv_and_json(checked, tmp_path):
    with session_scope(checked) as s:
        summary = audit_summary(s)
    table = format_table(summary)
    assert "Ungradable: 2 of 6 photos assessed (33.3%)" in table and "blurred 1, haze 1" in table
    assert "eye unconfirmed" in table
    rows = {(r["section"], r["day"], r["device"], r["reason"], r["key"]): r["value"] for r in summary_rows(summary)}
    assert rows[("gradability", "", "", "", "ungradable_rate")] == "0.333"
    assert rows[("ungradable_by_day", "2024-05-01", "unknown", "", "rate")] == "0.25"
    assert rows[("ungradable_by_day", "2024-05-01", "unknown", "", "eyes_not_confirmed")] == "1"
    assert rows[("ungradable_reason", "2024-05-02", "unknown", "too_dark", "ungradable")] == "1"
    back = read_json(write_json(summary, tmp_path / "a.json"))
    assert back.ungradable_by_day == summary.ungradable_by_day
    assert json.loads((tmp_path / "a.json").read_text())["ungradable_by_day"][0]["rate"] == pytest.approx(1 / 4)


def test_errors_group_by_code_and_every_drop_counts_once(tmp_path):
    """Messages name files and carry numbers: grouping by them split one cause into many rows (issue 12)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'codes.db'}")
    init_db(engine)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        for i in range(3):  # one cause, three different texts
            img = repo.add_image(s, sha256=f"{i + 1:064x}", source_name=f"P{i}_L.jpg", received_at=at(i))
            repo.record_drop(s, sha256=img.sha256, source_name=img.source_name, outcome="new", image=img, received_at=at(i))
            repo.set_state(s, img, "failed", f"processing failed (OperationalError: [SQL: UPDATE ... {i}])", code="storing_failed")
        for i, code in enumerate(["too_large", "too_large", "not_a_file"]):
            repo.record_drop(s, sha256=f"{i + 10:064x}", source_name=f"x{i}", outcome="rejected", reason=f"text {i}",
                             reason_code=code, received_at=at(100 + i))
        repo.record_drop(s, sha256=f"{1:064x}", source_name="again.jpg", outcome="duplicate", received_at=at(200))
        repo.add_event(s, "archive", "could not move", code="archive_failed", created_at=at(300))
        repo.add_event(s, "archive", "could not move", code="archive_failed", created_at=at(301))
        repo.add_event(s, "reconcile", "removed", code="orphan_report_removed", created_at=at(302))
        repo.add_event(s, "state", "no code", created_at=at(303))
    with factory() as s:
        summary = audit_summary(s, DAY, DAY)
    assert summary.failed_reasons == {"storing_failed": 3}
    assert summary.rejected_reasons == {"too_large": 2, "not_a_file": 1}
    assert summary.drops == {"new": 3, "duplicate": 1, "rejected": 3}
    assert summary.incidents == {"archive_failed": 2, "orphan_report_removed": 1}
    assert read_json(write_json(summary, tmp_path / "a.json")) == summary
    text = format_table(summary)
    assert "Files dropped: 7 (new 3, duplicate 1, rejected 3)" in text and "archive_failed" in text
    engine.dispose()


def test_every_refused_arrival_counts_with_its_own_reason_and_so_does_a_refused_page(factory):
    """The same bytes refused under three names are three refused files (each kept its own reason file); the
    audit counted the image once, under its last reason, beside "Files dropped ... rejected 3". A page refused
    inside a file whose other pages were graded counts too (its file's drop is "new")."""
    with session_scope(factory) as s:
        sha = "a" * 64
        img = repo.add_image(s, sha256=sha, source_name="photo 1.jpg", received_at=at(0))
        for i, (name, code) in enumerate([("photo 1.jpg", "identity"), ("C555_OD_20251120.jpg", "identity_conflict"),
                                          ("C556_OD_20251332.jpg", "identity")]):
            repo.set_state(s, img, "rejected", f"refused '{name}'", code=code)
            repo.record_drop(s, sha256=sha, source_name=name, outcome="rejected", image=img, reason=f"refused '{name}'",
                             reason_code=code, received_at=at(i))
        exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, "M1"), DAY)
        page1 = repo.add_image(s, sha256="b" * 64, source_name="M1_R.tif (page 1)", exam=exam, eye="R", page=1,
                               file_sha256="c" * 64, received_at=at(10))
        repo.add_image(s, sha256="d" * 64, source_name="M1_R.tif (page 2)", exam=exam, eye="R", page=2,
                       file_sha256="c" * 64, state="rejected", error="'M1_R.tif (page 2)' is not a fundus photo",
                       error_code="not_fundus", received_at=at(10))
        repo.record_drop(s, sha256="c" * 64, source_name="M1_R.tif", outcome="new", image=page1, received_at=at(10))
    with factory() as s:
        summary = audit_summary(s, DAY, DAY)
    assert summary.drops == {"new": 1, "duplicate": 0, "rejected": 3}
    assert summary.rejected == 4
    assert summary.rejected_reasons == {"identity": 2, "identity_conflict": 1, "not_fundus": 1}


def test_audit_groups_by_the_site_that_graded(factory, tmp_path):
    """Several workers writing one database (issue 15): --by-site counts each site's images, referrals and
    turnaround; results from before sites were recorded are '(no site)'; the pooled numbers are unchanged."""
    with session_scope(factory) as s:
        for k, (site, referable, report_after) in enumerate([("north", True, 100), ("north", False, 300),
                                                            ("south", True, 50), (None, False, None)]):
            exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, f"S{k}"), DAY)  # a visit each
            img = repo.add_image(s, sha256=f"{k + 1:064x}", source_name=f"S{k}_R.jpg", exam=exam, eye="R",
                                 received_at=at(10 * k))
            repo.add_result(s, img, model_version="m", checkpoint_sha256="c" * 64, dr_grade=0, dr_probs=[0.2] * 5,
                            dme_grade=0, dme_probs=[1 / 3] * 3, referable_score=0.5, referable=referable,
                            created_at=at(10 * k + 1), site=site)
            if report_after is not None:
                repo.add_report(s, exam, f"r{k}.pdf", "m", version=1, created_at=at(10 * k + report_after))
    with factory() as s:
        plain = audit_summary(s, DAY, DAY)
        summary = audit_summary(s, DAY, DAY, by_site=True)
    assert plain.by_site == {} and plain.overall == summary.overall and summary.overall.images == 4
    assert list(summary.by_site) == ["(no site)", "north", "south"]
    north, south, none = summary.by_site["north"], summary.by_site["south"], summary.by_site["(no site)"]
    assert (north.images, north.referable, north.reported, north.awaiting_report) == (2, 1, 2, 0)
    assert (north.turnaround_p50_s, south.turnaround_p50_s) == (200.0, 50.0)  # (100 + 300) / 2 and 50
    assert (none.images, none.reported, none.awaiting_report, none.turnaround_p50_s) == (1, 0, 1, None)
    assert read_json(write_json(summary, tmp_path / "a.json")) == summary
    site_rows = [r for r in summary_rows(summary) if r["section"] == "site"]
    assert {(r["site"], r["key"]): r["value"] for r in site_rows}[("south", "turnaround_p50_s")] == "50.0"
    table = format_table(summary)
    assert "By site" in table and next(line for line in table.splitlines() if line.startswith("Images graded")
                                       and "north" not in line)


# ------------------------------------------------------------------------------ visits by standing recommendation


def _stored(s, exam, eye, received, *, graded=True, referable=False):
    """A photo stored by the worker: graded (a result), or judged ungradable (no result), state 'done'."""
    if graded:
        return _image(s, exam, eye, received, result=("v1", 2 if referable else 0, 0, referable, received + timedelta(seconds=5)))
    img = _checked(s, exam, eye, received, False, ["blurred"])
    repo.set_state(s, img, "done")
    return img


@pytest.fixture
def visits(factory):
    """Visits on 2024-05-01 and 2024-05-02 with the recommendation each report version printed."""
    from screening.db.models import Review

    nxt = DAY + timedelta(days=1)
    with session_scope(factory) as s:
        exam = lambda code: repo.get_or_create_exam(s, repo.get_or_create_patient(s, code), DAY)  # noqa: E731
        # every photo ungradable: recalled (ungradable_rule "recall") and referred (ungradable_rule "refer")
        recall, refer = exam("U1"), exam("U2")
        for e, level in ((recall, "ungradable"), (refer, "refer_ungradable")):
            _stored(s, e, "R", at(0), graded=False)
            _stored(s, e, "L", at(5), graded=False)
            repo.add_report(s, e, f"r/{e.id}v1.pdf", "v1", created_at=at(60), referral_level=level)
        # the model's draft said routine; a grader's reviewed version said urgent: the grader's stands
        reviewed = exam("G1")
        _stored(s, reviewed, "R", at(100), referable=True)
        repo.add_report(s, reviewed, "r/g1v1.pdf", "v1", created_at=at(160), referral_level="routine")
        review = Review(exam_id=reviewed.id, reviewer="Dr A", source="cli", outcome="corrected", referral="urgent",
                        model_referral="routine", reviewed_at=at(200), created_at=at(200))
        s.add(review)
        s.flush()
        repo.add_report(s, reviewed, "r/g1v2.pdf", "v1", created_at=at(210), review_id=review.id, referral_level="urgent")
        # graded, no report yet
        waiting = exam("G2")
        _stored(s, waiting, "R", at(300))
        # reported before revision 0016: its level is not known
        old = exam("G3")
        _stored(s, old, "R", at(400))
        repo.add_report(s, old, "r/g3v1.pdf", "v1", created_at=at(460))
        # photos on two days: rescreen; counted once, in the day its first photo arrived
        two_days = exam("G4")
        _stored(s, two_days, "R", at(500))
        _stored(s, two_days, "L", at(86_400 + 500))
        repo.add_report(s, two_days, "r/g4v2.pdf", "v1", version=2, created_at=at(86_400 + 600), referral_level="rescreen_24")
        repo.add_report(s, two_days, "r/g4v1.pdf", "v1", version=1, created_at=at(600), referral_level="rescreen_24")
        # not screened: a photo still waiting for its checks, and a refused page of a visit
        pending = exam("N1")
        _image(s, pending, "R", at(700))
        repo.add_image(s, sha256="9" * 64, source_name="N1_R.tif (page 2)", exam=pending, eye="R", page=2,
                       file_sha256="8" * 64, state="rejected", error="not a fundus photo", error_code="not_fundus",
                       received_at=at(700))
    assert nxt == date(2024, 5, 2)
    return factory


def test_visits_screened_count_each_visit_once_by_its_standing_recommendation(visits):
    """Found in a staff-style check: the audit's referral rows were per photo, and a visit whose photos were all
    ungradable was in no visit count (not in "Visits graded"), so recalled and refer-for-ungradable visits were
    missing from every referral figure. Each visit screened now counts once, by the level its latest report
    version printed: the grader's on a reviewed version."""
    with visits() as s:
        both_days = audit_summary(s)
        first, second = audit_summary(s, DAY, DAY), audit_summary(s, date(2024, 5, 2), date(2024, 5, 2))
        later = audit_summary(s, date(2024, 5, 3), None)
    v = both_days.visits
    assert v is not None and v.screened == 6
    assert v.by_recommendation == {"urgent": 1, "soon": 0, "routine": 0, "refer_ungradable": 1, "ungradable": 1,
                                   "rescreen_12": 0, "rescreen_24": 1, "no_images": 0, "no_report": 1, "not_recorded": 1}
    assert sum(v.by_recommendation.values()) == v.screened
    assert (v.set_by_grader, v.share_set_by_grader) == (1, pytest.approx(1 / 6))
    assert both_days.overall.exams == 4  # "Visits graded" leaves the two all-ungradable visits out
    assert (first.visits.screened, second.visits.screened) == (6, 0)  # a visit counts where its first photo arrived
    assert first.visits.by_recommendation["rescreen_24"] == 1  # the two-day visit, in its first day only
    assert later.visits.screened == 0


def test_the_visits_standing_is_kept_as_the_rows_say_and_tallies_check_finds_it_stale(visits):
    """Each visit keeps its first screened arrival and standing version on its row (what the audit counts along
    one index instead of walking a year's photos): written as photos and reports are recorded, in any order (G4's
    version 2 before its version 1), it agrees with a rebuild from the rows; a changed value is reported by
    `tallies check` and put right by `tallies rebuild`."""
    from sqlalchemy import event, select, update

    from screening.db import tallies
    from screening.db.models import Exam, Patient

    with session_scope(visits) as s:
        assert tallies.check(s) == []
        g4 = s.scalars(select(Exam).join(Patient).where(Patient.code == "G4")).one()
        assert (g4.standing_version, g4.standing_level, g4.screened_at) == (2, "rescreen_24", at(500))
        s.execute(update(Exam).where(Exam.id == g4.id).values(standing_level="urgent"))
        statements: list[str] = []
        engine = s.get_bind()
        listen = lambda conn, cursor, statement, *rest: statements.append(" ".join(statement.split()))  # noqa: E731
        event.listen(engine, "before_cursor_execute", listen)
        try:
            assert tallies.check(s) == [f"exam {g4.id} standing_level: kept urgent, rows say rescreen_24"]
        finally:
            event.remove(engine, "before_cursor_execute", listen)
        # the visits' rows are only read: a check holds no lock on the rows the workers update (at 1M rows on
        # PostgreSQL its rolled-back rewrite of them held every visit for 24 s)
        assert statements and not [q for q in statements if q.upper().startswith("UPDATE EXAMS")]
        tallies.rebuild(s)
        assert tallies.check(s) == []


def test_visit_rows_ignore_the_model_filter_and_reach_the_table_csv_and_json(visits, tmp_path):
    with visits() as s:
        summary = audit_summary(s, DAY, DAY, model_version="v1", by_site=True)
        assert summary.visits == audit_summary(s, DAY, DAY).visits  # the visit's recommendation, whatever graded it
    table = format_table(summary)
    assert "Visits screened (a photo graded or ungradable): 6; every model version and site" in table
    assert "--model-version and --by-site do not apply" in table
    lines = table.splitlines()
    for label, n in (("Urgent referral", 1), ("Recall (ungradable)", 1), ("Refer (ungradable)", 1), ("No report yet", 1),
                     ("Recorded before this count", 1), ("Rescreen 12-24 months", 1), ("Routine referral", 0)):
        assert any(line.split() == [str(n), *label.split()] for line in lines), label
    assert "Standing recommendation set by a grader (reviewed version): 1 of 6 (16.7%)" in table
    with write_csv(summary, tmp_path / "a.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    levels = {r["key"]: r["value"] for r in rows if r["section"] == "visits_by_recommendation"}
    assert levels["ungradable"] == levels["refer_ungradable"] == levels["urgent"] == levels["no_report"] == "1"
    assert all(r["model_version"] == "" for r in rows if r["section"].startswith("visits"))
    visit_rows = {r["key"]: r["value"] for r in rows if r["section"] == "visits"}
    assert (visit_rows["screened"], visit_rows["set_by_grader"], visit_rows["share_set_by_grader"]) == ("6", "1", "0.167")
    back = read_json(write_json(summary, tmp_path / "a.json"))
    assert back == summary
    assert json.loads((tmp_path / "a.json").read_text())["visits"]["by_recommendation"]["refer_ungradable"] == 1
    older = json.loads((tmp_path / "a.json").read_text())
    del older["visits"]  # an export made before these rows existed still reads
    assert AuditSummary.from_dict(older).visits is None

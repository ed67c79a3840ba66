"""Model-versus-grader agreement in the audit, on seeded visits with hand-computed answers."""

from __future__ import annotations

import csv
import json
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from screening.audit import audit_summary, format_table, read_json, write_csv, write_json
from screening.db import session_scope
from screening.db.models import Exam, Patient
from screening.report import EyeReview
from screening.review import sign_off
from screening.review.agreement import AgreementStats, agreement_summary, quadratic_kappa

from .conftest import T0, at, seed_ungradable, seed_visit

DAY = date(2025, 3, 3)


@pytest.mark.parametrize("labels", [3, 5])
def test_quadratic_kappa_from_counts_is_scikit_learns(labels: int) -> None:
    """The audit's kappa from a confusion table gives scikit-learn's number for the same pairs, on random tables
    (some classes empty, some raters far apart), and None where scikit-learn's is undefined."""
    import random
    import warnings
    from collections import Counter

    from sklearn.metrics import cohen_kappa_score

    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(1, 60)
        bias = rng.choice([0, 0, 1, -1])
        pairs = [(a, min(labels - 1, max(0, a + bias + rng.choice([0, 0, 0, 1, -1, 2])))) for a in
                 (rng.randrange(rng.randint(1, labels)) for _ in range(n))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = cohen_kappa_score([a for a, _ in pairs], [b for _, b in pairs], labels=list(range(labels)),
                                         weights="quadratic")
        got = quadratic_kappa(Counter(pairs), labels)
        if expected != expected:  # NaN: undefined
            assert got is None, (trial, pairs)
        else:
            assert got == pytest.approx(float(expected), abs=1e-12), (trial, pairs)
    assert quadratic_kappa(Counter(), labels) is None
    assert quadratic_kappa(Counter({(1, 1): 4}), labels) is None  # one and the same grade for everything


@pytest.fixture
def reviewed(factory):
    """V1-V3 graded by v1, V4-V5 by v2, V6 (v1) received the next day; reviews by A and B (see each line)."""
    with session_scope(factory) as s:
        v1 = seed_visit(s, "V1", {"R": (2, 0, True), "L": (0, 0, False)}, report_at=at(100)).id
        v2 = seed_visit(s, "V2", {"R": (1, 0, False)}, report_at=at(200)).id
        v3 = seed_visit(s, "V3", {"R": (4, 0, True)}, report_at=at(300)).id
        v4 = seed_visit(s, "V4", {"L": (2, 1, True)}, model_version="v2", report_at=at(400)).id
        seed_visit(s, "V5", {"R": (0, 0, False)}, model_version="v2", report_at=at(500))
        seed_visit(s, "V6", {"R": (0, 0, False)}, received=T0 + timedelta(days=1))
    with session_scope(factory) as s:
        sign_off(s, v1, reviewer="A", source="cli", reviewed_at=at(1100))  # confirmed: both refer (TP)
        sign_off(s, v2, reviewer="A", source="cli", reviewed_at=at(2200), answers=[EyeReview("R", True, 3, 0)])  # FN
        sign_off(s, v3, reviewer="B", source="cli", reviewed_at=at(3300), answers=[EyeReview("R", False, None, None)])
        sign_off(s, v4, reviewer="B", source="cli", reviewed_at=at(4400), answers=[EyeReview("L", True, 1, 0)])  # FP
        sign_off(s, v4, reviewer="A", source="cli", reviewed_at=at(10400))  # current: confirmed (TP)
    return factory


def _check(stats: AgreementStats, **expected):
    for key, value in expected.items():
        got = getattr(stats, key)
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key


def test_agreement_overall_per_model_version_and_per_reviewer(reviewed):
    with session_scope(reviewed) as s:
        summary = audit_summary(s, DAY, DAY).agreement
    _check(summary.overall, group="ALL", visits_graded=5, visits_reviewed=4, share_reviewed=0.8, visits_corrected=2,
           eyes_compared=4, eyes_ungradable=1, dr_kappa=9 / 17, dr_exact_agreement=0.75, dme_kappa=1.0,
           dme_exact_agreement=1.0, referral_true_pos=2, referral_false_neg=1, referral_false_pos=0, referral_true_neg=0,
           referral_sensitivity=2 / 3, referral_specificity=None, visits_ungradable=1, review_time_n=4,
           review_time_p50_s=2500.0)
    assert list(summary.by_model) == ["v1", "v2"]
    _check(summary.by_model["v1"], visits_graded=3, visits_reviewed=3, share_reviewed=1.0, visits_corrected=2,
           dr_kappa=0.5, referral_sensitivity=0.5, visits_ungradable=1, review_time_p50_s=2000.0)
    _check(summary.by_model["v2"], visits_graded=2, visits_reviewed=1, share_reviewed=0.5, visits_corrected=0,
           eyes_compared=1, dr_kappa=None, dr_exact_agreement=1.0, referral_sensitivity=1.0, review_time_p50_s=4000.0)
    assert list(summary.by_reviewer) == ["A", "B"]
    _check(summary.by_reviewer["A"], visits_graded=5, visits_reviewed=3, share_reviewed=0.6, visits_corrected=1,
           dr_kappa=9 / 17, referral_true_pos=2, referral_false_neg=1, review_time_p50_s=2000.0)  # 1000, 2000, 10000
    _check(summary.by_reviewer["B"], visits_reviewed=2, share_reviewed=0.4, visits_corrected=2, eyes_compared=1,
           eyes_ungradable=1, dr_kappa=0.0, dr_exact_agreement=0.0, referral_false_pos=1, referral_specificity=0.0,
           referral_sensitivity=None, visits_ungradable=1, review_time_p50_s=3500.0)


def test_period_and_model_version_filters(reviewed):
    with session_scope(reviewed) as s:
        assert agreement_summary(s).overall.visits_graded == 6  # V6 counts without a period
        only_v2 = audit_summary(s, model_version="v2").agreement
    _check(only_v2.overall, group="v2", visits_graded=2, visits_reviewed=1, referral_true_pos=1)
    assert list(only_v2.by_model) == ["v2"] and list(only_v2.by_reviewer) == ["A", "B"]  # both signed V4 off


def test_no_reviews_gives_empty_statistics(factory):
    with session_scope(factory) as s:
        seed_visit(s, "V1", {"R": (0, 0, False)})
        overall = agreement_summary(s).overall
    _check(overall, visits_graded=1, visits_reviewed=0, share_reviewed=0.0, dr_kappa=None, referral_sensitivity=None,
           review_time_p50_s=None)


def test_agreement_is_in_the_table_the_csv_and_the_json(reviewed, tmp_path):
    with session_scope(reviewed) as s:
        summary = audit_summary(s, DAY, DAY)
    table = format_table(summary)
    assert "DR kappa (quadratic)" in table and "A (reviewer)" in table and "Referral sensitivity" in table
    kappa_line = next(line for line in table.splitlines() if line.startswith("DR kappa"))
    assert kappa_line.split()[3:] == ["0.529", "0.500", "-", "0.529", "0.000"]  # ALL, v1, v2, A, B
    assert "41.7 min" in next(line for line in table.splitlines() if line.startswith("Report to review"))  # 2500 s

    rows = list(csv.DictReader(write_csv(summary, tmp_path / "a.csv").open()))
    by = {(r["section"], r["model_version"], r["reviewer"], r["key"]): r["value"] for r in rows}
    assert by[("agreement", "ALL", "", "dr_kappa")] == "0.529"
    assert by[("agreement", "v1", "", "referral_sensitivity")] == "0.5"
    assert by[("agreement", "ALL", "B", "referral_specificity")] == "0.0"
    assert by[("agreement", "ALL", "A", "share_reviewed")] == "0.6"
    assert by[("images", "ALL", "", "graded")] == "6"  # the existing rows are unchanged

    write_json(summary, tmp_path / "a.json")
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["agreement"]["by_reviewer"]["B"]["referral_false_pos"] == 1
    assert read_json(tmp_path / "a.json") == summary


def test_the_table_labels_every_statistic():
    from screening.audit import _AGREEMENT_LABELS

    assert list(_AGREEMENT_LABELS) == [k for k in AgreementStats.__dataclass_fields__ if k != "group"]


def test_an_eye_the_model_found_ungradable_is_counted_not_compared(factory):
    with session_scope(factory) as s:
        exam = seed_visit(s, "U1", {"R": (2, 0, True)}, report_at=at(100))
        seed_ungradable(s, exam, "L", stored=at(50))
        other = seed_visit(s, "U2", {"R": (0, 0, False)}, report_at=at(100))
        seed_ungradable(s, other, "L", stored=at(50))
        ids = exam.id, other.id
    with session_scope(factory) as s:
        sign_off(s, ids[0], reviewer="A", source="cli", reviewed_at=at(1000))  # agrees: left ungradable
        sign_off(s, ids[1], reviewer="A", source="cli", reviewed_at=at(1000),
                 answers=[EyeReview("R", True, 0, 0), EyeReview("L", True, 1, 0)])  # graded the left eye
    with session_scope(factory) as s:
        overall = agreement_summary(s).overall
    assert (overall.eyes_compared, overall.eyes_model_ungradable, overall.eyes_ungradable) == (2, 2, 1)
    assert overall.dr_exact_agreement == 1.0  # the two right eyes; the left ones had no model grade to compare


def test_visits_the_model_found_wholly_ungradable_are_counted_beside_the_comparison(factory):
    """A manager-style check: a grader graded and referred a visit the model called ungradable, and the audit's
    model-versus-grader table did not show it anywhere (such a visit has no grade to compare)."""
    from screening.db import repository as repo

    with session_scope(factory) as s:
        ids = []
        for code in ("W1", "W2", "W3"):
            exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, code), DAY)
            seed_ungradable(s, exam, "R", stored=at(50))
            ids.append(exam.id)
        seed_visit(s, "G1", {"R": (0, 0, False)}, report_at=at(100))  # graded: in the comparison, not here
    with session_scope(factory) as s:
        sign_off(s, ids[0], reviewer="A", source="cli", reviewed_at=at(1000),
                 answers=[EyeReview("R", True, 3, 0)])  # graded it: severe NPDR, referred
        sign_off(s, ids[1], reviewer="A", source="cli", reviewed_at=at(1000))  # agrees: ungradable
    with session_scope(factory) as s:
        summary = audit_summary(s, DAY, DAY)
    u = summary.agreement.model_ungradable
    assert (u.visits, u.signed_off, u.graded_by_grader, u.referred_by_grader) == (3, 2, 1, 1)
    assert summary.agreement.overall.visits_graded == 1
    assert "Visits the model found wholly ungradable (not in the table above: no grade to compare; all model versions): 3; signed off 2, " \
           "of which the grader graded an eye in 1 and referred 1" in format_table(summary)
    with session_scope(factory) as s:
        assert agreement_summary(s, at(10_000)).model_ungradable.visits == 0  # by arrival, like the rest


def test_only_the_signed_off_visits_are_read_and_few_are_outlined_whatever_the_chunking(reviewed, monkeypatch):
    """The audit over a million results failed on PostgreSQL (one parameter per visit, over its 65,535 limit) and
    built every visit in Python; with a year of sign-offs it then took minutes (46 s at 48,000 sign-offs). Now the
    signed-off visits are read as rows, by id a chunk at a time; whether a sign-off still covers its visit comes
    from the review queue's SQL prefilter, and only the visits it cannot settle are read as outlines: here V4, the
    one visit signed off by two reviewers (B's own latest sign-off is not the current one). No visit is built. The
    same answers with a chunk of 2 ids as with one statement."""
    from screening.db import reviews as rrepo
    from screening.review import agreement, visits

    outlined: list[int] = []
    real = visits.load_outlines
    monkeypatch.setattr(agreement, "load_outlines", lambda s, ids: outlined.extend(ids) or real(s, ids))
    monkeypatch.setattr(rrepo, "graded_fields", lambda *a, **k: pytest.fail("the agreement builds no visit"))
    with session_scope(reviewed) as s:
        v4 = s.scalars(select(Exam.id).join(Patient).where(Patient.code == "V4")).one()
        whole = audit_summary(s, DAY, DAY).agreement
    assert outlined == [v4]
    assert (whole.overall.visits_reviewed, whole.by_reviewer["B"].visits_reviewed, whole.by_reviewer["B"].visits_reopened) \
        == (4, 2, 0)  # V3, and V4: B's older sign-off of V4 still covers it (nothing changed since)
    monkeypatch.setattr(visits, "IN_LIST_CHUNK", 2)
    monkeypatch.setattr(agreement, "IN_LIST_CHUNK", 2)
    with session_scope(reviewed) as s:
        assert audit_summary(s, DAY, DAY).agreement == whole


def test_a_visit_graded_by_two_versions_counts_for_each(factory):
    """As the audit counts exams per model version: a visit whose eyes two versions graded is in both columns."""
    with session_scope(factory) as s:
        exam = seed_visit(s, "M1", {"R": (2, 0, True)}, model_version="v1", report_at=at(100))
        seed_visit(s, "M1", {"L": (0, 0, False)}, model_version="v2")  # the other eye, graded by v2
        sign_off(s, exam.id, reviewer="A", source="cli", reviewed_at=at(1000))
    with session_scope(factory) as s:
        summary = audit_summary(s, DAY, DAY)
    assert summary.agreement.overall.visits_graded == summary.overall.exams == 1
    assert {v: (st.visits_graded, st.visits_reviewed, st.eyes_compared) for v, st in summary.agreement.by_model.items()} \
        == {"v1": (1, 1, 1), "v2": (1, 1, 1)}
    assert {v: st.exams for v, st in summary.by_model.items()} == {"v1": 1, "v2": 1}


def test_a_sign_off_a_later_photo_reopened_is_awaiting_review_not_reviewed(factory):
    """Found in a staff-style check of the audit: a visit back in the review queue ("changed since sign-off")
    still counted as reviewed. The audit now asks the queue's own rule (Visit.awaiting_review): the visit is
    reopened, awaiting review; its sign-off is still compared for the photo it covered."""
    from datetime import datetime, timezone

    from screening.review.visits import review_queue

    with session_scope(factory) as s:
        kept = seed_visit(s, "K1", {"R": (2, 0, True)}, report_at=at(100)).id
        reopened = seed_visit(s, "R1", {"R": (2, 0, True)}, report_at=at(100)).id
    with session_scope(factory) as s:
        sign_off(s, kept, reviewer="A", source="cli", reviewed_at=at(1000))
        sign_off(s, reopened, reviewer="A", source="cli", reviewed_at=at(1000))
    with session_scope(factory) as s:  # a photo of the other eye graded after the sign-off was recorded
        seed_visit(s, "R1", {"L": (0, 0, False)}, received=datetime.now(timezone.utc) + timedelta(minutes=1))
    with session_scope(factory) as s:
        assert [v.exam_id for v in review_queue(s)] == [reopened]
        summary = audit_summary(s)
    a = summary.agreement
    for stats in (a.overall, a.by_model["v1"], a.by_reviewer["A"]):
        _check(stats, visits_graded=2, visits_reviewed=1, visits_reopened=1, share_reviewed=0.5,
               eyes_compared=2, referral_true_pos=2, dr_exact_agreement=1.0)  # both right eyes: the photos signed off
    table = format_table(summary)
    assert "Visits reopened (photo after sign-off)" in table
    assert next(line for line in table.splitlines() if line.startswith("Visits reviewed (sign-off current)")).split()[-3:] \
        == ["1", "1", "1"]  # ALL, v1, A


def test_eyes_ungradable_per_model_version_includes_eyes_the_model_could_not_grade(factory):
    """Found in a staff-style check of the audit: with one model version, "Eyes ungradable (grader)" said 2 for ALL
    and 0 for the version: the per-version count was replaced by an eye-level one that never held the eyes the
    model found ungradable (no version graded them). They now count for their visit's versions, as
    eyes_model_ungradable already did, and with one version the two columns agree."""
    with session_scope(factory) as s:
        exam = seed_visit(s, "U1", {"R": (2, 0, True)}, report_at=at(100))
        seed_ungradable(s, exam, "L", stored=at(50))
        other = seed_visit(s, "U2", {"R": (1, 0, False)}, report_at=at(100))
        ids = exam.id, other.id
    with session_scope(factory) as s:
        sign_off(s, ids[0], reviewer="A", source="cli", reviewed_at=at(1000))  # agrees: left ungradable
        sign_off(s, ids[1], reviewer="A", source="cli", reviewed_at=at(1000), answers=[EyeReview("R", False, None, None)])
    with session_scope(factory) as s:
        a = audit_summary(s).agreement
    assert list(a.by_model) == ["v1"]
    for stats in (a.overall, a.by_model["v1"], a.by_reviewer["A"]):
        _check(stats, eyes_compared=1, eyes_model_ungradable=1, eyes_ungradable=2)
    assert {k: v for k, v in vars(a.by_model["v1"]).items() if k != "group"} \
        == {k: v for k, v in vars(a.overall).items() if k != "group"}

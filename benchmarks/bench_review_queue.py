"""The review queue over a large database: what ``dr-screen serve``'s queue page and ``dr-screen review list`` cost
when the programme has a year of signed-off visits behind it.

    python benchmarks/bench_review_queue.py                       # 1,000,000 results, SQLite, the new path only
    python benchmarks/bench_review_queue.py --rows 100000 --before  # also the old path (every visit built), same data
    python benchmarks/bench_review_queue.py --postgres-temp --rows 200000

The data is the audit benchmark's synthetic year (``bench_audit.synthesise``: two eyes per visit, 8 % more
ungradable photos, one report per visit, 3 % of visits still waiting for theirs), plus a sign-off of every visit
whose last photo came before the year's last ``--backlog-days`` days (default 14): what a programme whose graders
keep up looks like. The rest, about 4 % of the visits, await review.

Timed, each ``--runs`` times after one untimed warm-up, in this process: ``review_queue`` (the queue page's list
and ``review list``'s) and ``recently_reviewed(limit=30)`` (the page's second table). ``--before`` also times the
way both worked before (every visit ever graded built, then filtered in Python): on a year's database that takes
tens of gigabytes, so use it with ``--rows`` of 100,000 or fewer. Wall seconds, median, and the peak RSS of the
process after each part.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    machine_info,
    median,
    print_header,
    print_table,
    start_temp_postgres,
    stop_temp_postgres,
    write_json,
)
from benchmarks.bench_audit import fill, synthesise

DAY_US = 24 * 3600 * 10**6


def sign_off_all_but_backlog(url: str, tables: dict[str, tuple[list[str], list[tuple]]], backlog_days: float) -> int:
    """A confirmed sign-off (one answer per eye) of every visit whose last photo is older than the last
    ``backlog_days`` of the data, recorded an hour after that photo; returns how many visits await review."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import insert

    from screening.db import make_engine
    from screening.db.models import Review, ReviewEye

    cols, rows = tables["images"]
    at = {c: i for i, c in enumerate(cols)}
    last: dict[int, datetime] = {}
    eye_photo: dict[tuple[int, str], int] = {}
    for r in rows:
        exam = r[at["exam_id"]]
        if exam is None:
            continue
        t = datetime.fromisoformat(r[at["updated_at"]]).replace(tzinfo=timezone.utc)
        last[exam] = max(last.get(exam, t), t)
        eye_photo.setdefault((exam, r[at["eye"]]), r[at["id"]])
    newest = max(last.values())
    cutoff = newest - timedelta(days=backlog_days)
    reviews, eyes = [], []
    for exam, t in sorted(last.items()):
        if t >= cutoff:
            continue
        when = t + timedelta(hours=1)
        reviews.append({"id": exam, "exam_id": exam, "reviewer": "Bench Grader", "source": "web", "outcome": "confirmed",
                        "referral": "rescreen_12", "model_referral": "rescreen_12", "reviewed_at": when, "created_at": when})
        for eye in ("R", "L"):
            if (exam, eye) in eye_photo:
                eyes.append({"review_id": exam, "image_id": eye_photo[(exam, eye)], "eye": eye, "gradable": True,
                             "dr_grade": 0, "dme_grade": 0})
    engine = make_engine(url)
    with engine.begin() as conn:
        for k in range(0, len(reviews), 50_000):
            conn.execute(insert(Review), reviews[k:k + 50_000])
        for k in range(0, len(eyes), 50_000):
            conn.execute(insert(ReviewEye), eyes[k:k + 50_000])
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return len(last) - len(reviews)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database", help="an EMPTY database URL (default: a temporary SQLite file)")
    ap.add_argument("--postgres-temp", action="store_true", help="start a throw-away PostgreSQL server (scripts/pg-temp.sh)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="result rows (default %(default)s)")
    ap.add_argument("--backlog-days", type=float, default=14.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", action="store_true", help="also time the old path (every visit built)")
    ap.add_argument("--json")
    args = ap.parse_args()

    info = machine_info()
    print_header("review queue over a synthetic year", info)
    pg = None
    if args.postgres_temp:
        url, pg = start_temp_postgres("bench_review_queue")
    else:
        url = args.database or f"sqlite:///{tempfile.mkdtemp(prefix='dr-bench-queue-')}/bench.db"
    try:
        t0 = time.perf_counter()
        tables = synthesise(args.rows)
        fill(url, tables)
        waiting = sign_off_all_but_backlog(url, tables, args.backlog_days)
        del tables
        print(f"loaded        : {args.rows:,} results, {waiting:,} visits awaiting review "
              f"({time.perf_counter() - t0:.0f} s)")

        from sqlalchemy.orm import Session

        from screening.db import make_engine
        from screening.review.visits import load_visits, recently_reviewed, review_queue

        engine = make_engine(url)

        def run(fn):  # type: ignore[no-untyped-def]
            times = []
            for k in range(args.runs + 1):
                with Session(engine) as s:
                    t = time.perf_counter()
                    out = fn(s)
                    if k:
                        times.append(time.perf_counter() - t)
            return out, times

        results: list[list[object]] = []
        payload: dict[str, object] = {"info": info, "rows": args.rows, "waiting": waiting, "backlog_days": args.backlog_days}
        queue, t_queue = run(review_queue)
        results.append(["review_queue", len(queue), median(t_queue), min(t_queue), _rss_mb()])
        recent, t_recent = run(lambda s: recently_reviewed(s, limit=30))
        results.append(["recently_reviewed(30)", len(recent), median(t_recent), min(t_recent), _rss_mb()])
        if args.before:
            def old_queue(s):  # type: ignore[no-untyped-def]
                return [v for v in load_visits(s) if v.awaiting_review]

            def old_recent(s):  # type: ignore[no-untyped-def]
                done = [v for v in load_visits(s) if not v.awaiting_review]
                return sorted(done, key=lambda v: -(v.current_review.id if v.current_review else 0))[:30]

            old_q, t_old_q = run(old_queue)
            assert {v.exam_id for v in old_q} == {v.exam_id for v in queue}, "the two paths disagree on the queue"
            results.append(["before: every visit built, queue", len(old_q), median(t_old_q), min(t_old_q), _rss_mb()])
            old_r, t_old_r = run(old_recent)
            assert [v.exam_id for v in old_r] == [v.exam_id for v in recent], "the two paths disagree on the recent"
            results.append(["before: every visit built, recent", len(old_r), median(t_old_r), min(t_old_r), _rss_mb()])
            print(f"ratio         : queue {median(t_old_q) / median(t_queue):.1f}x, "
                  f"recent {median(t_old_r) / median(t_recent):.1f}x faster than before")
        engine.dispose()
        print_table(["timed", "visits", "median s", "min s", "peak RSS MB so far"], results)
        payload["results"] = results
        write_json(args.json, payload)
    finally:
        if pg is not None:
            stop_temp_postgres(pg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

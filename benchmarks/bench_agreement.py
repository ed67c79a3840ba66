"""The audit's model-versus-grader agreement over a year of signed-off visits: what ``dr-screen audit`` spends on
its agreement table once the graders have signed off most of a programme's visits.

    python benchmarks/bench_agreement.py                                  # 1,000,000 results, SQLite
    python benchmarks/bench_agreement.py --rows 100000 --before ec1019d   # also the code of another commit, same data
    python benchmarks/bench_agreement.py --postgres-temp --rows 200000

The data is the review-queue benchmark's (``bench_audit.synthesise`` plus a confirmed sign-off of every visit whose
last photo came before the last ``--backlog-days`` days): about 96 % of the visits signed off.

Timed, each ``--runs`` times after one untimed warm-up, in a fresh process per code version: ``agreement_summary``
over the whole year and over one month (March). ``--before REV`` checks that commit out in a temporary git worktree
and times its ``agreement_summary`` the same way on the same database (the audit's schema is the same), then checks
both give the same statistics: the ratio is measured in the same run. Wall seconds (median, min), the first call's (the
warm-up: what one ``dr-screen audit`` pays, imports it makes included) and the timing process's peak RSS (VmHWM:
Linux).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ROOT,
    machine_info,
    median,
    print_header,
    print_table,
    start_temp_postgres,
    stop_temp_postgres,
    write_json,
)

SPANS = {"year": (None, None), "month": ("2025-03-01", "2025-04-01")}

# Run in a fresh process with the code under test first on sys.path: times agreement_summary, prints JSON.
_TIMER = """
import json, sys, time
from dataclasses import asdict
from datetime import datetime, timezone
from sqlalchemy.orm import Session
from screening.db import make_engine
from screening.review.agreement import agreement_summary
url, runs, lo, hi = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lo = datetime.fromisoformat(lo).replace(tzinfo=timezone.utc) if lo else None
hi = datetime.fromisoformat(hi).replace(tzinfo=timezone.utc) if hi else None
engine = make_engine(url)
times = []
for k in range(runs + 1):
    with Session(engine) as s:
        t = time.perf_counter()
        summary = agreement_summary(s, lo, hi)
        elapsed = time.perf_counter() - t
        if k:
            times.append(elapsed)
        else:
            first = elapsed
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # ru_maxrss survives exec
print(json.dumps({"times": times, "first_s": first, "rss_mb": int(hwm.split()[1]) / 1024,
                  "summary": asdict(summary)}))
"""


def _same(a: object, b: object) -> bool:
    """The same statistics, floats to 1e-9 (a kappa from counts and scikit-learn's differ in the last bits)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def time_code(code: Path, url: str, runs: int, span: str) -> dict[str, object]:
    lo, hi = SPANS[span]
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-c", _TIMER, url, str(runs), lo or "", hi or ""], env=env, cwd=code,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database", help="an EMPTY database URL (default: a temporary SQLite file)")
    ap.add_argument("--postgres-temp", action="store_true", help="start a throw-away PostgreSQL server (scripts/pg-temp.sh)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="result rows (default %(default)s)")
    ap.add_argument("--backlog-days", type=float, default=14.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", metavar="REV", help="also time this commit's agreement_summary on the same data")
    ap.add_argument("--json")
    args = ap.parse_args()

    from benchmarks.bench_audit import fill, synthesise
    from benchmarks.bench_review_queue import sign_off_all_but_backlog

    info = machine_info()
    print_header("audit agreement over a synthetic signed-off year", info)
    tmp = Path(tempfile.mkdtemp(prefix="dr-bench-agreement-"))
    pg = None
    worktree = tmp / "before"
    try:
        if args.postgres_temp:
            url, pg = start_temp_postgres("bench_agreement")
        else:
            url = args.database or f"sqlite:///{tmp / 'bench.db'}"
        t0 = time.perf_counter()
        tables = synthesise(args.rows)
        fill(url, tables)
        waiting = sign_off_all_but_backlog(url, tables, args.backlog_days)
        visits = len({r[tables["images"][0].index("exam_id")] for r in tables["images"][1]} - {None})
        del tables
        print(f"loaded        : {args.rows:,} results, {visits:,} visits, {visits - waiting:,} signed off "
              f"({time.perf_counter() - t0:.0f} s)")
        codes = {"this tree": ROOT}
        if args.before:
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=ROOT, check=True,
                           capture_output=True)
            codes[f"before ({args.before})"] = worktree
        rows: list[list[object]] = []
        payload: dict[str, object] = {"info": info, "rows": args.rows, "visits": visits, "signed_off": visits - waiting,
                                      "runs": args.runs, "timings": {}}
        for span in SPANS:
            got = {name: time_code(code, url, args.runs, span) for name, code in codes.items()}
            summaries = [g.pop("summary") for g in got.values()]
            assert all(_same(s, summaries[0]) for s in summaries), f"{span}: the code versions disagree on the statistics"
            now = median(got["this tree"]["times"])  # type: ignore[arg-type]
            for name, g in got.items():
                t = g["times"]
                rows.append([span, name, median(t), min(t), g["first_s"], g["rss_mb"], median(t) / now])  # type: ignore[arg-type]
            payload["timings"][span] = got  # type: ignore[index]
            print(f"{span:<14}: signed-off visits compared {summaries[0]['overall']['visits_reviewed'] + summaries[0]['overall']['visits_reopened']:,}")
        print_table(["span", "code", "median s", "min s", "first call s", "peak RSS MB", "x this tree"], rows)
        payload["results"] = rows
        write_json(args.json, payload)
    finally:
        if args.before and worktree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
        if pg is not None:
            stop_temp_postgres(pg)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

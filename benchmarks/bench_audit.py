"""Audit speed over a large database: fill it with synthetic result rows, then time ``dr-screen audit``.

    python benchmarks/bench_audit.py                          # 1,000,000 results in a temporary SQLite file
    python benchmarks/bench_audit.py --postgres-temp          # the same on a throw-away local PostgreSQL server
    python benchmarks/bench_audit.py --database URL --rows 200000 --runs 7 --json out.json

The synthetic programme: one year (2025) of drops, two eyes per visit, 80 % of patients seen once and
20 % twice, a model change on 1 July (``bench-v1`` then ``bench-v2``), 1 % of files rejected, 0.2 % failed,
2 % dropped twice, one report per visit (10 % re-rendered after a late second eye) and 3 % of visits
still waiting for their report. Grades and referrals follow a screening population (most eyes DR 0).
Every admitted photo has a gradability verdict (three cameras; 8 % more photos judged ungradable, with their
reasons; 1 % laterality mismatches). The ``events`` table is left empty.

The audit's day tallies (revision 0011_audit_tallies), which the worker keeps as it writes, are rebuilt from
the loaded rows (``dr-screen tallies rebuild``, timed apart) before the audit is timed.

Rows go in through the driver's bulk path (SQLite ``executemany`` in one transaction, PostgreSQL
``COPY``), after the schema is created by ``init_db`` exactly as the worker does; PostgreSQL is then
ANALYZEd (its autovacuum would do the same on a live server); SQLite is left as the worker leaves it.

Timed, each ``--runs`` times after one untimed warm-up: ``audit_summary`` in this process (the
queries and the arithmetic), and the whole ``dr-screen audit`` command in a fresh process (start-up,
config, schema check, audit, table printed), over the whole year and over one month. Each run gives
wall seconds and CPU seconds (this process or the command's, plus the local PostgreSQL server's
processes): on a shared, busy machine the CPU seconds are the audit's own cost, the wall time adds
the wait for a free core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ROOT,
    machine_info,
    median,
    print_header,
    print_table,
    server_cpu,
    start_temp_postgres,
    stop_temp_postgres,
    write_json,
)

YEAR_START = np.datetime64("2025-01-01T00:00:00", "us")
YEAR_US = 365 * 24 * 3600 * 10**6
SWITCH = np.datetime64("2025-07-01T00:00:00", "us")
SHA = "ab" * 32
LESIONS = ("ma", "he", "ex", "se", "od")


def _ts(a: np.ndarray) -> np.ndarray:
    """datetime64[us] -> 'YYYY-MM-DD HH:MM:SS.ffffff' (how SQLAlchemy stores UTC times; PostgreSQL parses it)."""
    return np.char.replace(np.datetime_as_string(a, unit="us"), "T", " ")


def synthesise(n_results: int, seed: int = 0) -> dict[str, tuple[list[str], list[tuple]]]:
    """Rows per table (column names, tuples), ids explicit so foreign keys line up."""
    rng = np.random.default_rng(seed)
    n_exams = n_results // 2
    n_patients = int(n_exams / 1.2)
    # exams in time order; the first n_patients are first visits, each later one a patient's second visit
    # (n_patients exams, about ten months, after the first: never the same date)
    exam_start = YEAR_START + np.sort(rng.integers(0, YEAR_US, n_exams)).astype("timedelta64[us]")
    exam_patient = np.concatenate([np.arange(1, n_patients + 1), np.arange(1, n_exams - n_patients + 1)])
    patient_first = np.concatenate([exam_start[:1], exam_start[:n_patients]])  # index 0 unused

    # graded images: two eyes per exam, the second a few seconds to 20 min after the first
    img_exam = np.repeat(np.arange(1, n_exams + 1), 2)
    delay = np.where(np.arange(n_results) % 2 == 0, 0, rng.integers(5, 1200, n_results)) * 10**6
    received = np.repeat(exam_start, 2) + delay.astype("timedelta64[us]")
    graded_at = received + rng.integers(1_000_000, 30_000_000, n_results).astype("timedelta64[us]")
    eyes = np.tile(np.array(["R", "L"]), n_exams)

    # DR 0..4 and DME 0..2 as in a screening population; referable = DR >= 2 or DME >= 1
    dr = rng.choice(5, n_results, p=[0.72, 0.12, 0.10, 0.04, 0.02])
    dme = rng.choice(3, n_results, p=[0.9, 0.06, 0.04])
    referable = (dr >= 2) | (dme >= 1)
    score = np.where(referable, rng.uniform(0.5, 1.0, n_results), rng.uniform(0.0, 0.5, n_results))
    version = np.where(received < SWITCH, "bench-v1", "bench-v2")

    # reports: per exam after its last result; 10 % get a v2, 3 % none yet (the year's last visits)
    exam_done = np.maximum(graded_at[0::2], graded_at[1::2])
    first_report = exam_done + rng.integers(5_000_000, 60_000_000, n_exams).astype("timedelta64[us]")
    has_report = np.ones(n_exams, bool)
    has_report[-int(n_exams * 0.03):] = False
    second = (rng.random(n_exams) < 0.10) & has_report

    # rejects, failures, duplicate drops
    n_rej, n_fail, n_dup = n_results // 100, n_results // 500, n_results // 50
    other_at = YEAR_START + np.sort(rng.integers(0, YEAR_US, n_rej + n_fail)).astype("timedelta64[us]")
    dup_of = rng.integers(1, n_results + 1, n_dup)
    dup_at = received[dup_of - 1] + rng.integers(60, 86400, n_dup).astype("timedelta64[us]") * 10**6

    s_received, s_graded = _ts(received), _ts(graded_at)
    s_exam_start, s_first_report = _ts(exam_start), _ts(first_report)
    s_other, s_dup = _ts(other_at), _ts(dup_at)
    s_patient = _ts(patient_first)
    exam_dates = np.datetime_as_string(exam_start, unit="D")

    tables: dict[str, tuple[list[str], list[tuple]]] = {}
    tables["patients"] = (["id", "code", "created_at"],
                          [(i, f"B{i:07d}", s_patient[i]) for i in range(1, n_patients + 1)])
    tables["exams"] = (["id", "patient_id", "exam_date", "created_at"],
                       [(i + 1, int(exam_patient[i]), exam_dates[i], s_exam_start[i]) for i in range(n_exams)])
    # every admitted photo has a gradability verdict (issue 13): the graded ones gradable, from three cameras, 1 %
    # with a laterality mismatch; plus 8 % as many ungradable photos (no result) with one or two reasons
    img_cols = ["id", "exam_id", "eye", "sha256", "source_name", "stored_path", "state", "error", "received_at",
                "updated_at", "width", "height", "gradable", "quality_reasons", "device", "eye_mismatch"]
    cameras = np.array(["Topcon TRC-NW400", "Canon CR-2 AF", "Optomed Aurora"])
    camera = cameras[rng.integers(0, 3, n_exams)]
    mismatch = rng.random(n_results) < 0.01
    images = [
        (i + 1, int(img_exam[i]), eyes[i], f"{i + 1:064x}", f"B{exam_patient[img_exam[i] - 1]:07d}_{eyes[i]}.jpg",
         f"archive/{exam_dates[img_exam[i] - 1]}/{i + 1}.jpg",
         "reported" if has_report[img_exam[i] - 1] else "done", None, s_received[i], s_graded[i], 2048, 1536,
         True, "[]", str(camera[img_exam[i] - 1]), bool(mismatch[i]))
        for i in range(n_results)
    ]
    reasons = ["not a colour fundus photo", "no patient id in the file name", "not a readable image"]
    for k in range(n_rej + n_fail):
        failed = k >= n_rej
        images.append((n_results + k + 1, None, None, f"{n_results + k + 1:064x}", f"upload_{k}.jpg", None,
                       "failed" if failed else "rejected",
                       "inference error: out of memory" if failed else reasons[k % 3], s_other[k], s_other[k], None, None,
                       None, None, None, None))
    n_ungradable = int(n_results * 0.08)
    why = ['["too_dark"]', '["blurred"]', '["over_exposed"]', '["field_too_small"]', '["too_dark", "blurred"]']
    bad_exam = rng.integers(1, n_exams + 1, n_ungradable)
    bad_at = _ts(exam_start[bad_exam - 1] + rng.integers(0, 600, n_ungradable).astype("timedelta64[s]"))
    base = len(images)
    for k in range(n_ungradable):
        e = int(bad_exam[k])
        images.append((base + k + 1, e, "RL"[k % 2], f"{base + k + 1:064x}", f"B{exam_patient[e - 1]:07d}_{'RL'[k % 2]}.jpg",
                       f"archive/{exam_dates[e - 1]}/{base + k + 1}.jpg", "reported", None, bad_at[k], bad_at[k], 2048,
                       1536, False, why[k % len(why)], str(camera[e - 1]), False))
    tables["images"] = (img_cols, images)

    drop_cols = ["id", "image_id", "sha256", "source_name", "received_at", "outcome", "reason"]
    drops = [(row[0], row[0], row[3], row[4], row[8], "rejected" if row[6] == "rejected" else "new", None)
             for row in images]
    drops += [(len(images) + k + 1, int(dup_of[k]), f"{int(dup_of[k]):064x}", "copy.jpg", s_dup[k], "duplicate", None)
              for k in range(n_dup)]
    tables["drops"] = (drop_cols, drops)

    # what repository.add_result/add_report keep on each result: its exam and arrival, and the turnaround to
    # the exam's first report (v1, made after both eyes' results)
    turnaround = (np.repeat(first_report, 2) - received).astype("timedelta64[us]").astype(np.int64) / 1e6
    reported = np.repeat(has_report, 2)
    res_cols = ["id", "image_id", "model_version", "checkpoint_sha256", "dr_grade", "dr_probs", "dme_grade",
                "dme_probs", "referable_score", "referable", *(f"area_{k}" for k in LESIONS), "mask_dir",
                "overlay_path", "dr_cam_path", "dme_cam_path", "device", "inference_ms", "created_at", "exam_id",
                "received_at", "turnaround_s"]
    dr_probs = ["[" + ",".join("0.9" if g == k else "0.025" for k in range(5)) + "]" for g in range(5)]
    dme_probs = ["[" + ",".join("0.9" if g == k else "0.05" for k in range(3)) + "]" for g in range(3)]
    areas = rng.uniform(0, 0.01, (n_results, 5)).round(6)
    tables["results"] = (res_cols, [
        (i + 1, i + 1, version[i], SHA, int(dr[i]), dr_probs[dr[i]], int(dme[i]), dme_probs[dme[i]],
         float(round(score[i], 4)), bool(referable[i]), *map(float, areas[i]), f"work/{i + 1}", f"work/{i + 1}/overlay.jpg",
         f"work/{i + 1}/dr_cam.jpg", f"work/{i + 1}/dme_cam.jpg", "cpu", 850.0, s_graded[i], int(img_exam[i]),
         s_received[i], float(turnaround[i]) if reported[i] else None)
        for i in range(n_results)
    ])

    # each version records the recommendation it printed (revision 0016_report_referral_level): here the worse eye's
    # referral, roughly (the audit's visit count reads it; its cost does not depend on the values)
    rep_cols = ["id", "exam_id", "version", "path", "model_version", "created_at", "referral_level"]
    reports: list[tuple] = []
    late = _ts(first_report + np.timedelta64(3600, "s"))
    worse = np.maximum(dr[0::2], dr[1::2])
    levels = np.where(worse >= 4, "urgent", np.where(worse == 3, "soon", np.where(
        referable[0::2] | referable[1::2], "routine", np.where(worse == 1, "rescreen_12", "rescreen_24"))))
    for e in np.flatnonzero(has_report):
        mv = version[2 * e]
        reports.append((len(reports) + 1, int(e) + 1, 1, f"reports/{e + 1}/report_v1.pdf", mv, s_first_report[e],
                        str(levels[e])))
        if second[e]:
            reports.append((len(reports) + 1, int(e) + 1, 2, f"reports/{e + 1}/report_v2.pdf", mv, late[e], str(levels[e])))
    tables["reports"] = (rep_cols, reports)
    return tables


def fill(url: str, tables: dict[str, tuple[list[str], list[tuple]]]) -> float:
    """Create the schema (``init_db``) and bulk-load ``tables``; returns seconds."""
    from screening.db import init_db, make_engine

    engine = make_engine(url)
    init_db(engine)
    t0 = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for name in ("patients", "exams", "images", "drops", "results", "reports"):
            cols, rows = tables[name]
            if engine.dialect.name == "sqlite":
                marks = ", ".join("?" * len(cols))
                cur.executemany(f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({marks})",
                                [tuple(int(v) if isinstance(v, bool) else v for v in r) for r in rows])
            else:
                with cur.copy(f"COPY {name} ({', '.join(cols)}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(r)
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))")
        raw.commit()
    finally:
        raw.close()
    if engine.dialect.name == "postgresql":
        # What autovacuum does on a live server: statistics, and the visibility map that lets the audit's
        # index-only scans skip the table.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # Right after the load VACUUM can leave pages unmarked (the throw-away server commits
            # asynchronously); a second pass a moment later marks them, as autovacuum would have.
            for _ in range(30):
                conn.exec_driver_sql("VACUUM ANALYZE")
                visible, pages = conn.exec_driver_sql(
                    "SELECT relallvisible, relpages FROM pg_class WHERE relname = 'results'").one()
                if visible >= pages:
                    break
                time.sleep(1.0)
        print(f"vacuumed      : results {visible}/{pages} pages all-visible")
    engine.dispose()
    return time.perf_counter() - t0


def rebuild_tallies(url: str) -> float:
    """The audit's day tallies from the loaded rows (the worker keeps them as it writes; a bulk load does not):
    ``dr-screen tallies rebuild``. Returns seconds."""
    from screening.db import make_engine, make_session_factory, session_scope, tallies

    engine = make_engine(url)
    t0 = time.perf_counter()
    with session_scope(make_session_factory(engine)) as session:
        tallies.rebuild(session)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE audit_tallies")
            conn.exec_driver_sql("VACUUM ANALYZE exam_tallies")
    engine.dispose()
    return time.perf_counter() - t0


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database", help="an EMPTY database URL (default: a temporary SQLite file)")
    ap.add_argument("--postgres-temp", action="store_true", help="start a throw-away PostgreSQL server (scripts/pg-temp.sh)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="result rows (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    info = machine_info()
    print_header(f"audit over {args.rows:,} result rows", info)
    tmp = Path(tempfile.mkdtemp(prefix="dr-bench-audit-"))
    pg_folder = None
    try:
        if args.postgres_temp:
            url, pg_folder = start_temp_postgres("bench")
        else:
            url = args.database or f"sqlite:///{tmp / 'audit.db'}"
        t0 = time.perf_counter()
        tables = synthesise(args.rows)
        gen_s = time.perf_counter() - t0
        load_s = fill(url, tables)
        counts = {k: len(v[1]) for k, v in tables.items()}
        del tables
        print(f"rows          : {counts} (generated in {gen_s:.1f} s, loaded in {load_s:.1f} s)")
        tallies_s = rebuild_tallies(url)
        print(f"tallies       : rebuilt from the rows in {tallies_s:.1f} s (dr-screen tallies rebuild)")

        from screening.audit import audit_summary
        from screening.db import make_engine, make_session_factory, session_scope

        engine = make_engine(url)
        factory = make_session_factory(engine)
        spans = {"year": (None, None), "month": (date(2025, 3, 1), date(2025, 3, 31))}
        summaries = {}

        def run(span):
            with session_scope(factory) as s:
                summaries[span] = audit_summary(s, *spans[span])

        cfg = tmp / "config.toml"
        cfg.write_text(f"[screening]\ndatabase = '{url}'\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = {"year": [sys.executable, "-m", "screening.cli", "--config", str(cfg), "audit"],
               "month": [sys.executable, "-m", "screening.cli", "--config", str(cfg), "audit", "--from", "2025-03-01",
                         "--to", "2025-03-31"]}

        def command(span):
            subprocess.run(cmd[span], env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)

        def measure(fn, in_process: bool) -> tuple[float, float]:
            """Wall seconds, and CPU seconds of everything that did the work: this process (in-process audit) or
            the command's process, plus the PostgreSQL server's processes when it is the local temporary one.
            On a busy machine the CPU seconds are what the audit costs; the wall time adds the wait for a core."""
            server0 = server_cpu(pg_folder)
            cpu0 = time.process_time() if in_process else _children_cpu()
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            cpu = (time.process_time() if in_process else _children_cpu()) - cpu0
            return wall, cpu + (server_cpu(pg_folder) - server0)

        rows, payload = [], {"machine": info, "rows": counts, "backend": engine.dialect.name, "generate_s": gen_s,
                             "load_s": load_s, "tallies_rebuild_s": tallies_s, "timings": {}}
        for span in spans:
            timings = {}
            for name, fn, in_process in (("audit_summary", lambda span=span: run(span), True),
                                     ("command", lambda span=span: command(span), False)):
                fn()  # warm-up
                walls, cpus = zip(*(measure(fn, in_process) for _ in range(args.runs)))
                timings[name] = {"wall_s": list(walls), "cpu_s": list(cpus)}
            graded = summaries[span].overall.images
            a, c = timings["audit_summary"], timings["command"]
            rows.append([span, graded, median(a["wall_s"]), min(a["wall_s"]), median(a["cpu_s"]), median(c["wall_s"]),
                         median(c["cpu_s"])])
            payload["timings"][span] = {"graded": graded, "assessed": summaries[span].assessed,
                                        "ungradable": summaries[span].ungradable, **timings}
        engine.dispose()
        print(f"backend       : {payload['backend']}, {args.runs} runs after one warm-up")
        print_table(["span", "graded rows", "audit_summary wall median s", "wall min s", "CPU median s",
                     "dr-screen audit wall median s", "CPU median s"], rows)
        write_json(args.json, payload)
    finally:
        if pg_folder:
            stop_temp_postgres(pg_folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Several workers on one PostgreSQL database draining a backlog (issue 15 point 4), with kill -9 of a worker.

For each round and each worker count (default 1, 2, 4): a fresh database and inbox holding the same backlog of
real fundus photos (distinct files from ../shared/data, paired two per visit as right and left eye), then that
many real `dr-screen run` workers (watch mode, sites w1..wk, torch threads = cores / workers) started together.
Once ``--kill-at`` of the photos are graded, the first worker is killed with SIGKILL (with one worker, or with
``--restart``, it is started again at once as a supervisor would; else the others finish, each with the threads
it started with, so two workers on two cores finish on one core). The run ends when every photo is reported and the inbox is
empty; the workers are then stopped with SIGTERM.

Measured per run: photos per minute over the whole run (start-up included) and between the first and the last
result (steady state); CPU seconds per photo of the workers (their renderers included) and of the database
server, each compared with the one-worker run of the same round. Checked per run: no photo lost (each source
file is one image, with one result and archived once, or judged ungradable (reported for recapture, no result) and
archived once, or refused by the worker's checks and filed under rejected/ once; nothing left in the inbox or
failed) and none graded twice
(one result per image, and no worker reporting a result it had to give up to another worker), report versions
1..n per visit.

    python benchmarks/bench_workers.py --photos 2000 --rounds 3           # the issue's backlog (hours on 2 cores)
    python benchmarks/bench_workers.py --photos 40 --rounds 2 --json benchmarks/results/workers.json
    python benchmarks/bench_workers.py --photos 2000 --rounds 1 --workers 2 --restart --baseline earlier.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ROOT,
    create_database,
    data_dir,
    machine_info,
    median,
    print_header,
    print_table,
    server_cpu,
    start_temp_postgres,
    stop_temp_postgres,
    write_json,
)

GAVE_UP = "was taken over by another worker while this one graded it"  # screening.pipeline's warning


def source_photos(n: int) -> list[Path]:
    """``n`` distinct real photos (by content): EyePACS pairs, then Rahim's pairs, then Messidor-2 exams."""
    data = data_dir()
    files: list[Path] = []
    eyepacs = data / "eyepacs"
    for row in sorted(csv.DictReader((eyepacs / "labels.csv").open()), key=lambda r: (r["patient_id"], r["eye"])):
        files.append(eyepacs / row["image"])
    files += sorted((data / "srahim").glob("Patient*_[LR].jpg"))
    messidor = data / "messidor2"
    files += [messidor / row["image"] for row in sorted(csv.DictReader((messidor / "labels.csv").open()),
                                                         key=lambda r: (r["patient_id"], r["image"]))]
    seen: set[str] = set()
    out: list[Path] = []
    for path in files:
        if len(out) == n:
            break
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(path)
    if len(out) < n:
        sys.exit(f"error: only {len(out)} distinct photos found under {data}; ask for --photos {len(out)} or fewer")
    return out


def stage_backlog(sources: list[Path], folder: Path) -> list[str]:
    """The backlog once, as the inbox will hold it: visit k's photos are W<k>_R.jpg and W<k>_L.jpg."""
    folder.mkdir(parents=True)
    names = []
    for i, src in enumerate(sources):
        name = f"W{i // 2:05d}_{'RL'[i % 2]}.jpg"
        shutil.copyfile(src, folder / name)
        names.append(name)
    return names


def write_config(run: Path, database: str, site: str, threads: int, checkpoint: Path, lease: float) -> Path:
    cfg = run / f"{site}.toml"
    cfg.write_text("\n".join([
        "[screening]", f"inbox = '{run / 'inbox'}'", f"reports = '{run / 'reports'}'", f"archive = '{run / 'archive'}'",
        f"rejected = '{run / 'rejected'}'", f"work_dir = '{run / 'work'}'", f"database = '{database}'",
        f"checkpoint = '{checkpoint}'", f"quality_model = '{checkpoint.parent / 'quality.pt'}'",
        f"laterality_model = '{checkpoint.parent / 'laterality.pt'}'", "device = 'cpu'", f"threads = {threads}", "batch_size = 1",
        "stable_seconds = 0.2", "poll_interval = 0.5", "sweep_interval = 5.0", f"site = '{site}'",
        f"claim_lease_seconds = {lease}",
    ]) + "\n")
    return cfg


def start_worker(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "screening.cli", "--config", str(cfg), "run"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_run(workers: int, names: list[str], staging: Path, server_url: str, pg_folder: str | None, checkpoint: Path,
            kill_at: float, lease: float, timeout: float, tag: str, restart: bool = False) -> dict[str, Any]:
    from sqlalchemy import func, select

    from screening.db import init_db, make_engine, make_session_factory, session_scope
    from screening.db.models import Image, Report, Result

    run = Path(tempfile.mkdtemp(prefix=f"dr-bench-workers-{tag}-"))
    database = create_database(server_url, f"bench_{tag}", drop_first=True)
    for sub in ("inbox", "reports", "archive", "rejected", "work"):
        (run / sub).mkdir()
    for name in names:
        os.link(staging / name, run / "inbox" / name)  # the staged copy stays when the inbox file is archived
    engine = make_engine(database)
    init_db(engine)  # created before the clock starts: the workers find it at head
    factory = make_session_factory(engine)
    threads = max(1, (os.cpu_count() or 1) // workers)
    configs = [write_config(run, database, f"w{k + 1}", threads, checkpoint, lease) for k in range(workers)]
    logs = [run / f"w{k + 1}.log" for k in range(workers)]
    cpu0, server0 = children_cpu(), server_cpu(pg_folder)
    t0 = time.monotonic()
    procs = [start_worker(cfg, log) for cfg, log in zip(configs, logs)]
    killed_at: float | None = None
    n = len(names)

    def counts() -> tuple[int, int]:
        """Photos graded, and photos finished: reported, or refused by the worker's checks (a real photo may
        fail the colour-fundus check: it is handled, filed under rejected/ with its reason)."""
        with session_scope(factory) as s:
            graded = s.scalar(select(func.count()).select_from(Result)) or 0
            finished = s.scalar(select(func.count()).select_from(Image).where(Image.state.in_(["reported", "rejected"])))
        return graded, finished or 0

    try:
        while True:
            graded, reported = counts()
            if killed_at is None and graded >= kill_at * n:
                procs[0].send_signal(signal.SIGKILL)
                procs[0].wait()
                killed_at = time.monotonic() - t0
                if workers == 1 or restart:  # started again at once, as a supervisor (systemd Restart=always) would
                    procs.append(start_worker(configs[0], logs[0]))
            if reported == n and not any((run / "inbox").iterdir()):
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{workers} worker(s): {reported} of {n} photos finished after {timeout:.0f} s; "
                                   f"logs in {run}")
            if all(p.poll() is not None for p in procs):
                raise RuntimeError(f"every worker stopped with {reported} of {n} photos finished; logs in {run}")
            time.sleep(0.5)
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    cpu, server = children_cpu() - cpu0, server_cpu(pg_folder) - server0

    with session_scope(factory) as s:
        images = s.execute(select(Image.source_name, Image.state, Image.id, Image.gradable)).all()
        results = Counter(s.scalars(select(Result.image_id)))
        stamps = sorted(s.scalars(select(Result.created_at)))
        sites = Counter(s.scalars(select(Result.site)))
        versions: dict[int, list[int]] = {}
        for exam_id, version in s.execute(select(Report.exam_id, Report.version).order_by(Report.exam_id, Report.version)):
            versions.setdefault(exam_id, []).append(version)
    engine.dispose()
    by_name = Counter(name for name, *_ in images)
    archived = Counter(p.name.split("_", 1)[1] for p in (run / "archive").rglob("*_W*.jpg"))  # <sha12>_<name>
    refused = {nm for nm, state, *_ in images if state == "rejected"}
    filed = Counter(p.name.split("_", 2)[2] for p in (run / "rejected").glob("*_W*.jpg"))  # <time>_<sha8>_<name>
    lost = [nm for nm in names if by_name[nm] != 1 or (archived[nm] if nm not in refused else filed[nm]) != 1]
    twice = sum(1 for c in results.values() if c > 1) + sum(log.read_text(errors="replace").count(GAVE_UP) for log in logs)
    # a photo judged ungradable (issue 13) is handled without a grade: reported as "ungradable: recapture", archived
    # once, no result; any other photo the checks admitted must have exactly one result
    ungradable = {image_id for _, state, image_id, gradable in images if gradable is False and state == "reported"}
    ungraded = [nm for nm, state, image_id, _ in images
                if state != "rejected" and results[image_id] != (0 if image_id in ungradable else 1)]
    out = {
        "workers": workers, "photos": n, "threads_per_worker": threads, "wall_s": round(wall, 1),
        "photos_per_min": round(n / wall * 60, 2),  # refused photos count: the worker read and checked them
        "steady_photos_per_min": round((n - 1) / (stamps[-1] - stamps[0]).total_seconds() * 60, 2) if n > 1 else None,
        "cpu_s_per_photo_workers": round(cpu / n, 3), "cpu_s_per_photo_server": round(server / n, 3),
        "killed_at_s": None if killed_at is None else round(killed_at, 1), "killed_restarted": workers == 1 or restart,
        "results_by_site": dict(sites),
        "lost": len(lost) + len(ungraded), "graded_twice": twice,
        "left_in_inbox": len(list((run / "inbox").iterdir())),
        "refused_by_checks": len(refused), "ungradable": len(ungradable),
        "failed": sum(1 for _, state, *_ in images if state not in ("reported", "rejected")),
        "versions_in_order": all(v == list(range(1, len(v) + 1)) for v in versions.values()),
        "visits": len(versions),
    }
    if out["lost"] or out["graded_twice"] or out["failed"] or out["left_in_inbox"]:
        out["kept_for_inspection"] = str(run)  # the logs, inbox, archive and (on the server) the database
    else:
        shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=40, help="backlog size (the issue asks for 2000; even, default 40)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=2, help="each round runs every worker count once, in turn")
    ap.add_argument("--kill-at", type=float, default=0.4, help="kill -9 the first worker once this share is graded")
    ap.add_argument("--restart", action="store_true",
                    help="start the killed worker again at once, as a supervisor would (always so with one worker); "
                         "without it the other workers finish alone")
    ap.add_argument("--baseline", type=Path,
                    help="the JSON of an earlier run whose 1-worker runs are the baseline (when --workers lacks 1)")
    ap.add_argument("--lease", type=float, default=30.0, help="[screening] claim_lease_seconds of the workers")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "baseline.pt")
    ap.add_argument("--server", help="an existing PostgreSQL server URL (a database per run is created there); "
                                     "default: a throw-away server (scripts/pg-temp.sh)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    if args.photos < 2 or args.photos % 2:
        ap.error("--photos must be an even number, at least 2 (two eyes per visit)")
    if 1 not in args.workers and args.baseline is None:
        ap.error("--workers must include 1, or --baseline name an earlier run's JSON: the other counts are compared with it")

    info = machine_info()
    print_header(f"{args.workers} workers on PostgreSQL, {args.photos}-photo backlog, kill -9 at {args.kill_at:.0%}", info)
    work = Path(tempfile.mkdtemp(prefix="dr-bench-workers-"))
    pg_folder = None
    try:
        if args.server:
            server_url = args.server
        else:
            server_url, pg_folder = start_temp_postgres("postgres_bench")
        names = stage_backlog(source_photos(args.photos), work / "backlog")
        runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for k in args.workers:
                res = one_run(k, names, work / "backlog", server_url, pg_folder, args.model, args.kill_at, args.lease,
                              args.timeout, tag=f"r{r}k{k}", restart=args.restart)
                res["round"] = r + 1
                runs.append(res)
                print(f"round {r + 1}, {k} worker(s): {res['photos_per_min']} photos/min ({res['wall_s']} s), "
                      f"lost {res['lost']}, graded twice {res['graded_twice']}, ungradable {res['ungradable']}, "
                      f"refused {res['refused_by_checks']}, load {os.getloadavg()[0]:.1f}", flush=True)
        base = {r["round"]: r for r in runs if r["workers"] == 1}
        if not base:  # an earlier run's 1-worker runs (same backlog size), by round; their median if rounds differ
            earlier = [r for r in json.loads(args.baseline.read_text())["runs"] if r["workers"] == 1]
            if not earlier or earlier[0]["photos"] != args.photos:
                ap.error(f"{args.baseline} has no 1-worker run of {args.photos} photos")
            base = {r["round"]: next((e for e in earlier if e["round"] == r["round"]), earlier[0]) for r in runs}
        for r in runs:
            b = base[r["round"]]
            r["throughput_vs_1"] = round(r["photos_per_min"] / b["photos_per_min"], 2)
            r["cpu_per_photo_vs_1"] = round((r["cpu_s_per_photo_workers"] + r["cpu_s_per_photo_server"])
                                            / (b["cpu_s_per_photo_workers"] + b["cpu_s_per_photo_server"]), 2)
        rows = []
        for k in args.workers:
            mine = [r for r in runs if r["workers"] == k]
            rows.append([k, median([r["photos_per_min"] for r in mine]), median([r["steady_photos_per_min"] for r in mine]),
                         median([r["throughput_vs_1"] for r in mine]), median([r["cpu_s_per_photo_workers"] for r in mine]),
                         median([r["cpu_s_per_photo_server"] for r in mine]), median([r["cpu_per_photo_vs_1"] for r in mine]),
                         sum(r["lost"] for r in mine), sum(r["graded_twice"] for r in mine),
                         all(r["versions_in_order"] for r in mine)])
        print()
        print_table(["workers", "photos/min", "steady photos/min", "vs 1 worker", "worker CPU s/photo",
                     "server CPU s/photo", "CPU/photo vs 1", "lost", "graded twice", "versions in order"], rows)
        ok = all(r["lost"] == 0 and r["graded_twice"] == 0 and r["left_in_inbox"] == 0 and r["failed"] == 0
                 and r["versions_in_order"] for r in runs)
        print("PASS" if ok else "FAIL")
        write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                               "medians": rows, "ok": ok})
        return 0 if ok else 1
    finally:
        if pg_folder:
            stop_temp_postgres(pg_folder)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

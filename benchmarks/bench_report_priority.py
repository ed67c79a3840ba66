"""The report renderer's CPU priority on a busy machine: how long a two-eye report takes from hand-over to PDF.

`[screening] report_priority` (screening/renderer.py): "idle" (SCHED_IDLE, the default: grading first), "low"
(niceness 10 above the worker's) and "normal". The busy machine is simulated by one process per core (or
``--load``) at normal priority that computes for 90 ms and sleeps 10 ms in turn, like a training job or a second
worker that keeps every core nearly busy. For each priority, one renderer child is started and warmed up (its first
report, untimed), then ``--reports`` reports are handed over at once and timed until the last PDF is published.
Priorities are interleaved round by round; medians over the rounds, and the ratio to "normal" in the same run.

    .venv/bin/python benchmarks/bench_report_priority.py --rounds 5 --json benchmarks/results/report-priority.json
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, median, print_header, print_table, write_json
from bench_report import visit_context, visit_images

PRIORITIES = ("normal", "low", "idle")


def _busy(stop) -> None:
    while not stop.is_set():
        end = time.perf_counter() + 0.09
        while time.perf_counter() < end:
            pass
        time.sleep(0.01)


def timed_reports(priority: str, ctx, folder: Path, n: int, timeout: float) -> float | None:
    """Seconds from handing ``n`` reports to a warm renderer to the last published PDF; None past ``timeout``."""
    from screening.renderer import ProcessRenderer, RenderJob

    renderer = ProcessRenderer(priority=priority)
    try:
        renderer.submit(RenderJob(0, ctx, ROOT / "templates", folder / "warm-up"))
        if not _collect(renderer, 1, timeout):
            return None
        t0 = time.perf_counter()
        for k in range(1, n + 1):
            renderer.submit(RenderJob(k, dataclasses.replace(ctx, patient_id=f"P{k}"), ROOT / "templates", folder / "timed"))
        return time.perf_counter() - t0 if _collect(renderer, n, timeout) else None
    finally:
        renderer.close(timeout=5)


def _collect(renderer, n: int, timeout: float) -> bool:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += renderer.results(timeout=0.5)
    if any(r.path is None for r in got):
        sys.exit(f"error: a report failed to render: {[r.error for r in got if r.path is None]}")
    return len(got) == n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reports", type=int, default=2, help="reports handed over at once per timing (default 2)")
    ap.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes (default: one per core)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a timing counts as not finished")
    ap.add_argument("--synthetic", action="store_true", help="synthetic fundus images instead of ../shared/data")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args()

    info = machine_info()
    print_header(f"Report renderer priority under load ({args.load} busy processes)", info)
    times: dict[str, list[float | None]] = {p: [] for p in PRIORITIES}
    stop = mp.Event()
    load = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load)]
    with tempfile.TemporaryDirectory(prefix="bench_priority_") as tmp:
        ctx = visit_context(visit_images(Path(tmp), args.synthetic))
        for proc in load:
            proc.start()
        try:
            for r in range(args.rounds):
                for priority in PRIORITIES:
                    t = timed_reports(priority, ctx, Path(tmp) / f"{priority}-{r}", args.reports, args.timeout)
                    times[priority].append(t)
                    print(f"round {r + 1}: {priority}: {'>' + str(args.timeout) if t is None else f'{t:.2f}'} s", flush=True)
        finally:
            stop.set()
            for proc in load:
                proc.join(5)
    results, rows = {}, []
    base = median([t for t in times["normal"] if t is not None])
    for priority in PRIORITIES:
        done = [t for t in times[priority] if t is not None]
        med = median(done) if len(done) == len(times[priority]) else None
        results[priority] = {"seconds_median": None if med is None else round(med, 2), "seconds_runs": times[priority],
                             "ratio_to_normal": None if med is None else round(med / base, 2)}
        rows.append([priority, "not all finished" if med is None else med, "" if med is None else med / base])
    print(f"\n{args.reports} two-eye reports per timing, {args.rounds} rounds, {args.load} busy processes")
    print_table(["report_priority", "seconds to the last PDF (median)", "x normal"], rows)
    write_json(args.json, {"machine": info, "load": args.load, "reports": args.reports, "rounds": args.rounds,
                           "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

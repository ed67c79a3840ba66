"""What keeping the audit's day tallies costs the worker's writes (revision 0011_audit_tallies, issue 15).

Each photo is written as the worker writes it, in its units of work: the image and its drop with the intake checks
(one transaction), then its result (another); after a visit's second eye, its report version (a third). Rounds alternate between the repository as it is (tallies kept)
and the same code with the tally writes switched off, each round on a fresh database; medians of the rounds,
and the ratio of the two in the same run.

    python benchmarks/bench_tally_writes.py --photos 1000 --rounds 5
    python benchmarks/bench_tally_writes.py --photos 1000 --rounds 5 --postgres-temp --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    create_database,
    machine_info,
    median,
    print_header,
    print_table,
    start_temp_postgres,
    stop_temp_postgres,
    write_json,
)


@contextmanager
def tallies_off() -> Iterator[None]:
    """The repository with every tally write a no-op: the day tallies (revision 0011_audit_tallies) and the visits'
    screened arrival and standing report (0016_report_referral_level)."""
    from screening.db import tallies

    names = ("count_result", "count_drop", "count_checks", "screen_exam", "stand_exam")
    saved = {n: getattr(tallies, n) for n in names}
    for n in names:
        setattr(tallies, n, lambda *a, **k: None)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(tallies, n, fn)


def one_round(url: str, photos: int) -> float:
    """Seconds per photo for ``photos`` photos (two eyes per visit), written through the repository."""
    from screening.db import init_db, make_engine, make_session_factory, session_scope
    from screening.db import repository as repo
    from screening.db.models import Image

    engine = make_engine(url)
    init_db(engine)
    factory = make_session_factory(engine)
    t0 = datetime(2025, 3, 1, 8, tzinfo=timezone.utc)
    start = time.perf_counter()
    for i in range(photos):
        when = t0 + timedelta(minutes=i)
        with session_scope(factory) as s:
            exam = repo.get_or_create_exam(s, repo.get_or_create_patient(s, f"P{i // 2}"), date(2025, 3, 1))
            img = repo.add_image(s, sha256=f"{i:064x}", source_name=f"P{i // 2}_{'RL'[i % 2]}.jpg", exam=exam,
                                 eye="RL"[i % 2], received_at=when, device="cam-a")
            repo.record_drop(s, sha256=img.sha256, source_name=img.source_name, outcome="new", image=img, received_at=when)
            repo.record_checks(s, img, gradable=True, reasons=[], scores={"q": 0.9}, eye_source="name",
                               predicted_eye="RL"[i % 2], eye_confidence=0.95, eye_mismatch=False, eye_confirmed=True)
            image_id = img.id
        with session_scope(factory) as s:
            graded = s.get(Image, image_id)
            assert graded is not None
            repo.add_result(s, graded, model_version="v1", checkpoint_sha256="c" * 64, dr_grade=i % 5, dr_probs=[0.2] * 5,
                            dme_grade=0, dme_probs=[1 / 3] * 3, referable_score=0.5, referable=i % 5 >= 2,
                            created_at=when + timedelta(seconds=5))
            repo.set_state(s, graded, "done")
        if i % 2:  # the visit's second eye: its report version is recorded, as the report stage records it
            with session_scope(factory) as s:
                visit = s.get(Image, image_id)
                assert visit is not None and visit.exam is not None
                repo.add_report(s, visit.exam, f"reports/P{i // 2}/report_v1.pdf", "v1", version=1,
                                created_at=when + timedelta(seconds=9), referral_level="rescreen_24")
    seconds = (time.perf_counter() - start) / photos
    engine.dispose()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--postgres-temp", action="store_true", help="a throw-away PostgreSQL server (scripts/pg-temp.sh)")
    ap.add_argument("--json")
    args = ap.parse_args()
    info = machine_info()
    print_header(f"tally writes, {args.photos} photos x {args.rounds} rounds", info)
    tmp = Path(tempfile.mkdtemp(prefix="dr-bench-tallies-"))
    pg_folder = None
    times: dict[str, list[float]] = {"tallies kept": [], "tallies off": []}
    try:
        server = None
        if args.postgres_temp:
            server, pg_folder = start_temp_postgres("bench_tallies_0")
        for r in range(args.rounds):
            for mode in (("tallies kept", "tallies off") if r % 2 == 0 else ("tallies off", "tallies kept")):
                name = f"r{r}_{'on' if mode == 'tallies kept' else 'off'}"
                url = create_database(server, f"bench_{name}") if server else f"sqlite:///{tmp / name}.db"
                if mode == "tallies off":
                    with tallies_off():
                        times[mode].append(one_round(url, args.photos))
                else:
                    times[mode].append(one_round(url, args.photos))
        base = median(times["tallies off"])
        rows = [[mode, f"{1000 * median(v):.2f}", f"{1000 * min(v):.2f}", f"{median(v) / base:.3f}"] for mode, v in times.items()]
        print(f"backend       : {'postgresql' if server else 'sqlite'}")
        print_table(["writes", "ms/photo (median)", "min", "vs tallies off"], rows)
        payload: dict[str, Any] = {"machine": info, "backend": "postgresql" if server else "sqlite", "photos": args.photos,
                                   "s_per_photo": times}
        write_json(args.json, payload)
    finally:
        if pg_folder:
            stop_temp_postgres(pg_folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared helpers for the benchmark scripts: machine info, timing, tables, JSON, data location."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def data_dir(sub: str = "") -> Path:
    """``../shared/data[/sub]`` relative to the project root; exits with a clear message if absent."""
    path = DATA / sub if sub else DATA
    if not path.exists():
        sys.exit(f"error: real images not found at {path} (expected ../shared/data relative to the project root {ROOT}); "
                 "this benchmark needs them and never copies them into the repository")
    return path


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def print_header(title: str, info: dict[str, Any]) -> None:
    print(f"== {title}")
    print(f"command       : {info['command']}")
    print(f"machine       : {info['cpu_count']} CPUs (affinity {info['cpu_affinity']}), load {info.get('loadavg_1m')}, "
          f"{info['platform']}")
    print(f"python/torch  : {info['python']} / torch {info['torch']}, torch threads {info['torch_threads']}, "
          f"cuda {info['cuda']}")


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call for ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
        print(f"JSON written to {path}")


# ------------------------------------------------------------------------------------ a throw-away PostgreSQL

def start_temp_postgres(database: str) -> tuple[str, str]:
    """A PostgreSQL server in a temporary folder (scripts/pg-temp.sh) with an empty ``database``: its URL and the
    folder (for :func:`server_cpu` and :func:`stop_temp_postgres`)."""
    folder = tempfile.mkdtemp(prefix="dr-pg-bench-")
    proc = subprocess.run([str(ROOT / "scripts" / "pg-temp.sh"), "start", folder], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        sys.exit(f"error: could not start a temporary PostgreSQL server: {proc.stderr.strip()}")
    admin = proc.stdout.strip().splitlines()[-1]
    return create_database(admin, database), folder


def create_database(server_url: str, name: str, *, drop_first: bool = False) -> str:
    """Create the empty database ``name`` on the server of ``server_url``; returns its URL."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    eng = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        if drop_first:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def stop_temp_postgres(folder: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "pg-temp.sh"), "stop", folder], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def server_cpu(pg_folder: str | None) -> float:
    """CPU seconds used so far by the temporary server: its postmaster with the children it has reaped
    (parallel workers and backends that came and went) plus its live children."""
    if pg_folder is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    postmaster = int((Path(pg_folder) / "data" / "postmaster.pid").read_text().split()[0])
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / tick

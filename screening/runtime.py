"""Process-level helpers of the worker and its renderer process (no torch import here).

Settings the worker needs before torch is imported (``screening.cli`` applies them first thing):

``OMP_WAIT_POLICY=PASSIVE``: after each forward pass, torch's OpenMP threads would otherwise spin on the CPU
for a while waiting for more work, and on a small machine they take the cores that the report rendering
(WeasyPrint, single-threaded) needs right then. Measured in benchmarks/bench_worker.py (BENCHMARKS.md): PDF
rendering 262 -> 222 ms/image, no change to the forward itself. A value already set by the user wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

WORKER_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_worker_env(environ: dict[str, str] | None = None) -> list[str]:
    """Set the defaults of :data:`WORKER_ENV` that are not set; returns the names that could not take effect
    because torch was already imported (OpenMP reads them once, when it loads)."""
    env = os.environ if environ is None else environ
    late = []
    for key, value in WORKER_ENV.items():
        if key not in env:
            env[key] = value
            if "torch" in sys.modules:
                late.append(key)
    return late


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and the next forward's activations,
    or the next report, then land on top of a fragmented heap). A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

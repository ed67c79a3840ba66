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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Bytes glibc holds free in its heap (``mallinfo2().fordblks``); None where that is unavailable."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def release_memory(min_free_bytes: int = 0) -> bool:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and the next forward's activations,
    or the next report, then land on top of a fragmented heap). Returns whether it trimmed.

    ``malloc_trim`` walks the whole heap (10-14 ms in the worker), so with ``min_free_bytes`` it only runs
    when glibc holds at least that much free; where that cannot be read it always runs. A no-op without glibc.
    """
    if min_free_bytes > 0:
        free = free_heap_bytes()
        if free is not None and free < min_free_bytes:
            return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True

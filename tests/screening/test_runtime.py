"""The worker's process settings are in place before torch loads its OpenMP runtime."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from screening import runtime
from screening.runtime import WORKER_ENV, apply_worker_env, free_heap_bytes, release_memory


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in WORKER_ENV}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_dr_screen_sets_the_openmp_wait_policy_before_torch_loads() -> None:
    out = _child("import sys; assert 'torch' not in sys.modules; import screening.cli, os; "
                 "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    # set on import, and torch not loaded yet: the CLI imports it only for the worker (audit and init-db never)
    assert out == "PASSIVE False"


def test_a_value_set_by_the_user_wins() -> None:
    assert _child("import screening.cli, os; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_worker_env(env) == [] and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_setting_it_after_torch_is_loaded_is_reported() -> None:
    import torch  # noqa: F401  (already loaded in the test process)

    env: dict[str, str] = {}
    assert apply_worker_env(env) == ["OMP_WAIT_POLICY"] and env["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.skipif(free_heap_bytes() is None, reason="needs glibc's mallinfo2")
def test_release_memory_trims_only_above_the_free_heap_threshold(monkeypatch) -> None:
    import ctypes

    assert free_heap_bytes() >= 0
    trims = []
    real = ctypes.CDLL

    class Libc:
        def __init__(self, name):
            self._lib = real(name)

        def __getattr__(self, attr):
            if attr == "malloc_trim":
                return lambda pad: trims.append(pad) or 1
            return getattr(self._lib, attr)

    monkeypatch.setattr(runtime.ctypes, "CDLL", Libc)
    assert release_memory(min_free_bytes=1 << 62) is False and trims == []  # far more than any heap holds free
    assert release_memory() is True and trims == [0]  # no threshold: always trims

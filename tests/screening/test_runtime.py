"""The worker's process settings are in place before torch loads its OpenMP runtime."""

from __future__ import annotations

import os
import subprocess
import sys

from screening.runtime import WORKER_ENV, apply_worker_env


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in WORKER_ENV}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_dr_screen_sets_the_openmp_wait_policy_before_torch_loads() -> None:
    out = _child("import sys; assert 'torch' not in sys.modules; import screening.cli, os; "
                 "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    assert out == "PASSIVE True"  # set, and torch was only imported afterwards (by the CLI's own imports)


def test_a_value_set_by_the_user_wins() -> None:
    assert _child("import screening.cli, os; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_worker_env(env) == [] and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_setting_it_after_torch_is_loaded_is_reported() -> None:
    import torch  # noqa: F401  (already loaded in the test process)

    env: dict[str, str] = {}
    assert apply_worker_env(env) == ["OMP_WAIT_POLICY"] and env["OMP_WAIT_POLICY"] == "PASSIVE"

"""archlab shortens OpenMP's spin before torch loads libgomp (the fused kernels' threads
otherwise share a core with a spinning torch worker), and never overrides the user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "import os; print(os.environ.get('GOMP_SPINCOUNT'))"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return {**env, **extra}


@pytest.mark.parametrize(
    ("code", "extra", "expected"),
    [
        ("import archlab; " + SHOW, {}, "10000"),
        ("import archlab; " + SHOW, {"GOMP_SPINCOUNT": "77"}, "77"),  # the user's value
        ("import archlab; " + SHOW, {"OMP_WAIT_POLICY": "ACTIVE"}, "None"),  # the user's policy
        ("import torch, archlab; " + SHOW, {}, "None"),  # too late to take effect: not set
    ],
)
def test_spin_count_is_set_only_where_it_takes_effect(code, extra, expected):
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(**extra)
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected

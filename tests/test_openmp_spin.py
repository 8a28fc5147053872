"""archlab shortens OpenMP's spin in either import order (the fused kernels' threads otherwise
share a core with a spinning torch worker), and never overrides the user. The live value is
read back from libgomp itself (archlab/_openmp.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from archlab import _openmp

# _openmp.py loaded as a file, so that reading the value does not import archlab itself
LOAD = (
    f"import importlib.util as u; s = u.spec_from_file_location('o', {_openmp.__file__!r}); "
    "o = u.module_from_spec(s); s.loader.exec_module(o); "
)
SHOW = LOAD + (
    "import os, torch; "
    "live = {v: o.spin_count(v) for v in (10000, 300000, 77)}; "
    "print(os.environ.get('GOMP_SPINCOUNT'), [v for v, x in live.items() if x == v])"
)
GNU = "libgomp" in open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else False


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _openmp.USER_VARIABLES}
    return {**env, **extra}


def _run(code: str, **extra: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(**extra)
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.skipif(not GNU, reason="torch's OpenMP is not GNU libgomp here")
@pytest.mark.parametrize(
    ("first", "extra", "expected"),
    [
        ("import archlab", {}, "10000 [10000]"),
        ("import torch, archlab", {}, "10000 [10000]"),  # set in libgomp itself
        ("import torch", {}, "None [300000]"),  # without archlab: libgomp's default
        ("import archlab", {"GOMP_SPINCOUNT": "77"}, "77 [77]"),  # the user's value
        ("import torch, archlab", {"GOMP_SPINCOUNT": "77"}, "77 [77]"),
        ("import torch, archlab", {"OMP_WAIT_POLICY": "ACTIVE"}, "None []"),  # untouched
    ],
)
def test_the_spin_count_in_effect_does_not_depend_on_import_order(first, extra, expected):
    assert _run(f"{first}; {SHOW}", **extra) == expected


@pytest.mark.skipif(not GNU, reason="torch's OpenMP is not GNU libgomp here")
def test_the_word_found_is_the_one_gomp_spincount_sets():
    """The variable found by its default value sits where GOMP_SPINCOUNT puts any value."""
    code = LOAD + (
        "import torch; "
        "base = min(a for a, _ in o._libgomp_data()); "
        "print(o.spin_count_address({v}) - base)"
    )
    default = _run(code.format(v=300000))
    assert default == _run(code.format(v=123457), GOMP_SPINCOUNT="123457")
    assert default == _run(code.format(v=50), GOMP_SPINCOUNT="50")  # throttled = min(100, 50)


def test_nothing_is_touched_without_a_unique_match(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(_openmp, "_libgomp_data", lambda: [])
    assert _openmp.spin_count_address(300000) is None and _openmp.after_torch() is False

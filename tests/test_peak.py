"""The MFU peak (train/peak.py) does not move between runs on one machine: measured once and
cached with how it was measured, or a stated figure; summary.json and the report say which."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archlab.errors import UserError
from archlab.train import peak as peak_mod

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import json, torch; from archlab.train.peak import peak; p = peak('cpu', torch.float32); "
    "print(json.dumps([p.flops, p.source, p.how]))"
)


def _probe(cache: Path, **extra: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != peak_mod.ENV_PEAK}
    env |= {peak_mod.ENV_CACHE: str(cache), "PYTHONPATH": str(ROOT / "src"), **extra}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_the_peak_is_identical_across_runs_on_one_machine(tmp_path):
    first, second = _probe(tmp_path), _probe(tmp_path)
    assert first[0] == second[0] and math.isfinite(first[0]) and first[0] > 1e8
    assert first[1] == second[1] == "measured once (cached)"
    assert "matmuls" in first[2] and str(tmp_path / peak_mod.CACHE_FILE) in first[2]
    entries = json.loads((tmp_path / peak_mod.CACHE_FILE).read_text())
    (key,) = entries
    assert entries[key]["flops"] == first[0]
    assert " threads|" in key and "torch.float32" in key
    other = _probe(tmp_path, OMP_NUM_THREADS="1")  # another thread count: its own entry
    assert len(json.loads((tmp_path / peak_mod.CACHE_FILE).read_text())) == 2
    assert other[1] == "measured once (cached)"


def test_a_stated_figure_wins_and_a_bad_one_is_a_user_error(tmp_path, monkeypatch):
    assert _probe(tmp_path, ARCHLAB_PEAK_FLOPS="2.5e12")[:2] == [2.5e12, "stated"]
    assert not (tmp_path / peak_mod.CACHE_FILE).exists()  # nothing measured
    monkeypatch.setenv(peak_mod.ENV_PEAK, "fast")
    with pytest.raises(UserError, match="ARCHLAB_PEAK_FLOPS='fast': expected FLOP/s"):
        peak_mod.peak("cpu")


def test_an_unwritable_cache_measures_in_the_run_and_says_so(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(peak_mod.ENV_CACHE, str(blocker / "sub"))
    monkeypatch.delenv(peak_mod.ENV_PEAK, raising=False)
    monkeypatch.setattr(peak_mod, "MEASURE_S", 0.05)
    peak_mod._peak.cache_clear()
    try:
        p = peak_mod.peak("cpu")
    finally:
        peak_mod._peak.cache_clear()
    assert p.source == "measured in this run" and "not cached" in p.how and p.flops > 1e8


def test_known_gpus_get_their_datasheet_figure(monkeypatch):
    monkeypatch.delenv(peak_mod.ENV_PEAK, raising=False)
    monkeypatch.setattr(peak_mod, "_device_name", lambda dev: "NVIDIA H100 80GB HBM3")
    p = peak_mod._stated(torch.device("cuda", 0), torch.bfloat16)
    assert p is not None and p.flops == 989e12 and p.source == "stated"
    monkeypatch.setattr(peak_mod, "_device_name", lambda dev: "NVIDIA H100 NVL")
    assert peak_mod._stated(torch.device("cuda", 0), torch.bfloat16) is None  # measured

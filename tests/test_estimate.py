"""The pre-run estimate (train/estimate.py): printed before step 1, warnings above the
thresholds (a faked throughput), kernel warm-up outside the run's Time, and compare's first
ETA taken from it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archlab.bench.compare.runner import CompareProgress
from archlab.cli import main
from archlab.progress import parse_duration
from archlab.train.estimate import LONG_RUN_S, Estimate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64",
         "--num-threads", "1", "--seq-len", "32", "--batch-size", "2"]  # fmt: skip


@pytest.fixture
def char_data(stories_chars_300):
    return stories_chars_300


def _estimate(**kw) -> Estimate:
    base = dict(
        steps=100, tokens=100_000, flops_per_token=1e6, flops_per_s=1e9, how="given",
        seconds=100.0, peak_mem=1 << 30, mem_limit=8 << 30, checkpoint_bytes=1 << 20,
        checkpoints_kept=3, disk_free=1 << 40, warmup_s=0.5,
    )  # fmt: skip
    return Estimate(**(base | kw))


def test_warnings_start_at_the_thresholds():
    assert _estimate().warnings() == []
    assert "over an hour" in _estimate(seconds=LONG_RUN_S + 1).warnings()[0]
    assert _estimate(seconds=LONG_RUN_S).warnings() == []
    mem = _estimate(peak_mem=7 << 30).warnings()  # 7 of 8 GiB > 80%
    assert len(mem) == 1 and "peak memory 7.0 GiB is near the 8.0 GiB" in mem[0]
    assert _estimate(peak_mem=6 << 30).warnings() == []  # 75%
    disk = _estimate(checkpoint_bytes=1 << 30, disk_free=4 << 30).warnings()  # 4 of 4 GiB
    assert len(disk) == 1 and "--keep-checkpoints" in disk[0]
    line = _estimate(seconds=3723).line()
    assert line.startswith("estimate: 1:02:03 for 100 steps (100,000 tokens at ~1,000 tok/s")
    assert parse_duration("1:02:03") == 3723 and parse_duration("04:37") == 277


def test_the_estimate_comes_before_step_1_and_warns_with_a_slow_device(tmp_path, char_data, capsys):
    """A faked throughput of 10 FLOP/s makes any run take hours: warned before step 1."""
    rc = main(["train", "--data", str(char_data), *SMALL, "--max-tokens", "256",
               "--eval-interval", "2", "--eval-steps", "1", "--log-interval", "1",
               "--debug-flops-per-s", "10", "--out-dir", str(tmp_path / "run")])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err.splitlines()
    est = next(i for i, line in enumerate(err) if line.startswith("estimate: "))
    warn = next(i for i, line in enumerate(err) if "(over an hour)" in line)
    step1 = next(i for i, line in enumerate(err) if line.startswith("step 1/"))
    assert est < step1 and warn < step1
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    flops = s["flops_per_token"]
    train_tokens, eval_tokens = 4 * 64, 3 * 64  # 4 steps of 2x32; evals at 2, 4 (+1 counted)
    assert s["estimated_s"] == pytest.approx((flops * train_tokens + flops / 3 * eval_tokens) / 10)
    assert s["warmup_s"] > 0
    assert err[est].startswith(f"estimate: {err[est].split()[1]} for 4 steps (256 tokens")
    # --quiet: the estimate is progress, the warning is not
    rc = main(["train", "--data", str(char_data), *SMALL, "--max-tokens", "128", "--quiet",
               "--debug-flops-per-s", "10", "--out-dir", str(tmp_path / "quiet")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and "estimate: " not in err and "(over an hour)" in err


def test_the_warm_up_leaves_the_run_unchanged(tmp_path, char_data, monkeypatch):
    """With dropout on (the warm-up draws random numbers), a run with the warm-up ends with
    the same weights as the same run without it: RNG and gradients are left as they were."""
    from archlab.train import checkpoint as ck
    from archlab.train import trainer

    args = ["--data", str(char_data), *SMALL, "--max-tokens", "256", "--quiet",
            "--dropout", "0.1", "--eval-interval", "2", "--eval-steps", "1"]  # fmt: skip
    assert main(["train", *args, "--out-dir", str(tmp_path / "warm")]) == 0
    monkeypatch.setattr(trainer, "warm_up", lambda *a: (0.0, 1.0))  # no passes at all
    assert main(["train", *args, "--out-dir", str(tmp_path / "none")]) == 0
    warm, _, _ = ck.load_model(tmp_path / "warm")
    none, _, _ = ck.load_model(tmp_path / "none")
    pairs = zip(warm.state_dict().items(), none.state_dict().items(), strict=True)
    assert all(torch.equal(p, q) for (_, p), (_, q) in pairs)
    assert json.loads((tmp_path / "warm" / "summary.json").read_text())["warmup_s"] > 0


def test_compare_eta_comes_from_the_estimate_not_the_first_steps():
    out = io.StringIO()
    prog = CompareProgress(out, n_runs=2, steps_per_run=10, mode="plain", every_s=0)
    prog.begin_run("[1/2 dense]")
    prog.estimate("estimate: 00:20 for 10 steps (640 tokens at ~32 tok/s, timed ...); ...")
    prog.status("[1/2 dense]", "step 1/10 loss 5.0 lr 1e-3 10 tok/s elapsed 00:30 eta 04:30")
    assert prog.eta() == pytest.approx(2.0 * 19)  # 19 steps left at the estimate's 2 s/step
    assert out.getvalue().rstrip().endswith("| compare: 0/2 runs done, eta 00:38")


@pytest.mark.slow
def test_kernel_compilation_is_outside_the_runs_time(tmp_path, char_data):
    """Mamba on an empty numba cache compiles for seconds: in warmup_s, not the first step."""
    env = dict(os.environ, ARCHLAB_NUMBA_NO_CACHE="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "archlab", "train", "--architecture", "mamba", "--model-size",
         "nano", "--data", str(char_data), "--max-tokens", "256", "--seq-len", "32",
         "--batch-size", "2", "--num-threads", "1", "--quiet", "--out-dir", str(tmp_path / "m")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert s["warmup_s"] > 1.0  # compilation happened there
    assert s["first_step_s"] < s["warmup_s"] / 3 and s["train_time_s"] < s["warmup_s"] + 60

"""The training process keeps freed tensor memory (train/allocator.py): large tensors stop
page-faulting in fresh pages every step, and a user's own allocator choice is kept.

Each case runs in a fresh process: the setting lasts for the process, and this one must keep
glibc's defaults for the other tests' memory measurements.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)

PROBE = """
import resource, sys, torch
from archlab.train.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "apply" else False
def tensor():  # 48 MiB, above glibc's largest mmap threshold (32 MiB), touched
    t = torch.ones(12 * 1024 * 1024)
    del t
for _ in range(2):
    tensor()
faults = []
for _ in range(7):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(applied, sorted(faults)[3])  # the median: now and then a small allocation lands in the
"""  # freed chunk first, and that one tensor needs fresh pages


def _probe(mode: str, **env: str) -> tuple[bool, float]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.update(PYTHONPATH=str(ROOT / "src"), **env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=full, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


def test_freed_large_tensors_are_reused_without_page_faults():
    applied, faults = _probe("apply")
    assert applied and faults < 100  # the freed 48 MiB comes back from the heap
    applied, faults = _probe("default")
    assert not applied and faults > 10_000  # glibc's default: 12,288 fresh pages every time


@pytest.mark.parametrize(
    "env",
    [
        {"ARCHLAB_MALLOC": "system"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"},
    ],
    ids=["opt-out", "malloc-variable", "glibc-tunables"],
)
def test_a_users_choice_is_kept(env):
    applied, faults = _probe("apply", **env)
    assert not applied and faults > 10_000


def test_the_train_command_applies_it(tmp_path):
    """`archlab train` (what compare runs per architecture) applies it; library and in-process
    callers of the command (tests) keep glibc's defaults."""
    data = tmp_path / "data.txt"
    data.write_text("hello world, this is a tiny corpus. " * 200)
    probe = (
        "import sys; import archlab.train.allocator as a; from archlab.cli import main; "
        "as_command = sys.argv.pop(1) == 'command'; "
        "sys.argv[0] = 'archlab' if as_command else 'notebook'; "
        "rc = main(sys.argv[1:]); print('APPLIED', a._applied)"
    )
    args = ["train", "--architecture", "dense", "--model-size", "nano", "--data", str(data),
            "--max-tokens", "64", "--batch-size", "2", "--seq-len", "16", "--quiet",
            "--eval-interval", "0", "--checkpoint-interval", "0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    for how, expect in (("command", "True"), ("library", "None")):
        out = subprocess.run(
            [sys.executable, "-c", probe, how, *args, "--out-dir", str(tmp_path / how)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )  # fmt: skip  (cwd: `--data` prepares into ./data/)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"APPLIED {expect}" in out.stdout

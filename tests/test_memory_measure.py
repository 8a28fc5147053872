"""The CPU peak a run reports is its own, not the process's lifetime maximum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archlab.train.metrics import (
    cpu_peak_bytes,
    current_memory_bytes,
    peak_memory_bytes,
    reset_cpu_peak,
)


def test_resetting_the_cpu_peak_forgets_an_earlier_allocation():
    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del big
    if not reset_cpu_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    now = current_memory_bytes(torch.device("cpu"))
    assert now is not None
    peak = cpu_peak_bytes()
    assert now - 8 * 2**20 <= peak < now + 32 * 2**20  # the 64 MiB are forgotten
    held = np.ones(48 * 2**20 // 8)
    assert peak_memory_bytes(torch.device("cpu")) >= peak + 40 * 2**20  # and new ones counted
    del held
    reset_cpu_peak()
    assert peak_memory_bytes(torch.device("cpu")) < peak + 32 * 2**20

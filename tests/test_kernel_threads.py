"""The fused kernels' thread pool (kernels/_numba.parallel_for): a thread the OS refuses
("can't start new thread": a ulimit, a container's pids cap) lowers the thread count for the
rest of the process instead of ending the run, and the result stays exact."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from archlab.models.kernels import _numba


def _square_into(lo: int, hi: int, x: np.ndarray, out: np.ndarray) -> None:
    out[lo:hi] = x[lo:hi] ** 2


@pytest.fixture
def fresh_pool(monkeypatch):
    monkeypatch.setattr(_numba, "_pool", None)
    monkeypatch.setattr(_numba, "_pool_size", 0)
    monkeypatch.setattr(_numba, "_thread_cap", 1 << 30)
    monkeypatch.setattr(_numba, "_notices", set())
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(threads)


def test_a_refused_thread_lowers_the_count_and_the_result_stays_exact(
    fresh_pool, monkeypatch, capsys
):
    started = []
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("archlab-kernel") and started:
            raise RuntimeError("can't start new thread")
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    x = np.arange(1000, dtype=np.float64)
    for _ in range(3):  # the first call meets the refusal, the later ones run capped
        out = np.zeros_like(x)
        _numba.parallel_for(_square_into, len(x), 1 << 30, x, out)
        np.testing.assert_array_equal(out, x**2)
    assert _numba._thread_cap == 2  # one pool thread started + the calling thread
    err = capsys.readouterr().err
    assert err.count("refused a kernel thread") == 1
    assert "go on with 2 thread(s)" in err


def test_an_error_in_a_piece_reaches_the_caller(fresh_pool):
    def fail(lo: int, hi: int) -> None:
        if lo > 0:
            raise ValueError(f"piece {lo}")

    with pytest.raises(ValueError, match="piece"):
        _numba.parallel_for(fail, 100, 1 << 30)

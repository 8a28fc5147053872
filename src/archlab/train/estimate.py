"""Before step 1: warm the kernels up outside the clock, then say what the run will cost.

A warm-up forward + backward on one micro-batch compiles what compiles on first use (the numba
kernels: ~5 s for Mamba on a fresh cache) before the run's clock starts, so that Time and
tokens/s hold none of it; it runs under a forked RNG and its gradients are dropped, so the
run is the one it would have been. A second, warm pass is timed: its achieved FLOP/s
(flops.py's model FLOPs per token x tokens / seconds) gives the estimate

    time = (training tokens x FLOPs/token + evaluation tokens x FLOPs/token / 3) / FLOP/s

plus the peak memory (the high-water mark after that pass, plus AdamW's two moments where the
optimizer holds none yet) and the size of one checkpoint (weights + two moments). ``line``
is printed before step 1; ``warnings`` (printed also with --quiet) name a run over an hour,
a peak near the memory there is, checkpoints near the free disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..fsutil import available_bytes
from ..progress import format_duration
from .metrics import format_bytes, peak_memory_bytes

LONG_RUN_S = 3600.0  # warn above an hour
MEMORY_FRACTION = 0.8  # warn when the peak would take more than this share of what there is
DISK_FRACTION = 0.8  # ... or the checkpoints more than this share of the free disk


@dataclass
class Estimate:
    steps: int
    tokens: int
    flops_per_token: float  # training (forward + backward)
    flops_per_s: float  # achieved on the warm pass, or given (tests)
    how: str  # where flops_per_s comes from
    seconds: float
    peak_mem: int | None  # bytes, measured as the run's peak memory is
    mem_limit: int | None  # bytes the process may grow to (CPU: RSS + MemAvailable)
    checkpoint_bytes: int
    checkpoints_kept: int
    disk_free: int | None
    warmup_s: float  # the cold pass (first-use compilation), outside the run's Time

    @property
    def disk_needed(self) -> int:
        """The kept checkpoints plus the one being written beside them."""
        return self.checkpoint_bytes * (self.checkpoints_kept + 1)

    def line(self) -> str:
        mem = format_bytes(self.peak_mem) if self.peak_mem is not None else "?"
        limit = f" of {format_bytes(self.mem_limit)}" if self.mem_limit else ""
        free = f", {format_bytes(self.disk_free)} free" if self.disk_free is not None else ""
        tok_s = self.flops_per_s / self.flops_per_token if self.flops_per_token else 0.0
        return (
            f"estimate: {format_duration(self.seconds)} for {self.steps:,} steps "
            f"({self.tokens:,} tokens at ~{tok_s:,.0f} tok/s, {self.how}); peak memory "
            f"~{mem}{limit}; checkpoints ~{format_bytes(self.checkpoint_bytes)} each, "
            f"{self.checkpoints_kept} kept{free}; kernel warm-up {self.warmup_s:.1f} s, "
            "not in Time"
        )

    def warnings(self) -> list[str]:
        out = []
        if self.seconds > LONG_RUN_S:
            out.append(
                f"warning: this run is estimated to take {format_duration(self.seconds)} "
                "(over an hour); lower --max-tokens or --model-size for a quicker one"
            )
        if self.peak_mem and self.mem_limit and self.peak_mem > MEMORY_FRACTION * self.mem_limit:
            out.append(
                f"warning: estimated peak memory {format_bytes(self.peak_mem)} is near the "
                f"{format_bytes(self.mem_limit)} available; lower --batch-size or --seq-len"
            )
        if self.disk_free is not None and self.disk_needed > DISK_FRACTION * self.disk_free:
            out.append(
                f"warning: {self.checkpoints_kept} kept checkpoints of "
                f"~{format_bytes(self.checkpoint_bytes)} (+1 while writing) come near the "
                f"{format_bytes(self.disk_free)} free; lower --keep-checkpoints"
            )
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pass(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, dtype) -> float:
    """One forward + backward, gradients dropped; wall seconds."""
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return seconds


def warm_up(
    model: nn.Module, x: Tensor, y: Tensor, device: torch.device, dtype
) -> tuple[float, float]:
    """(cold seconds, warm seconds) of two forward + backward passes on one micro-batch; the
    RNG states (dropout) are as before, the parameters untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cold = _pass(model, x, y, device, dtype)
        warm = _pass(model, x, y, device, dtype)
    return cold, warm


def memory_limit(device: torch.device) -> int | None:
    """What this process may grow to: CUDA the device's total memory; CPU the resident set
    now plus the kernel's MemAvailable (Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            avail = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable")
            )
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, StopIteration, ValueError):
        return None
    return avail + rss


def estimate(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    flops_per_token: float,
    micro_batch_tokens: int,
    warm_s: float,
    cold_s: float,
    steps: int,
    tokens_per_step: int,
    eval_tokens: int,
    device: torch.device,
    run_dir: Path,
    keep_checkpoints: int,
    flops_per_s: float | None = None,
) -> Estimate:
    """The run's estimate from the warm pass (or ``flops_per_s`` when given: tests)."""
    how = "given"
    if flops_per_s is None:
        flops_per_s = flops_per_token * micro_batch_tokens / max(warm_s, 1e-9)
        how = "timed on a warm forward + backward"
    train_flops = flops_per_token * steps * tokens_per_step
    seconds = (train_flops + flops_per_token / 3 * eval_tokens) / flops_per_s
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    peak = peak_memory_bytes(device) + (0 if optimizer.state else moments)
    return Estimate(
        steps=steps,
        tokens=steps * tokens_per_step,
        flops_per_token=flops_per_token,
        flops_per_s=flops_per_s,
        how=how,
        seconds=seconds,
        peak_mem=peak,
        mem_limit=memory_limit(device),
        checkpoint_bytes=param_bytes + moments,
        checkpoints_kept=max(1, keep_checkpoints),
        disk_free=available_bytes(run_dir),
        warmup_s=cold_s,
    )

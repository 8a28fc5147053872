"""`archlab bench lengths` (formerly `bench scaling`): time and memory of each architecture against sequence length.

Time: a forward pass (eval mode, no grad) and a training step's forward+backward
(cross-entropy plus MoE auxiliary losses) per point, after warm-up, median of repeats with
their interquartile range (every repeat is kept), all in this process with the same threads. Memory: every point in a FRESH process, because an
allocator that already grew for a larger point hides a smaller one's needs. On CPU the peak
is the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
after the model and inputs exist; ``ru_maxrss`` where that reset is unavailable); on CUDA
``torch.cuda.max_memory_allocated``. Reported as the peak above the memory held before the
step (weights, inputs), i.e. what the step itself needs; a tiny step runs first, so that
what a fresh process's first step adds once (loading the fused kernels: ~125 MiB) is not
counted there but reported apart (``*_setup_bytes``).

This module measures (``run_sweep``; ``python -m archlab.bench.lengths.measure SPEC`` is the
fresh process of one memory point); ``report`` fits the exponents, finds the crossovers
against dense and writes the table, figure and files.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ...config import ModelConfig
from ..common.models import _build, _sync, bench_config, resolve_device

MODES = ("fwd", "fwd_bwd")  # a forward pass (no grad); a training step's forward+backward


@dataclass
class ScalingSettings:
    architectures: list[str]
    model_sizes: list[str] = field(default_factory=lambda: ["nano"])
    seq_lens: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048])
    batch_size: int = 1
    warmup: int = 2
    repeats: int = 5
    device: str = "cpu"
    threads: int | None = None
    memory: bool = True
    vocab_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # d_model, n_layers, ...
    seed: int = 0


@dataclass
class Point:
    architecture: str
    model_size: str
    seq_len: int
    batch_size: int
    total_params: int
    fwd_s: float | None = None
    fwd_bwd_s: float | None = None
    fwd_mem_bytes: float | None = None  # peak above the pre-step baseline
    fwd_bwd_mem_bytes: float | None = None
    fwd_peak_bytes: float | None = None  # absolute peak (RSS or CUDA allocated)
    fwd_bwd_peak_bytes: float | None = None
    # what the first step of a fresh process adds once (kernels loaded / compiled, allocator
    # arenas), measured on a tiny warm-up step and kept out of *_mem_bytes
    fwd_setup_bytes: float | None = None
    fwd_bwd_setup_bytes: float | None = None
    fwd_samples: list[float] = field(default_factory=list)  # every timed repeat (seconds)
    fwd_bwd_samples: list[float] = field(default_factory=list)
    error: str | None = None

    def spread(self, mode: str) -> tuple[float, float] | None:
        """The interquartile range of the timed repeats (min, max with fewer than four)."""
        xs = sorted(getattr(self, f"{mode}_samples"))
        if not xs:
            return None
        if len(xs) < 4:
            return xs[0], xs[-1]
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return q1, q3


def make_step(model: Any, idx: Any, targets: Any, mode: str):
    """A closure running one forward (no grad) or one forward+backward training step."""
    import torch
    import torch.nn.functional as F

    if mode == "fwd":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(idx)

    else:
        model.train()

        def step() -> None:
            logits, aux = model(idx, return_aux=True)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if "aux_loss" in aux:
                loss = loss + aux["aux_loss"]
            loss.backward()
            for p in model.parameters():
                p.grad = None

    return step


def time_step(step, device: str, warmup: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _inputs(cfg: ModelConfig, batch: int, seq_len: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


# ---- memory: one fresh process per point -------------------------------------------------
def measure_memory_here(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one step, in THIS process (call it in a fresh one)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cfg = ModelConfig.from_dict(spec["config"])
    model = _build(cfg, device, spec["seed"])
    # A tiny step first: the first call of a fresh process loads (or compiles) the fused
    # kernels and sets up allocator arenas, ~125 MiB on CPU that no later step needs again.
    # It is reported apart (setup_bytes), not as the step's memory.
    before_setup = _current_bytes(device)
    tiny = _inputs(cfg, 1, min(8, spec["seq_len"]), device, spec["seed"])
    make_step(model, *tiny, spec["mode"])()
    setup = None if before_setup is None else _current_bytes(device) - before_setup
    idx, targets = _inputs(cfg, spec["batch_size"], spec["seq_len"], device, spec["seed"])
    step = make_step(model, idx, targets, spec["mode"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "cuda max_memory_allocated"
    else:
        from ...train.metrics import cpu_peak_bytes, current_memory_bytes, reset_cpu_peak

        base = current_memory_bytes(torch.device("cpu"))
        if base is not None and reset_cpu_peak():
            method = "VmHWM after clear_refs"
        else:
            base, method = cpu_peak_bytes(), "ru_maxrss"
        step()
        peak = cpu_peak_bytes()
    return {
        "peak_bytes": peak, "base_bytes": base, "delta_bytes": peak - base, "method": method,
        "setup_bytes": setup,
    }  # fmt: skip


def _current_bytes(device: str) -> int | None:
    import torch

    from ...train.metrics import current_memory_bytes

    return current_memory_bytes(torch.device(device))


def measure_memory(
    cfg: ModelConfig, seq_len: int, mode: str, settings: ScalingSettings, device: str
) -> dict[str, Any]:
    """Run ``measure_memory_here`` in a fresh interpreter and return its numbers."""
    spec = {
        "config": cfg.to_dict(),
        "seq_len": seq_len,
        "batch_size": settings.batch_size,
        "mode": mode,
        "device": device,
        "threads": settings.threads,
        "seed": settings.seed,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "archlab.bench.lengths.measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = tail[-1] if tail else f"exit code {proc.returncode}"
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (out of memory?)"
        return {"error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the sweep ---------------------------------------------------------------------------
def run_sweep(settings: ScalingSettings, progress=print) -> list[Point]:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    points: list[Point] = []
    max_t = max(settings.seq_lens)
    for size in settings.model_sizes:
        for arch in settings.architectures:
            cfg = bench_config(arch, size, max_t, settings.vocab_size, settings.overrides)
            model = _build(cfg, device, settings.seed)
            n_params = model.num_parameters()
            for T in settings.seq_lens:
                pt = Point(arch, size, T, settings.batch_size, n_params)
                idx, targets = _inputs(cfg, settings.batch_size, T, device, settings.seed)
                try:
                    for mode in MODES:
                        step = make_step(model, idx, targets, mode)
                        times = time_step(step, device, settings.warmup, settings.repeats)
                        setattr(pt, f"{mode}_s", statistics.median(times))
                        setattr(pt, f"{mode}_samples", times)
                except (RuntimeError, MemoryError) as exc:
                    pt.error = str(exc).strip().splitlines()[0][:200]
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                if settings.memory and pt.error is None:
                    for mode in MODES:
                        mem = measure_memory(cfg, T, mode, settings, device)
                        if "error" in mem:
                            pt.error = f"memory ({mode}): {mem['error']}"
                            break
                        setattr(pt, f"{mode}_mem_bytes", mem["delta_bytes"])
                        setattr(pt, f"{mode}_peak_bytes", mem["peak_bytes"])
                        setattr(pt, f"{mode}_setup_bytes", mem.get("setup_bytes"))
                points.append(pt)
                progress(point_line(pt))
            del model
    return points


def point_line(pt: Point) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.2f} ms"

    text = (
        f"{pt.architecture:<10} {pt.model_size:<6} T={pt.seq_len:<6} "
        f"fwd {ms(pt.fwd_s)}  fwd+bwd {ms(pt.fwd_bwd_s)}"
    )
    if pt.fwd_bwd_mem_bytes is not None:
        text += f"  mem {pt.fwd_bwd_mem_bytes / 2**20:.1f} MiB"
    return text + (f"  [{pt.error}]" if pt.error else "")


if __name__ == "__main__":  # a memory point: python -m archlab.bench.lengths.measure '<json spec>'
    print(json.dumps(measure_memory_here(json.loads(sys.argv[1]))))

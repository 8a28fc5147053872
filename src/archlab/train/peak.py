"""The peak FLOP/s that MFU divides by: one number per machine, the same in every run.

A peak measured at each run's start moves with whatever else the machine is doing (on a shared
2-core machine it ranged from 101 to 392 GFLOP/s, so two identical runs reported 18.5% and
40.7% MFU). The peak is therefore, in this order:

1. stated: ``ARCHLAB_PEAK_FLOPS`` (FLOP/s per device, e.g. ``3.2e12``), or the datasheet's dense
   figure of a known GPU (``GPU_PEAKS``) for the training dtype;
2. measured once per machine and cached: the best of square matmuls timed for about a second,
   stored with how it was measured in ``<cache>/peak_flops.json``, keyed by device model,
   thread count, dtype and torch version. ``<cache>``: ``ARCHLAB_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/archlab``, else ``~/.cache/archlab``. Delete the file to measure again;
3. measured in this process, when the cache cannot be read or written (said so).

summary.json records the figure, its source and how it was obtained; the compare report
prints them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError

ENV_PEAK = "ARCHLAB_PEAK_FLOPS"
ENV_CACHE = "ARCHLAB_CACHE_DIR"
CACHE_FILE = "peak_flops.json"
MEASURE_S = 1.0  # seconds of timed products on a CPU; the best one is the peak

# Dense (no sparsity) tensor throughput per GPU from NVIDIA's datasheets, FLOP/s. float32
# matmuls in torch run without TF32 unless the user allows it, hence the plain FP32 figure.
# (substrings the device name contains, {dtype: FLOP/s}); the first match wins.
GPU_PEAKS: tuple[tuple[tuple[str, ...], dict[torch.dtype, float]], ...] = (
    (("H100", "NVL"), {}),  # listed so that the NVL variant is measured, not given SXM figures
    (("H100", "PCIe"), {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 51e12}),
    (("H100",), {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    (("H200",), {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    (("A100",), {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
)


@dataclass(frozen=True)
class Peak:
    """FLOP/s of one device, where the figure came from and how it was obtained."""

    flops: float
    source: str  # "stated" | "measured once (cached)" | "measured in this run"
    how: str

    def describe(self) -> str:
        return f"{self.flops / 1e9:,.1f} GFLOP/s per device, {self.source}: {self.how}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "archlab"


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return f"{cpu_model()}, {torch.get_num_threads()} threads"
    return dev.type


def _stated(dev: torch.device, dtype: torch.dtype) -> Peak | None:
    text = os.environ.get(ENV_PEAK)
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise UserError(f"{ENV_PEAK}={text!r}: expected FLOP/s per device, e.g. 3.2e12")
        return Peak(value, "stated", f"{ENV_PEAK}={text}")
    if dev.type == "cuda":
        name = _device_name(dev)
        for parts, figures in GPU_PEAKS:
            if all(part in name for part in parts):
                if dtype in figures:
                    return Peak(figures[dtype], "stated", f"{name} datasheet, dense {dtype}")
                return None
    return None


def peak(device: str | torch.device, dtype: torch.dtype = torch.float32) -> Peak:
    """The peak for ``device`` in ``dtype``: stated, else cached, else measured (module doc)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _peak(str(dev), dtype, torch.get_num_threads(), os.environ.get(ENV_PEAK))


@functools.lru_cache(maxsize=8)
def _peak(device: str, dtype: torch.dtype, threads: int, stated: str | None) -> Peak:
    dev = torch.device(device)
    found = _stated(dev, dtype)
    if found is not None:
        return found
    key = f"{dev.type}|{_device_name(dev)}|{dtype}|torch {torch.__version__}"
    path = cache_dir() / CACHE_FILE
    try:
        entries = json.loads(path.read_text())
        entry = entries[key]
        return Peak(float(entry["flops"]), "measured once (cached)", entry["how"] + f"; {path}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    flops, how = measure_peak_flops(dev, dtype)
    how += f" on {_dt.date.today().isoformat()}"
    try:  # read again: another process may have added its own key meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
            entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = {"flops": flops, "how": how}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as exc:
        return Peak(flops, "measured in this run", how + f" (not cached: {exc.strerror})")
    return Peak(flops, "measured once (cached)", how + f"; {path}")


def measure_peak_flops(dev: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Best FLOP/s of a square matmul on ``dev`` in ``dtype``, and a line saying how.

    The size grows from 256 until one product takes ~20 ms (at most 2048 on a CPU, 8192 on a
    GPU), so a dtype the hardware emulates slowly (fp16 on most CPUs) costs a bounded time;
    then products are timed for MEASURE_S seconds (0.5 s on a GPU) and the fastest counts:
    other work on the machine only ever slows a product down."""

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elif dev.type == "mps":
            torch.mps.synchronize()

    def timed(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return (time.perf_counter() - t0) / reps

    gpu = dev.type in ("cuda", "mps")
    n_max, reps, budget = (8192, 10, 0.5) if gpu else (2048, 1, MEASURE_S)
    n = 256
    while True:
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        timed(a, b, 1)  # warm up kernels / thread pools
        if n >= n_max or timed(a, b, reps) >= 0.02:
            break
        n *= 2
    best, trials, start = float("inf"), 0, time.perf_counter()
    while trials < 3 or (time.perf_counter() - start < budget and trials < 500):
        best = min(best, timed(a, b, reps))
        trials += 1
    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    how = f"best of {trials} {n}x{n} {str(dtype).replace('torch.', '')} matmuls{threads}"
    return 2.0 * n**3 / best, how


def peak_record(p: Peak) -> dict[str, object]:
    """The summary.json fields."""
    d = asdict(p)
    return {"peak_flops": d["flops"], "peak_flops_source": d["source"], "peak_flops_how": d["how"]}

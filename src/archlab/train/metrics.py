"""Run logging: metrics.jsonl (the contract), optional TensorBoard / Weights & Biases, peak memory.

metrics.jsonl holds one JSON object per line: ``{"kind": "train", ...}`` every log interval
and ``{"kind": "eval", ...}`` at every evaluation. It is appended to and flushed per record,
so a killed run keeps everything it logged; a resumed run first drops the records after the
checkpoint it resumes from, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": JSON has no literal for them
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def check_logging_backends(tensorboard: bool, wandb: bool) -> None:
    """Fail early, in one line, when a requested backend is not installed."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "--tensorboard: the tensorboard package is not installed (pip install tensorboard)"
        )
    if wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb: the wandb package is not installed (pip install wandb)")


class MetricsWriter:
    """Writes metrics.jsonl and mirrors scalars to TensorBoard / W&B when asked."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        check_logging_backends(tensorboard, wandb)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        self._f = open(self.path, "a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb:
            import wandb as wandb_mod

            self._wandb = wandb_mod.init(
                project=os.environ.get("WANDB_PROJECT", "archlab"),
                name=run_name,
                dir=str(run_dir),
                config=config or {},
                resume="allow",
            )

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (what the resumed checkpoint had seen)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def log(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(_jsonable(record)) + "\n")
            self._f.flush()
        except OSError as exc:  # name the file: a bare "[Errno 28]" says not where
            if exc.filename is None:
                exc.filename = str(self.path)
            raise
        step = int(record.get("step", 0))
        kind = record.get("kind", "train")
        scalars = {
            f"{kind}/{k}": v
            for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Readers see the old or the new file; a failed write (full disk) leaves no temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(_jsonable(data), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # name the file the user knows, not our temporary
            exc.filename, exc.filename2 = str(path), None
        raise


# ---- memory -------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` line of /proc/self/status (Linux), in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_cpu_peak() -> bool:
    """Reset the resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0).

    Without it the CPU peak is the process's lifetime maximum, so a second run in one process
    (or a benchmark point after setup) would report the first one's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_bytes() -> int:
    """Peak resident set size since the last reset_cpu_peak (VmHWM), else since start."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: at the first step. (The CPU high-water mark is reset where the memory before the
    model is read, so the CPU peak covers building the model too.)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by tensors; MPS: driver allocated; CPU: peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    return cpu_peak_bytes()


def current_memory_bytes(device: torch.device) -> int | None:
    """What the process holds now, measured like peak_memory_bytes: CUDA allocated by
    tensors, CPU resident set size (Linux /proc; None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def memory_kind(device: torch.device) -> str:
    """What peak_mem_bytes measures on this device, for reports."""
    return {"cuda": "cuda_max_allocated", "mps": "mps_driver_allocated"}.get(
        device.type, "cpu_peak_rss"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"

"""What ran a benchmark: machine, CPU, GPU, memory, threads and library versions.

Every report carries this so that a number can be traced to the machine that produced it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGES = ("archlab", "torch", "numpy", "tokenizers", "safetensors", "matplotlib", "transformers")


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """Commit of the archlab checkout, when it runs from one (editable install)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def hardware_info() -> dict[str, Any]:
    """Machine, CPU, GPU, torch build and threads, library versions and the date."""
    import torch

    from ...train.peak import cpu_model

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "memory_bytes": _total_memory_bytes(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
        "mps_available": bool(
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ),
        "versions": {name: _version(name) for name in _PACKAGES},
        "git_commit": _git_commit(),
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_bytes": props.total_memory})
    return info


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def hardware_lines(info: dict[str, Any]) -> list[str]:
    """Markdown bullet lines for a report."""
    gpus = ", ".join(f"{g['name']} ({format_bytes(g['memory_bytes'])})" for g in info["gpus"])
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines = [
        f"- Date: {info['date']}",
        f"- Machine: {info['platform']} ({info['machine']})",
        f"- CPU: {info['cpu']}, {info['cpu_count']} logical cores, "
        f"{info['usable_cpus']} usable by this process",
        f"- Memory: {format_bytes(info['memory_bytes'])}",
        f"- GPU: {gpus or 'none'}" + (f" (CUDA {info['cuda_version']})" if info["gpus"] else ""),
        f"- Python {info['python']}, torch {info['torch']}, "
        f"{info['torch_threads']} intra-op / {info['torch_interop_threads']} inter-op threads",
        f"- Versions: {versions}",
    ]
    if info.get("thread_env"):
        env = ", ".join(f"{k}={v}" for k, v in info["thread_env"].items())
        lines.append(f"- Thread environment: {env}")
    if info.get("git_commit"):
        lines.append(f"- archlab commit: {info['git_commit']}")
    return lines

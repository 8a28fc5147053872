"""Fused CPU kernels (numba) for the recurrent mixers, and their availability switch.

    scan_cpu.py      Mamba's selective scan, forward and backward
    mamba_cpu.py     Mamba's whole mixer interior (conv, projections, scan) as one autograd node
    hypermix_cpu.py  HyperMixing's causal mixer, forward and backward
    decode_cpu.py    single-token decode steps: whole Mamba / hybrid-Mamba / HyperMixer blocks
    _decode.py       what those steps share: linear, norm and MLP kernels, per-module plans
    ssd_cpu.py       Mamba-2's SSD as the fused recurrence (with the D skip), forward and backward
    delta_cpu.py     the gated delta rule (Gated DeltaNet) as the fused recurrence, both ways
    conv_cpu.py      causal depthwise conv + SiLU as one node (Mamba-2, Gated DeltaNet)
    gated_norm_cpu.py  their gated RMSNorms (gate before or after the norm) as one node
    _numba.py        numba's import, the kernel decorator, vectorised exp, threads over rows

Each kernel is optional: :func:`fused_available` says whether it can run (numba imports and the
kernel has not failed to compile in this process); callers fall back to the torch
implementations, printing :func:`kernel_notice` once. ``ARCHLAB_KERNELS=off`` disables all of
them (the torch paths then run everywhere, as without numba).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ._numba import IMPORT_ERROR, NUMBA, notice_once

__all__ = ["cpu_kernel_ready", "disable_fused", "fused_available", "kernel_notice"]

_failed: dict[str, str] = {}


def fused_available(name: str) -> bool:
    """True when kernel ``name`` ("scan", "hypermix") may be used in this process."""
    switch = os.environ.get("ARCHLAB_KERNELS")  # read per call: decode steps ask per token
    if switch and switch.strip().lower() in ("off", "0", "none"):
        return False
    return NUMBA and name not in _failed


def kernel_notice(name: str, message: str) -> None:
    """One line on stderr, once per process and kernel, saying why the fallback runs."""
    if os.environ.get("ARCHLAB_KERNELS", "").strip().lower() in ("off", "0", "none"):
        why = "ARCHLAB_KERNELS=off"
    else:
        why = _failed.get(name) or IMPORT_ERROR or "unknown reason"
    notice_once(name, f"archlab: {message} ({why})")


def disable_fused(name: str, exc: BaseException) -> None:
    """Mark kernel ``name`` unusable after it raised (typically a numba compile error)."""
    _failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def cpu_kernel_ready(
    name: str,
    x: torch.Tensor,
    module: nn.Module,
    warm_up: Callable[[torch.dtype], None],
    fallback: str,
) -> bool:
    """True when kernel ``name`` may run on ``x``: CPU, float32/float64 as all of ``module``'s
    parameters, the kernel not switched off, and compiled (``warm_up(dtype)``; a failure
    disables it for the process with one notice, ``fallback`` saying what runs instead)."""
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or any(p.dtype != x.dtype for p in module.parameters())
        or not fused_available(name)
    ):
        return False
    try:
        warm_up(x.dtype)
    except Exception as exc:  # compile failure: the torch ops from now on
        disable_fused(name, exc)
        kernel_notice(name, fallback)
        return False
    return True

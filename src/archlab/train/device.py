"""Device choice, mixed-precision dtype and host-to-device copies of a training run.

The step (``step.py``) and evaluation (``evaluate.py``) both run under the same autocast and
move batches the same way; they take these helpers so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..errors import UserError


def device_type(name: str) -> str:
    """The device type ``--device`` names ("auto": cuda when available), before it is picked;
    the process group's backend depends on it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (try --device cpu)")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine (try --device cpu)")
    return torch.device(name)


def amp_dtype(device: torch.device) -> tuple[torch.dtype, bool]:
    """(autocast dtype, needs a gradient scaler): bf16 where the device supports it, else fp16."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:  # mps: bf16 from macOS 14
        bf16 = bool(getattr(torch.backends.mps, "is_macos_or_newer", lambda *a: False)(14, 0))
    return (torch.bfloat16, False) if bf16 else (torch.float16, True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on the device's type; a no-op context when AMP is off (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host batch on the device; pinned and non-blocking on CUDA, so the copy overlaps work."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

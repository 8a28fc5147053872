"""Device choice and mixed-precision dtype of a training run."""

from __future__ import annotations

import torch

from ..errors import UserError


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

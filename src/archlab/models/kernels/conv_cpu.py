"""Fused CPU causal depthwise conv + SiLU (numba) as one autograd node, for Mamba-2 and Gated
DeltaNet's short convolutions over (B, T, channels) inputs.

The kernels are Mamba-1's (``mamba_cpu._conv_silu_fwd`` / ``_conv_silu_bwd``: channels-last,
one work item per batch row, the backward walks time in reverse with a ring buffer). In torch the
same conv is K shifted multiply-adds and a SiLU, ~2 K + 2 passes over a (B, T, C) tensor each
way plus the saved copies; here it is one pass forward and one backward, and only the input is
saved (the pre-activation is recomputed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._numba import NUMBA, parallel_for, warm_up_once

__all__ = ["conv_silu", "warm_up"]


def _np(t: Tensor):
    return t.detach().numpy()


class _ConvSiLU(torch.autograd.Function):
    """(x (B, T, C) contiguous, weight (C, 1, K), bias (C,) or None) -> SiLU(conv(x)) (B, T, C)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        from .mamba_cpu import _conv_silu_fwd

        Bsz, T, C = x.shape
        wT = weight.reshape(C, -1).t().contiguous()  # (K, C)
        cb = bias if bias is not None else x.new_zeros(C)
        out = x.new_empty(Bsz, T, C)
        parallel_for(
            _conv_silu_fwd, Bsz, Bsz * T * C * wT.shape[0], _np(x), _np(wT), _np(cb), _np(out)
        )
        ctx.save_for_backward(x, wT, cb)
        ctx.has_bias, ctx.w_shape = bias is not None, weight.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # type: ignore[override]
        from .mamba_cpu import _conv_silu_bwd

        x, wT, cb = ctx.saved_tensors
        Bsz, T, C = x.shape
        K = wT.shape[0]
        dx = torch.empty_like(x)
        dwT_b, db_b = x.new_empty(Bsz, K, C), x.new_empty(Bsz, C)
        parallel_for(
            _conv_silu_bwd, Bsz, Bsz * T * C * K * 3,
            _np(x), _np(wT), _np(cb), _np(gout.contiguous()), _np(dx), _np(dwT_b), _np(db_b),
        )  # fmt: skip
        dw = dwT_b.sum(0).t().reshape(ctx.w_shape)
        return dx, dw, db_b.sum(0) if ctx.has_bias else None


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """SiLU(causal depthwise conv1d(x)) over x (B, T, C) with zero history; weight (C, 1, K).
    CPU, one float32/float64 dtype."""
    with torch.autocast("cpu", enabled=False):
        return _ConvSiLU.apply(x.contiguous(), weight, bias)


_warm: set[torch.dtype] = set()


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load) the conv kernels for ``dtype``; raises on failure."""
    if not NUMBA:
        raise RuntimeError("numba is not available")

    def tiny_step() -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 2, generator=g, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 1, 2, generator=g, dtype=dtype, requires_grad=True)
        b = torch.randn(2, generator=g, dtype=dtype, requires_grad=True)
        conv_silu(x, w, b).sum().backward()

    warm_up_once(_warm, dtype, tiny_step)

"""Fused CPU Mamba mixer interior (numba + torch matmuls): everything between in_proj and out_proj.

Training path of :class:`archlab.models.mamba.MambaMixer` on CPU. One autograd node replaces
the ~20 torch ops (and their saved activations) of

    xc = SiLU(causal depthwise conv1d(x))     x = xz[..., :d_inner], z = xz[..., d_inner:]
    dt, B, C = x_proj(xc);  delta = dt_proj.weight @ dt
    y = selective_scan(xc, delta, -exp(A_log), B, C, D, z, dt_proj.bias, softplus)

Memory: the node saves only its input xz (B, T, 2 d_inner), the parameters and the scan's state
checkpoints (1/64 of the states). The backward pass recomputes xc (one conv kernel), the two small
projections and the scan's states from those, as the reference ``mamba_inner_fn`` does: per layer
that is 2 d_inner floats per token where the op-by-op graph keeps ~6.5 d_inner (conv input
and output, xc, x_proj output, delta, z, the scan's pre-gate output).

Conv kernels: channels-last (B, T, d_inner) layout straight from in_proj's output (no transposes
or copies), one work item per batch row, vectorised over channels; the backward walks time in
reverse with a ring buffer of the last K gate gradients, so it needs no (B, T, D) scratch.

The single-token decode step of the same mixer lives in ``decode_cpu.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._numba import NUMBA, kernel, parallel_for, warm_up_once
from .scan_cpu import _np, scan_backward, scan_forward

__all__ = ["mamba_inner", "warm_up_inner"]

if NUMBA:
    from ._numba import helper, vexp

    @helper
    def _conv_pre(xz, b, t, wT, cb, acc):
        """acc[d] = cb[d] + sum_k wT[k, d] xz[b, t - K + 1 + k, d]: the causal depthwise conv
        of step t before its SiLU (taps before the sequence start are zero)."""
        K, di = wT.shape
        for d in range(di):
            acc[d] = cb[d]
        for k in range(K):
            tt = t - K + 1 + k
            if tt >= 0:
                for d in range(di):
                    acc[d] += wT[k, d] * xz[b, tt, d]

    @kernel
    def _conv_silu_fwd(lo, hi, xz, wT, cb, xc):
        """xc[b, t, d] = silu(cb[d] + sum_k wT[k, d] xz[b, t - K + 1 + k, d]), d < d_inner."""
        T = xz.shape[1]
        K, di = wT.shape
        one = np.ones(1, dtype=xz.dtype)[0]
        acc = np.empty(di, dtype=xz.dtype)
        for b in range(lo, hi):
            for t in range(T):
                _conv_pre(xz, b, t, wT, cb, acc)
                for d in range(di):
                    a = acc[d]
                    xc[b, t, d] = a / (one + vexp(-a))

    @kernel
    def _conv_silu_bwd(lo, hi, xz, wT, cb, gxc, dxz, dwT_b, db_b):
        """Gradients of :func:`_conv_silu_fwd`: dx into dxz[..., :d_inner], per-batch-row dwT_b
        (B, K, d_inner) and db_b (B, d_inner). Time runs backwards; ring[t % K] holds the
        pre-activation gradient of step t, the K newest are all dx[t] needs."""
        T = xz.shape[1]
        K, di = wT.shape
        one = np.ones(1, dtype=xz.dtype)[0]
        acc = np.empty(di, dtype=xz.dtype)
        ring = np.zeros((K, di), dtype=xz.dtype)
        for b in range(lo, hi):
            ring[:, :] = 0.0
            dwT_b[b, :, :] = 0.0
            db_b[b, :] = 0.0
            for t in range(T - 1, -1, -1):
                _conv_pre(xz, b, t, wT, cb, acc)
                r = t % K
                for d in range(di):
                    a = acc[d]
                    s = one / (one + vexp(-a))
                    ga = gxc[b, t, d] * s * (one + a * (one - s))
                    ring[r, d] = ga
                    db_b[b, d] += ga
                for k in range(K):
                    tt = t - K + 1 + k
                    if tt >= 0:
                        for d in range(di):
                            dwT_b[b, k, d] += ring[r, d] * xz[b, tt, d]
                for d in range(di):
                    acc[d] = 0.0
                for k in range(K):
                    ts = t + K - 1 - k  # the step whose window holds x_t at tap k
                    if ts < T:
                        rs = ts % K
                        for d in range(di):
                            acc[d] += wT[k, d] * ring[rs, d]
                for d in range(di):
                    dxz[b, t, d] = acc[d]


def conv_silu(xz: Tensor, wT: Tensor, cb: Tensor) -> Tensor:
    """SiLU(causal depthwise conv) of xz[..., :d_inner]; wT (K, d_inner). -> (B, T, d_inner)."""
    Bsz, T, _ = xz.shape
    K, di = wT.shape
    xc = xz.new_empty(Bsz, T, di)
    parallel_for(_conv_silu_fwd, Bsz, Bsz * T * di * K, _np(xz), _np(wT), _np(cb), _np(xc))
    return xc


class _MambaInner(torch.autograd.Function):
    """(xz, conv weight (di, 1, K), conv bias, x_proj weight, dt_proj weight, dt_proj bias,
    A_log, D) -> y (B, T, di); one dtype, xz contiguous."""

    @staticmethod
    def _recompute(xz, wT, cb, xw, dtw, R, N):
        di = wT.shape[1]
        xc = conv_silu(xz, wT, cb)  # (B, T, di)
        dbc = F.linear(xc, xw)  # (B, T, R + 2 N)
        dt = dbc[..., :R]
        Bm, Cm = dbc[..., R : R + N].contiguous(), dbc[..., R + N :].contiguous()
        delta = F.linear(dt, dtw)  # (B, T, di), dt_proj's bias is added in the kernel
        return xc, dt, Bm, Cm, delta, xz[..., di:].contiguous()

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, xw, dtw, dtb, A_log, Dp):  # type: ignore[override]
        R, N = dtw.shape[1], A_log.shape[1]
        wT = conv_w.reshape(conv_w.shape[0], -1).t().contiguous()  # (K, di)
        xc, _, Bm, Cm, delta, z = _MambaInner._recompute(xz, wT, conv_b, xw, dtw, R, N)
        At = (-torch.exp(A_log)).t().contiguous()  # (N, di)
        out, _, ckpt, flags = scan_forward(xc, delta, At, Bm, Cm, Dp, z, dtb, None, True)
        ctx.save_for_backward(xz, wT, conv_b, xw, dtw, dtb, A_log, Dp, At, ckpt)
        ctx.flags, ctx.conv_shape = flags, conv_w.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # type: ignore[override]
        xz, wT, cb, xw, dtw, dtb, A_log, Dp, At, ckpt = ctx.saved_tensors
        Bsz, T, two_di = xz.shape
        di, R, N = two_di // 2, dtw.shape[1], A_log.shape[1]
        xc, dt, Bm, Cm, delta, z = _MambaInner._recompute(xz, wT, cb, xw, dtw, R, N)
        du, ddelta, dA, dB, dC, dD, dz, dbias, _ = scan_backward(
            xc, delta, At, Bm, Cm, Dp, z, dtb, ckpt, ctx.flags, gout.contiguous(), None
        )
        ddt = ddelta @ dtw  # (B, T, R)
        d_dtw = ddelta.reshape(-1, di).t() @ dt.reshape(-1, R)  # (di, R)
        ddbc = torch.cat([ddt, dB, dC], dim=-1)  # (B, T, R + 2 N)
        d_xw = ddbc.reshape(-1, R + 2 * N).t() @ xc.reshape(-1, di)  # (R + 2 N, di)
        dxc = du.add_(ddbc @ xw)  # (B, T, di)
        K = wT.shape[0]
        dxz = torch.empty_like(xz)
        dwT_b, db_b = xz.new_empty(Bsz, K, di), xz.new_empty(Bsz, di)
        parallel_for(
            _conv_silu_bwd, Bsz, Bsz * T * di * K * 3,
            _np(xz), _np(wT), _np(cb), _np(dxc), _np(dxz), _np(dwT_b), _np(db_b),
        )  # fmt: skip
        dxz[..., di:] = dz
        d_conv_w = dwT_b.sum(0).t().reshape(ctx.conv_shape)
        dA_log = dA * (-torch.exp(A_log))  # A = -exp(A_log)
        return dxz, d_conv_w, db_b.sum(0), d_xw, d_dtw, dbias, dA_log, dD


def mamba_inner(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D) -> Tensor:
    """Fused mixer interior; xz (B, T, 2 d_inner) -> y (B, T, d_inner). All tensors CPU, one
    dtype (float32 or float64); see the module docstring for what is saved."""
    with torch.autocast("cpu", enabled=False):
        return _MambaInner.apply(
            xz.contiguous(), conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D
        )


_warm: set[torch.dtype] = set()


def warm_up_inner(dtype: torch.dtype) -> None:
    """Compile (or load) the conv kernels for ``dtype`` and run one tiny forward and backward
    of the whole node; raises on failure (the caller then uses the op-by-op graph)."""
    if dtype in _warm:
        return
    from .scan_cpu import warm_up

    warm_up(dtype)  # the scan kernels first (raises without numba)

    def tiny_step() -> None:
        g = torch.Generator().manual_seed(0)
        di, N, R, K = 3, 2, 1, 2
        shapes = [(1, 2, 2 * di), (di, 1, K), (di,), (R + 2 * N, di), (di, R), (di,), (di, N)]
        shapes.append((di,))
        args = [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]
        mamba_inner(*args).sum().backward()

    warm_up_once(_warm, dtype, tiny_step)

"""Fused CPU causal HyperMixing (numba): one pass over time, the running sum in cache.

Math of :func:`archlab.models.hypermixer.causal_hypermix`, w1, w2 (B, T, M); x (B, T, D):

    S_t   = S_0 + sum_{i<=t} w1_i x_i^T          (M, D) running sum
    out_t = w2_t . GELU(S_t / n_t)               n_t = start + t + 1

Columns of S are independent in the forward pass, so one work item is (batch b, block of
``_LANES`` channels): its slice S (M, lanes) stays in L1, the inner loop runs over the lanes
(four AVX-512 vectors), the loop above over the M slots, the outer loop over time, and items run in
parallel. The chunked torch version instead materialises every S_t of a 16-step chunk
(B, 16, M, D) and contracts it with a masked (16 x 16) matmul: ~16x the flops of the prefix sum
and 4-5 passes over memory per step; here each element of S_t is touched once, in registers.

Backward (R_i = sum_{t>=i} dL/dS_t, dL/dS_t = GELU'(P_t) * w2_t g_t^T / n_t):
    dw1_i = R_i x_i,  dx_i = R_i^T w1_i,  dw2_t = GELU(P_t) g_t,  dS_0 = R_0.
It walks ``_CHUNK``-step chunks in reverse, recomputing one chunk's S_t from the checkpoint saved
at its start (forward stores S every chunk: (B, T / chunk, M, D), 1/32 of all S_t) into a
per-item buffer, then accumulates R backwards. The sums over channels (dw1, dw2) are reduced in
the item; items are (b, group of channel blocks) with as few groups as keep every thread busy,
and the groups' partial sums are added in torch.

float32 uses a vectorised GELU (erf of Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, see
``_numba.py``); float64 the exact ``math.erf``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._numba import NUMBA, kernel, parallel_for, warm_up_once
from .scan_cpu import block_group

__all__ = ["fused_hypermix", "warm_up"]

# channels per work item: 64 (four AVX-512 vectors) so the backward's sums over channels (dw1,
# dw2) take one horizontal reduction per four vectors. Thread CPU time at T = 1024, B = 8, M = 64,
# D = 128, 1 thread: lanes 16 -> 64 forward 36 -> 30 ms, backward 94 -> 44 ms
_LANES = 64
_CHUNK = 32  # time steps between checkpoints of S
_MAX_GROUP = 4  # channel blocks per forward work item (their S: 4 x M x 64 floats)


if NUMBA:
    from ._numba import gelu_and_grad

    @kernel
    def _mix_fwd(lo, hi, G, w1, x, w2, s0, invs, K, save, out, s_last, ckpt):
        """Forward over items [lo, hi) of (b, group of G channel blocks); ckpt (B, nck, M, D)
        written when ``save``. Per time step an item runs its group's blocks in turn, reading
        G x 64 contiguous channels of each x row (see scan_cpu.block_group).

        Hot loops run over all ``_LANES`` lanes of local arrays (a constant trip count LLVM
        turns into whole vectors); lanes past D hold zeros and are never written back."""
        Bsz, T, D = x.shape
        M = w1.shape[2]
        nblk = (D + _LANES - 1) // _LANES
        ngrp = (nblk + G - 1) // G
        SG = np.zeros((G, M, _LANES), dtype=x.dtype)
        o = np.zeros(_LANES, dtype=x.dtype)
        xv = np.zeros(_LANES, dtype=x.dtype)
        for item in range(lo, hi):
            b = item // ngrp
            g0 = (item % ngrp) * G
            ng = min(G, nblk - g0)
            SG[:, :, :] = 0.0
            xv[:] = 0.0
            for gi in range(ng):
                d0 = (g0 + gi) * _LANES
                w = min(_LANES, D - d0)
                for m in range(M):
                    for j in range(w):
                        SG[gi, m, j] = s0[b, m, d0 + j]
            for t in range(T):
                inv = invs[t]
                for gi in range(ng):
                    d0 = (g0 + gi) * _LANES
                    w = min(_LANES, D - d0)
                    S = SG[gi]
                    if save and t % K == 0:
                        c = t // K
                        for m in range(M):
                            for j in range(w):
                                ckpt[b, c, m, d0 + j] = S[m, j]
                    for j in range(w):
                        xv[j] = x[b, t, d0 + j]
                    for j in range(_LANES):
                        o[j] = 0.0
                    for m in range(M):
                        a = w1[b, t, m]
                        r = w2[b, t, m]
                        for j in range(_LANES):
                            s = S[m, j] + a * xv[j]
                            S[m, j] = s
                            o[j] += r * gelu_and_grad(s * inv)[0]
                    for j in range(w):
                        out[b, t, d0 + j] = o[j]
            for gi in range(ng):
                d0 = (g0 + gi) * _LANES
                w = min(_LANES, D - d0)
                for m in range(M):
                    for j in range(w):
                        s_last[b, m, d0 + j] = SG[gi, m, j]

    @kernel
    def _mix_bwd(lo, hi, w1, x, w2, invs, K, G, ckpt, gout, dw1_g, dx, dw2_g, ds0):
        """Backward over items [lo, hi) of (b, group); dw1_g, dw2_g (G, B, T, M) zeroed."""
        Bsz, T, D = x.shape
        M = w1.shape[2]
        nblk = (D + _LANES - 1) // _LANES
        nck = (T + K - 1) // K
        zero = np.zeros(1, dtype=x.dtype)[0]
        Ss = np.zeros((K + 1, M, _LANES), dtype=x.dtype)  # checkpoint, then S_t of one chunk
        Xs = np.zeros((K, _LANES), dtype=x.dtype)
        R = np.zeros((M, _LANES), dtype=x.dtype)
        gv = np.zeros(_LANES, dtype=x.dtype)
        dxv = np.zeros(_LANES, dtype=x.dtype)
        for item in range(lo, hi):
            b = item // G
            grp = item % G
            for blk in range(grp, nblk, G):
                d0 = blk * _LANES
                w = min(_LANES, D - d0)
                R[:, :] = 0.0
                Ss[:, :, :] = 0.0
                Xs[:, :] = 0.0
                gv[:] = 0.0
                for c in range(nck - 1, -1, -1):
                    t0 = c * K
                    L = min(T, t0 + K) - t0
                    for m in range(M):
                        for j in range(w):
                            Ss[0, m, j] = ckpt[b, c, m, d0 + j]
                    for i in range(L):  # recompute S_t of the chunk from its checkpoint
                        t = t0 + i
                        for j in range(w):
                            Xs[i, j] = x[b, t, d0 + j]
                        for m in range(M):
                            a = w1[b, t, m]
                            for j in range(_LANES):
                                Ss[i + 1, m, j] = Ss[i, m, j] + a * Xs[i, j]
                    for i in range(L - 1, -1, -1):
                        t = t0 + i
                        inv = invs[t]
                        for j in range(w):
                            gv[j] = gout[b, t, d0 + j]
                        for j in range(_LANES):
                            dxv[j] = 0.0
                        for m in range(M):
                            a = w1[b, t, m]
                            r = w2[b, t, m] * inv
                            acc1 = zero
                            acc2 = zero
                            for j in range(_LANES):
                                act, slope = gelu_and_grad(Ss[i + 1, m, j] * inv)
                                acc2 += act * gv[j]
                                rr = R[m, j] + slope * r * gv[j]  # R_t = R_{t+1} + dL/dS_t
                                R[m, j] = rr
                                acc1 += rr * Xs[i, j]
                                dxv[j] += rr * a
                            dw1_g[grp, b, t, m] += acc1
                            dw2_g[grp, b, t, m] += acc2
                        for j in range(w):
                            dx[b, t, d0 + j] = dxv[j]
                for m in range(M):
                    for j in range(w):
                        ds0[b, m, d0 + j] = R[m, j]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _inverse_counts(start: int, T: int, dtype: torch.dtype) -> Tensor:
    """1 / n_t for t < T, computed as the torch implementation does (same rounding)."""
    return 1.0 / torch.arange(start + 1, start + T + 1, dtype=dtype)


def _forward(w1, x, w2, s0, start, save):
    B, T, D = x.shape
    M = w1.shape[2]
    out = torch.empty_like(x)
    s_last = torch.empty(B, M, D, dtype=x.dtype)
    ckpt = torch.empty(B, -(-T // _CHUNK) if save else 1, M, D if save else 1, dtype=x.dtype)
    nblk = -(-D // _LANES)
    G = block_group(B, nblk, _MAX_GROUP)
    parallel_for(
        _mix_fwd, B * -(-nblk // G), B * T * M * D, G,
        _np(w1), _np(x), _np(w2), _np(s0), _np(_inverse_counts(start, T, x.dtype)), _CHUNK, save, _np(out), _np(s_last), _np(ckpt),
    )  # fmt: skip
    return out, s_last, ckpt


class _FusedHyperMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1, x, w2, s0, start):  # type: ignore[override]
        out, s_last, ckpt = _forward(w1, x, w2, s0, start, True)
        ctx.save_for_backward(w1, x, w2, ckpt)
        ctx.start = start
        ctx.mark_non_differentiable(s_last)
        return out, s_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, _g_s):  # type: ignore[override]
        w1, x, w2, ckpt = ctx.saved_tensors
        B, T, D = x.shape
        M = w1.shape[2]
        nblk = -(-D // _LANES)
        threads = torch.get_num_threads()
        G = min(nblk, max(1, -(-2 * threads // B)))  # enough (b, group) items for every thread
        dw1_g, dw2_g = x.new_zeros(G, B, T, M), x.new_zeros(G, B, T, M)
        dx, ds0 = torch.empty_like(x), x.new_empty(B, M, D)
        parallel_for(
            _mix_bwd, B * G, B * T * M * D,
            _np(w1), _np(x), _np(w2), _np(_inverse_counts(ctx.start, T, x.dtype)), _CHUNK, G, _np(ckpt), _np(gout.contiguous()),
            _np(dw1_g), _np(dx), _np(dw2_g), _np(ds0),
        )  # fmt: skip
        return dw1_g.sum(0), dx, dw2_g.sum(0), ds0, None


_warm: set[torch.dtype] = set()


def _tiny_step(dtype: torch.dtype) -> None:
    """One forward and backward of both kernels on a tiny problem."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(1, 2, 3, generator=g, dtype=dtype, requires_grad=True) for _ in "ab")
    x = torch.randn(1, 2, 4, generator=g, dtype=dtype, requires_grad=True)
    s0 = torch.zeros(1, 3, 4, dtype=dtype, requires_grad=True)
    out, _ = _FusedHyperMix.apply(w1, x, w2, s0, 0)
    out.sum().backward()


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load) both kernels for ``dtype`` once; raises on failure. Runs isolated
    (outside inference mode, no_grad and checkpoint recomputation) so the tiny backward pass
    can be taken wherever the first use happens."""
    warm_up_once(_warm, dtype, lambda: _tiny_step(dtype))


def fused_hypermix(
    w1: Tensor, x: Tensor, w2: Tensor, s0: Tensor, start: int, needs_grad: bool
) -> tuple[Tensor, Tensor]:
    """(out (B, T, D), final S (B, M, D)); inputs already in one float dtype."""
    args = [t.contiguous() for t in (w1, x, w2, s0)]
    if needs_grad:
        return _FusedHyperMix.apply(*args, int(start))
    with torch.no_grad():
        out, s_last, _ = _forward(*args, int(start), False)
    return out, s_last

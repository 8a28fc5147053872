"""Fused CPU SSD (Mamba-2's scan, numba): the recurrence in one pass over time, forward and back.

Same math as :func:`archlab.models.ssd.ssd_sequential` plus the D skip, per head h with a
scalar decay a_t = exp(dt_t A_h) and the state S (P x N) of one (batch row, head):

    S_t = a_t S_{t-1} + (dt_t x_t) B_t^T,    y_t = S_t C_t + D_h x_t

Why the recurrence and not the chunked form on a CPU: at the CPU sizes (P 32, N 64, chunk 64)
the chunked form does more arithmetic per token (C B^T, the masked Q x Q scores times x, each
chunk's state and the carried state's read: ~52 k multiply-adds per token and layer at nano
against the recurrence's ~33 k) and runs it as ~40 torch ops over (B, H, chunks, Q, Q)
tensors; the recurrence keeps S (8 KiB) in L1 and touches each input once. Measured (training
step of the nano model, 2 threads): see benchmarks/bench_layers.py and the closing note of
issue 25. The chunked form stays the path on GPUs and without numba. Also measured (one core,
nano layer, batch 8, T 512): a chunked backward with every matmul on torch's bmm (MKL, 60-130
GFLOP/s here) and the rest in sliced numba passes took 36.9 ms against this backward's 34.4 ms;
its non-matmul passes (decay masks, layouts, the pass back over chunks) are memory-bound.

Work item: one (batch row, head); the inner loop runs over the N states (vectorised), the loop
above it over the P channels, the outer loop over time. Memory: forward saves the state
entering every ``_CHUNK``-step chunk, (B, H, T / chunk, P, N); the backward pass recomputes one
chunk's states from its checkpoint into a per-item buffer ((chunk + 1) x P x N, 520 KiB at
P 32, N 64 in float32: L2) and runs the adjoint recurrence backwards over it. B and C are
shared by the heads of a group: their gradients are written per head and summed in torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._numba import NUMBA, kernel, parallel_for, warm_up_once

__all__ = ["ssd_fused", "ssd_fused_packed", "warm_up"]

_CHUNK = 64  # time steps between state checkpoints

if NUMBA:
    from ._numba import vexp

    @kernel
    def _ssd_fwd(lo, hi, x, dt, A, Bm, Cm, Dv, h0, has_h0, K, y, last, ckpt):
        """x (b, T, H, P), dt (b, T, H), A, Dv (H,), Bm, Cm (b, T, G, N), h0 (b, H, P, N)
        -> y (b, T, H, P), last (b, H, P, N), ckpt (b, H, T / K, P, N)."""
        T, H, P = x.shape[1], x.shape[2], x.shape[3]
        G, N = Bm.shape[2], Bm.shape[3]
        r = H // G
        S = np.zeros((P, N), dtype=x.dtype)
        bv = np.zeros(N, dtype=x.dtype)
        cv = np.zeros(N, dtype=x.dtype)
        zero = np.zeros(1, dtype=x.dtype)[0]  # typed: a float literal would make sums float64
        for item in range(lo, hi):
            b, h = item // H, item % H
            g = h // r
            for p in range(P):
                for n in range(N):
                    S[p, n] = h0[b, h, p, n] if has_h0 else 0.0
            Ah, Dh = A[h], Dv[h]
            for t in range(T):
                if t % K == 0:
                    c = t // K
                    for p in range(P):
                        for n in range(N):
                            ckpt[b, h, c, p, n] = S[p, n]
                d = dt[b, t, h]
                a = vexp(d * Ah)
                for n in range(N):
                    bv[n] = Bm[b, t, g, n]
                    cv[n] = Cm[b, t, g, n]
                for p in range(P):
                    xp = x[b, t, h, p]
                    u = xp * d
                    acc = zero
                    Sp = S[p]  # row views: LLVM vectorises these loops better than 2-D indexing
                    for n in range(N):  # hot loop
                        s = a * Sp[n] + u * bv[n]
                        Sp[n] = s
                        acc += s * cv[n]
                    y[b, t, h, p] = acc + Dh * xp
            for p in range(P):
                for n in range(N):
                    last[b, h, p, n] = S[p, n]

    @kernel
    def _ssd_bwd(
        lo, hi, x, dt, A, Bm, Cm, Dv, K, ckpt, gy, glast, has_glast,
        dx, ddt, dA_b, dD_b, dB_h, dC_h, dh0,
    ):  # fmt: skip
        """Gradients of :func:`_ssd_fwd`: dx (b, T, H, P), ddt (b, T, H), dA_b, dD_b (b, H)
        per batch row, dB_h, dC_h (b, T, G, N), dh0 (b, H, P, N). A work item is one
        (batch row, group): its heads run one after the other and add into the group's dB, dC
        (no per-head copies to sum)."""
        T, H, P = x.shape[1], x.shape[2], x.shape[3]
        G, N = Bm.shape[2], Bm.shape[3]
        r = H // G
        nck = (T + K - 1) // K
        dS = np.zeros((P, N), dtype=x.dtype)
        hs = np.zeros((K + 1, P, N), dtype=x.dtype)  # S_{t0 - 1} .. S_{t1 - 1} of a chunk
        bv = np.zeros(N, dtype=x.dtype)
        cv = np.zeros(N, dtype=x.dtype)
        dBv = np.zeros(N, dtype=x.dtype)
        dCv = np.zeros(N, dtype=x.dtype)
        zero = np.zeros(1, dtype=x.dtype)[0]
        for item in range(lo * r, hi * r):
            b, h = item // H, item % H
            g = h // r
            if h % r == 0:
                for t in range(T):
                    for n in range(N):
                        dB_h[b, t, g, n] = 0.0
                        dC_h[b, t, g, n] = 0.0
            Ah, Dh = A[h], Dv[h]
            for p in range(P):
                for n in range(N):
                    dS[p, n] = glast[b, h, p, n] if has_glast else 0.0
            dA = zero
            dD = zero
            for c in range(nck - 1, -1, -1):
                t0 = c * K
                L = min(T, t0 + K) - t0
                for p in range(P):
                    for n in range(N):
                        hs[0, p, n] = ckpt[b, h, c, p, n]
                for i in range(L):  # recompute the chunk's states
                    t = t0 + i
                    d = dt[b, t, h]
                    a = vexp(d * Ah)
                    for n in range(N):
                        bv[n] = Bm[b, t, g, n]
                    for p in range(P):
                        u = x[b, t, h, p] * d
                        h0p, h1p = hs[i, p], hs[i + 1, p]
                        for n in range(N):
                            h1p[n] = a * h0p[n] + u * bv[n]
                for i in range(L - 1, -1, -1):
                    t = t0 + i
                    d = dt[b, t, h]
                    a = vexp(d * Ah)
                    for n in range(N):
                        bv[n] = Bm[b, t, g, n]
                        cv[n] = Cm[b, t, g, n]
                        dBv[n] = 0.0
                        dCv[n] = 0.0
                    da = zero
                    dd = zero
                    for p in range(P):
                        xp = x[b, t, h, p]
                        gp = gy[b, t, h, p]
                        u = xp * d
                        dup = zero
                        h0p, h1p, dSp = hs[i, p], hs[i + 1, p], dS[p]  # row views (speed)
                        for n in range(N):  # hot loop: dS is dL/dS_t, then dL/dS_{t-1}
                            ds = dSp[n] + gp * cv[n]
                            dCv[n] += h1p[n] * gp
                            dup += ds * bv[n]
                            dBv[n] += ds * u
                            da += ds * h0p[n]
                            dSp[n] = a * ds
                        dx[b, t, h, p] = dup * d + gp * Dh
                        dd += dup * xp
                        dD += gp * xp
                    ea = da * a  # d a / d (dt A) = a
                    ddt[b, t, h] = dd + ea * Ah
                    dA += ea * d
                    dBt, dCt = dB_h[b, t, g], dC_h[b, t, g]
                    for n in range(N):
                        dBt[n] += dBv[n]
                        dCt[n] += dCv[n]
            dA_b[b, h] = dA
            dD_b[b, h] = dD
            for p in range(P):
                for n in range(N):
                    dh0[b, h, p, n] = dS[p, n]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _views(xbc: np.ndarray, H: int, P: int, G: int, N: int) -> tuple[np.ndarray, ...]:
    """x (b, T, H, P), B, C (b, T, G, N) as strided views of the packed (b, T, H P + 2 G N)."""
    b, T, _ = xbc.shape
    di = H * P
    x = xbc[:, :, :di].reshape(b, T, H, P)
    B = xbc[:, :, di : di + G * N].reshape(b, T, G, N)
    C = xbc[:, :, di + G * N :].reshape(b, T, G, N)
    assert all(np.may_share_memory(v, xbc) for v in (x, B, C))  # views, never copies
    return x, B, C


class _FusedSSD(torch.autograd.Function):
    """(xbc = [x, B, C] packed (b, T, H P + 2 G N), as the conv hands them over, dt, A, D, h0
    or None, (H, P, G, N)) -> (y with the D skip, final state); one dtype, contiguous inputs.
    The kernels read and write strided views: no copies forward, no concatenation back."""

    @staticmethod
    def forward(ctx, xbc, dt, A, D, h0, dims):  # type: ignore[override]
        H, P, G, N = dims
        b, T, _ = xbc.shape
        y = xbc.new_empty(b, T, H, P)
        last = xbc.new_empty(b, H, P, N)
        ckpt = xbc.new_empty(b, H, -(-T // _CHUNK), P, N)
        has_h0 = h0 is not None
        h0_ = h0 if has_h0 else xbc.new_zeros(1, 1, 1, 1)
        parallel_for(
            _ssd_fwd, b * H, b * T * H * P * N,
            *_views(_np(xbc), H, P, G, N)[:1], _np(dt), _np(A),
            *_views(_np(xbc), H, P, G, N)[1:], _np(D), _np(h0_), has_h0, _CHUNK,
            _np(y), _np(last), _np(ckpt),
        )  # fmt: skip
        ctx.save_for_backward(xbc, dt, A, D, ckpt)
        ctx.has_h0, ctx.dims = has_h0, dims
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):  # type: ignore[override]
        xbc, dt, A, D, ckpt = ctx.saved_tensors
        H, P, G, N = ctx.dims
        b, T, _ = xbc.shape
        gy = gy.contiguous() if gy is not None else xbc.new_zeros(b, T, H, P)
        has_glast = glast is not None
        glast_ = glast.contiguous() if has_glast else xbc.new_zeros(1, 1, 1, 1)
        dxbc, ddt = torch.empty_like(xbc), torch.empty_like(dt)
        dA_b, dD_b = xbc.new_empty(b, H), xbc.new_empty(b, H)
        dh0 = xbc.new_empty(b, H, P, N)
        x, B, C = _views(_np(xbc), H, P, G, N)
        dx, dB, dC = _views(_np(dxbc), H, P, G, N)
        parallel_for(
            _ssd_bwd, b * G, 3 * b * T * H * P * N,
            x, _np(dt), _np(A), B, C, _np(D), _CHUNK, _np(ckpt), _np(gy), _np(glast_), has_glast,
            dx, _np(ddt), _np(dA_b), _np(dD_b), dB, dC, _np(dh0),
        )  # fmt: skip
        dh0_ = dh0 if ctx.has_h0 else None
        return dxbc, ddt, dA_b.sum(0), dD_b.sum(0), dh0_, None


def ssd_fused_packed(
    xbc: Tensor,
    dt: Tensor,
    A: Tensor,
    D: Tensor,
    dims: tuple[int, int, int, int],
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The SSD from the conv's packed output xbc (b, T, H P + 2 G N) = [x, B, C], dims
    (H, P, G, N); otherwise as :func:`ssd_fused`."""
    dtype = xbc.dtype

    def prep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    with torch.autocast("cpu", enabled=False):
        xbc_, dt_, A_, D_, s0 = (prep(t) for t in (xbc, dt, A, D, initial_state))
        return _FusedSSD.apply(xbc_, dt_, A_, D_, s0, dims)


def ssd_fused(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """x (b, T, H, P), dt (b, T, H) (after softplus), A, D (H,), B, C (b, T, G, N),
    initial_state (b, H, P, N) or None -> y (b, T, H, P) *with* the D skip, final state.
    CPU, float32 or float64 (everything is cast to x's dtype)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    xbc = torch.cat([x.reshape(b, T, H * P), B.reshape(b, T, G * N), C.reshape(b, T, G * N)], -1)
    return ssd_fused_packed(xbc, dt, A, D, (H, P, G, N), initial_state)


_warm: set[torch.dtype] = set()


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load) both kernels for ``dtype`` by one tiny forward and backward; raises
    on failure (the caller then runs the chunked torch form)."""

    def tiny_step() -> None:
        g = torch.Generator().manual_seed(0)
        shapes = [(1, 2, 2, 3), (1, 2, 2), (2,), (1, 2, 1, 2), (1, 2, 1, 2), (2,), (1, 2, 3, 2)]
        args = [torch.rand(*s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]
        y, last = ssd_fused(*args)
        (y.sum() + last.sum()).backward()

    warm_up_once(_warm, dtype, tiny_step)

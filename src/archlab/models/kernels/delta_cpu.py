"""Fused CPU gated delta rule (numba): the recurrence in one pass over time, forward and back.

Same math as :func:`archlab.models.delta_rule.recurrent_gated_delta_rule`, per (batch row,
head) with the state S (dk x dv):

    S~ = exp(g_t) S_{t-1};  r_t = v_t - S~^T k_t;  S_t = S~ + beta_t k_t r_t^T;  o_t = S_t^T q_t

Why the recurrence and not the chunked (WY) form on a CPU: the state is small (dk x dv =
24 x 48 per head at nano), so the recurrence costs ~7 dk dv multiply-adds per head and token
forward, while the chunked form spends ~2 C (dk + dv) + 6 dk dv plus the blocked inverse and
~60 torch ops over (B H, chunks, C, C) tensors. The chunked form stays the path on GPUs and
without numba.

Layout: the model's own (B, T, H, .) for q, k, v, o and (B, T, H) for g, beta, so no
transposes. Work item: one (batch row, head); the inner loops run over dv (vectorised), the
loop above over dk, the outer loop over time. Memory: forward saves the state entering every
``_CHUNK``-step chunk; the backward pass recomputes one chunk's states and residuals r from
its checkpoint into a per-item buffer and runs the adjoint recurrence backwards over it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._numba import NUMBA, kernel, parallel_for, warm_up_once

__all__ = ["delta_rule_fused", "warm_up"]

_CHUNK = 64  # time steps between state checkpoints

if NUMBA:
    from ._numba import vexp

    @kernel
    def _delta_fwd(lo, hi, q, k, v, g, beta, S0, has_s0, K, o, last, ckpt):
        """q, k (B, T, H, dk), v (B, T, H, dv), g, beta (B, T, H), S0 (B, H, dk, dv)
        -> o (B, T, H, dv), last (B, H, dk, dv), ckpt (B, H, T / K, dk, dv)."""
        T, H, dk = k.shape[1], k.shape[2], k.shape[3]
        dv = v.shape[3]
        S = np.zeros((dk, dv), dtype=v.dtype)
        kv = np.zeros(dv, dtype=v.dtype)
        ov = np.zeros(dv, dtype=v.dtype)
        for item in range(lo, hi):
            b, h = item // H, item % H
            for i in range(dk):
                for j in range(dv):
                    S[i, j] = S0[b, h, i, j] if has_s0 else 0.0
            for t in range(T):
                if t % K == 0:
                    c = t // K
                    for i in range(dk):
                        for j in range(dv):
                            ckpt[b, h, c, i, j] = S[i, j]
                a = vexp(g[b, t, h])
                bt = beta[b, t, h]
                for j in range(dv):
                    kv[j] = 0.0
                    ov[j] = 0.0
                for i in range(dk):  # decay, and what S recalls for k
                    ki = k[b, t, h, i]
                    Si = S[i]
                    for j in range(dv):
                        s = a * Si[j]
                        Si[j] = s
                        kv[j] += ki * s
                for j in range(dv):  # the write: beta (v - kv)
                    kv[j] = bt * (v[b, t, h, j] - kv[j])
                for i in range(dk):
                    ki = k[b, t, h, i]
                    qi = q[b, t, h, i]
                    Si = S[i]
                    for j in range(dv):
                        s = Si[j] + ki * kv[j]
                        Si[j] = s
                        ov[j] += qi * s
                for j in range(dv):
                    o[b, t, h, j] = ov[j]
            for i in range(dk):
                for j in range(dv):
                    last[b, h, i, j] = S[i, j]

    @kernel
    def _delta_bwd(
        lo, hi, q, k, v, g, beta, K, ckpt, do, glast, has_glast,
        dq, dk_, dv_, dg, dbeta, dS0,
    ):  # fmt: skip
        """Gradients of :func:`_delta_fwd` for every input and the initial state."""
        T, H, dk = k.shape[1], k.shape[2], k.shape[3]
        dv = v.shape[3]
        nck = (T + K - 1) // K
        zero = np.zeros(1, dtype=v.dtype)[0]  # typed: a float literal would make sums float64
        dS = np.zeros((dk, dv), dtype=v.dtype)
        hs = np.zeros((K + 1, dk, dv), dtype=v.dtype)  # S_{t0 - 1} .. S_{t1 - 1} of a chunk
        rs = np.zeros((K, dv), dtype=v.dtype)  # r_t = v_t - S~^T k_t of the chunk
        dl = np.zeros(dv, dtype=v.dtype)
        gov = np.zeros(dv, dtype=v.dtype)
        for item in range(lo, hi):
            b, h = item // H, item % H
            for i in range(dk):
                for j in range(dv):
                    dS[i, j] = glast[b, h, i, j] if has_glast else 0.0
            for c in range(nck - 1, -1, -1):
                t0 = c * K
                L = min(T, t0 + K) - t0
                for i in range(dk):
                    for j in range(dv):
                        hs[0, i, j] = ckpt[b, h, c, i, j]
                for n in range(L):  # recompute the chunk's states and residuals
                    t = t0 + n
                    a = vexp(g[b, t, h])
                    bt = beta[b, t, h]
                    r = rs[n]
                    for j in range(dv):
                        r[j] = 0.0
                    for i in range(dk):
                        ki = k[b, t, h, i]
                        Si, Sn = hs[n, i], hs[n + 1, i]
                        for j in range(dv):
                            s = a * Si[j]
                            Sn[j] = s
                            r[j] += ki * s
                    for j in range(dv):
                        r[j] = v[b, t, h, j] - r[j]
                    for i in range(dk):
                        ki = bt * k[b, t, h, i]
                        Sn = hs[n + 1, i]
                        for j in range(dv):
                            Sn[j] += ki * r[j]
                for n in range(L - 1, -1, -1):
                    t = t0 + n
                    a = vexp(g[b, t, h])
                    bt = beta[b, t, h]
                    r = rs[n]
                    for j in range(dv):
                        gov[j] = do[b, t, h, j]
                        dl[j] = 0.0
                    # dS += q do^T; dq = S_t do; d delta = dS^T k; dk = dS delta
                    for i in range(dk):
                        qi = q[b, t, h, i]
                        ki = k[b, t, h, i]
                        dSi, Si = dS[i], hs[n + 1, i]
                        acc_q = zero
                        acc_k = zero
                        for j in range(dv):
                            ds = dSi[j] + qi * gov[j]
                            dSi[j] = ds
                            acc_q += Si[j] * gov[j]
                            dl[j] += ds * ki
                            acc_k += ds * r[j]
                        dq[b, t, h, i] = acc_q
                        dk_[b, t, h, i] = bt * acc_k
                    acc_b = zero
                    for j in range(dv):
                        dv_[b, t, h, j] = bt * dl[j]
                        acc_b += dl[j] * r[j]
                        dl[j] = bt * dl[j]  # now d r
                    dbeta[b, t, h] = acc_b
                    # r = v - S~^T k: dS~ = dS - k dr^T, dk -= S~ dr; S~ = a S_{t-1}
                    da = zero
                    for i in range(dk):
                        ki = k[b, t, h, i]
                        dSi, Pi = dS[i], hs[n, i]
                        acc_k = zero
                        for j in range(dv):
                            dst = dSi[j] - ki * dl[j]
                            sp = Pi[j]
                            acc_k += sp * dl[j]
                            da += dst * sp
                            dSi[j] = a * dst
                        dk_[b, t, h, i] -= a * acc_k
                    dg[b, t, h] = da * a
            for i in range(dk):
                for j in range(dv):
                    dS0[b, h, i, j] = dS[i, j]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


class _FusedDeltaRule(torch.autograd.Function):
    """(q, k, v, g, beta, S0 or None) -> (o, final state); one dtype, contiguous inputs."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, S0):  # type: ignore[override]
        B, T, H, dk = k.shape
        dv = v.shape[3]
        o = v.new_empty(B, T, H, dv)
        last = v.new_empty(B, H, dk, dv)
        ckpt = v.new_empty(B, H, -(-T // _CHUNK), dk, dv)
        has_s0 = S0 is not None
        s0 = S0 if has_s0 else v.new_zeros(1, 1, 1, 1)
        parallel_for(
            _delta_fwd, B * H, B * T * H * dk * dv * 2,
            _np(q), _np(k), _np(v), _np(g), _np(beta), _np(s0), has_s0, _CHUNK,
            _np(o), _np(last), _np(ckpt),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, g, beta, ckpt)
        ctx.has_s0 = has_s0
        return o, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, glast):  # type: ignore[override]
        q, k, v, g, beta, ckpt = ctx.saved_tensors
        B, T, H, dk = k.shape
        dv = v.shape[3]
        do = do.contiguous() if do is not None else torch.zeros_like(v)
        has_glast = glast is not None
        gl = glast.contiguous() if has_glast else v.new_zeros(1, 1, 1, 1)
        dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg, dbeta = torch.empty_like(g), torch.empty_like(beta)
        dS0 = v.new_empty(B, H, dk, dv)
        parallel_for(
            _delta_bwd, B * H, B * T * H * dk * dv * 6,
            _np(q), _np(k), _np(v), _np(g), _np(beta), _CHUNK, _np(ckpt), _np(do), _np(gl),
            has_glast, _np(dq), _np(dk_), _np(dv_), _np(dg), _np(dbeta), _np(dS0),
        )  # fmt: skip
        return dq, dk_, dv_, dg, dbeta, dS0 if ctx.has_s0 else None


def delta_rule_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q, k (B, T, H, dk), v (B, T, H, dv), g, beta (B, T, H), initial_state (B, H, dk, dv)
    or None -> o (B, T, H, dv), final state. CPU, float32 or float64 (cast to v's dtype)."""
    dtype = v.dtype

    def prep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    with torch.autocast("cpu", enabled=False):
        return _FusedDeltaRule.apply(*(prep(t) for t in (q, k, v, g, beta, initial_state)))


_warm: set[torch.dtype] = set()


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load) both kernels for ``dtype`` by one tiny forward and backward; raises
    on failure (the caller then runs the chunked torch form)."""

    def tiny_step() -> None:
        gen = torch.Generator().manual_seed(0)
        shapes = [(1, 2, 2, 3), (1, 2, 2, 3), (1, 2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 3, 2)]
        args = [torch.rand(*s, generator=gen, dtype=dtype).requires_grad_(True) for s in shapes]
        o, last = delta_rule_fused(*args)
        (o.sum() + last.sum()).backward()

    warm_up_once(_warm, dtype, tiny_step)

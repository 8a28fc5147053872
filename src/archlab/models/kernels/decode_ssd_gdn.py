"""Fused single-token decode steps on CPU (numba) for Mamba-2 and Gated DeltaNet blocks.

As ``decode_cpu.py`` does for Mamba-1 (see its docstring for why: a nano token is a few
microseconds of arithmetic and every torch op costs 2-10 microseconds of dispatch; op by op a
Mamba-2 block took ~40 ops per token), one kernel call runs a whole block:

    Mamba-2          x + out_proj(GatedRMSNorm(SSD step(conv step(in_proj(RMSNorm(x))))))
    Gated DeltaNet   x + GatedDeltaNet step(RMSNorm(x));  x + MLP(RMSNorm(x))

with the layer's decode state (conv window and recurrent state) updated in place. The steps
use the shared pieces of ``_decode.py`` (linear, norm, MLP kernels; the per-module plans).
float32 uses the vectorised exp of ``_numba``; float64 the exact functions, so the tests hold
it to the torch path at 1e-10.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._decode import (
    _arr,
    _mlp_arrays,
    _mlp_kind,
    _mlp_params,
    _norm_arrays,
    _norm_params,
    _Plan,
    _plan,
    _run,
    _tokens,
)
from ._numba import NUMBA, kernel

__all__ = ["gdn_block_step", "mamba2_block_step"]

if NUMBA:
    from ._decode import _linear, _mlp_residual, _norm
    from ._numba import vexp, vsoftplus

    @kernel
    def _conv_step(v, cwT, cb, conv, time_major, out):
        """out = SiLU(cb + sum_k cwT[k] window_k) over the window of the K - 1 kept inputs and
        v; the window shifts in place. conv (C, K - 1), or (K - 1, C) when ``time_major``."""
        K, C = cwT.shape
        one = np.ones(1, dtype=v.dtype)[0]
        for c in range(C):
            acc = cb[c] + cwT[K - 1, c] * v[c]
            for k in range(K - 1):
                acc += cwT[k, c] * (conv[k, c] if time_major else conv[c, k])
            out[c] = acc / (one + vexp(-acc))
        for k in range(K - 2):
            for c in range(C):
                if time_major:
                    conv[k, c] = conv[k + 1, c]
                else:
                    conv[c, k] = conv[c, k + 1]
        if K > 1:
            for c in range(C):
                if time_major:
                    conv[K - 2, c] = v[c]
                else:
                    conv[c, K - 2] = v[c]

    @kernel
    def _mamba2_rows(
        lo, hi, x, n1w, n1b, n1e, inw, zb, cwT, cb, dtb, A, Dv, nw, ne, G, outw, conv, S, out
    ):
        """out[b] = x[b] + Mamba2(RMSNorm(x[b])) for batch rows [lo, hi); S (B, H, P, N)."""
        Dm = x.shape[1]
        H, P, N = S.shape[1], S.shape[2], S.shape[3]
        di = H * P
        Cd = cwT.shape[1]
        one = np.ones(1, dtype=x.dtype)[0]
        zero = np.zeros(1, dtype=x.dtype)[0]
        typed = np.empty(1, dtype=x.dtype)  # float64 -> x's dtype (a float64 would promote)
        xn = np.empty(Dm, dtype=x.dtype)
        proj = np.empty(inw.shape[0], dtype=x.dtype)  # z (di), xBC (Cd), dt (H)
        xbc = np.empty(Cd, dtype=x.dtype)
        y = np.empty(di, dtype=x.dtype)
        mo = np.empty(Dm, dtype=x.dtype)
        for b in range(lo, hi):
            _norm(x[b], n1w, n1b, n1e, True, xn)
            _linear(inw, zb, xn, proj)
            _conv_step(proj[di : di + Cd], cwT, cb, conv[b], False, xbc)
            for h in range(H):
                g = h // (H // G)
                dt = vsoftplus(proj[di + Cd + h] + dtb[h])
                a = vexp(dt * A[h])
                Bg = xbc[di + g * N : di + (g + 1) * N]
                Cg = xbc[di + G * N + g * N : di + G * N + (g + 1) * N]
                for p in range(P):
                    xp = xbc[h * P + p]
                    u = xp * dt
                    Sp = S[b, h, p]
                    acc = Dv[h] * xp
                    for n in range(N):
                        s = a * Sp[n] + u * Bg[n]
                        Sp[n] = s
                        acc += s * Cg[n]
                    y[h * P + p] = acc
            size = di // G  # gated RMSNorm per group: norm(y * SiLU(z)) * w
            for c in range(di):
                zc = proj[c]
                y[c] = y[c] * zc / (one + vexp(-zc))
            for g0 in range(0, di, size):
                ss = zero
                for c in range(g0, g0 + size):
                    ss += y[c] * y[c]
                typed[0] = 1.0 / np.sqrt(ss / size + ne[0])
                r = typed[0]
                for c in range(g0, g0 + size):
                    y[c] = y[c] * r * nw[c]
            _linear(outw, zb, y, mo)
            for d in range(Dm):
                out[b, d] = x[b, d] + mo[d]

    @kernel
    def _gdn_rows(
        lo, hi, x, n1w, n1b, n1e, inw, zb, cwT, cb, A, dtb, l2e, onw, one_, outw, conv, S,
        kind, n2w, n2b, n2e, rms2, fcw, fcb, pw, pb, out,
    ):  # fmt: skip
        """out[b] = x[b] + GDN(RMSNorm(x[b])), then out[b] += MLP(N2(out[b])); S (B, H, dk, dv);
        the conv window (B, K - 1, 2 H dk + H dv) is time-major."""
        Dm = x.shape[1]
        H, dk, dv = S.shape[1], S.shape[2], S.shape[3]
        Cd = cwT.shape[1]
        kd, vd = H * dk, H * dv
        one = np.ones(1, dtype=x.dtype)[0]
        zero = np.zeros(1, dtype=x.dtype)[0]
        typed = np.empty(1, dtype=x.dtype)  # float64 -> x's dtype (a float64 would promote)
        xn = np.empty(Dm, dtype=x.dtype)
        proj = np.empty(inw.shape[0], dtype=x.dtype)  # qkv (Cd), gate (vd), a (H), b (H)
        qkv = np.empty(Cd, dtype=x.dtype)
        kv = np.empty(dv, dtype=x.dtype)
        o = np.empty(vd, dtype=x.dtype)
        mo = np.empty(Dm, dtype=x.dtype)
        hid = np.empty(fcw.shape[0], dtype=x.dtype)
        for b in range(lo, hi):
            _norm(x[b], n1w, n1b, n1e, True, xn)
            _linear(inw, zb, xn, proj)
            _conv_step(proj[:Cd], cwT, cb, conv[b], True, qkv)
            for h in range(H):
                q = qkv[h * dk : (h + 1) * dk]
                k = qkv[kd + h * dk : kd + (h + 1) * dk]
                v = qkv[2 * kd + h * dv : 2 * kd + (h + 1) * dv]
                sq = zero
                sk = zero
                for i in range(dk):
                    sq += q[i] * q[i]
                    sk += k[i] * k[i]
                typed[0] = 1.0 / np.sqrt((sq + l2e[0]) * dk)  # l2norm, then 1 / sqrt(dk)
                rq = typed[0]
                rk = one / np.sqrt(sk + l2e[0])
                beta = one / (one + vexp(-proj[Cd + vd + H + h]))
                decay = vexp(A[h] * vsoftplus(proj[Cd + vd + h] + dtb[h]))  # A = -exp(A_log)
                Sh = S[b, h]
                for j in range(dv):
                    kv[j] = 0.0
                for i in range(dk):
                    ki = k[i] * rk
                    Si = Sh[i]
                    for j in range(dv):
                        s = decay * Si[j]
                        Si[j] = s
                        kv[j] += ki * s
                for j in range(dv):
                    kv[j] = beta * (v[j] - kv[j])
                oh = o[h * dv : (h + 1) * dv]
                for j in range(dv):
                    oh[j] = 0.0
                for i in range(dk):
                    ki = k[i] * rk
                    qi = q[i] * rq
                    Si = Sh[i]
                    for j in range(dv):
                        s = Si[j] + ki * kv[j]
                        Si[j] = s
                        oh[j] += qi * s
                ss = zero  # RMSNorm over dv, times SiLU(gate)
                for j in range(dv):
                    ss += oh[j] * oh[j]
                typed[0] = 1.0 / np.sqrt(ss / dv + one_[0])
                r = typed[0]
                for j in range(dv):
                    gt = proj[Cd + h * dv + j]
                    oh[j] = oh[j] * r * onw[j] * gt / (one + vexp(-gt))
            _linear(outw, zb, o, mo)
            rr = out[b]
            for d in range(Dm):
                rr[d] = x[b, d] + mo[d]
            _mlp_residual(rr, n2w, n2b, n2e, rms2, kind, fcw, fcb, pw, pb, xn, hid, mo)


def _state(x: Tensor, state: dict, conv_shape: tuple, ssm_shape: tuple) -> tuple[Tensor, Tensor]:
    """The layer's conv window and recurrent state, contiguous in x's dtype (zeros on the first
    token); the kernels update them in place."""
    conv, S = state.get("conv"), state.get("ssm")
    if conv is None:
        conv = x.new_zeros(x.shape[0], *conv_shape)
    if S is None:
        S = x.new_zeros(x.shape[0], *ssm_shape)
    if conv.dtype != x.dtype or not conv.is_contiguous():
        conv = conv.to(x.dtype).contiguous()
    if S.dtype != x.dtype or not S.is_contiguous():
        S = S.to(x.dtype).contiguous()
    state["conv"], state["ssm"] = conv, S
    return conv, S


# -- Mamba-2 --------------------------------------------------------------------------------
def _mamba2_plan(block) -> _Plan:
    m = block.mixer
    n1 = _norm_params(block.norm1)
    if n1 is None or type(block.norm1).__name__ != "RMSNorm":
        return _Plan(None)
    c = m.conv1d
    params = (*n1, m.in_proj.weight, c.weight, c.bias, m.dt_bias, m.A_log, m.D,
              m.norm.weight, m.out_proj.weight)  # fmt: skip

    def build() -> tuple:
        w = m.in_proj.weight
        with torch.no_grad():
            A = -torch.exp(m.A_log)
            cwT = c.weight.reshape(c.weight.shape[0], -1).t()
        ne = np.full(1, m.norm.eps, dtype=_arr(w, w, 0).dtype)
        n1w, n1b, n1e, _ = _norm_arrays(block.norm1)
        zb = np.zeros(max(w.shape[0], m.out_proj.weight.shape[0]), dtype=ne.dtype)
        return (n1w, n1b, n1e, _arr(w, w, 0), zb, *(_arr(t, w, 0) for t in (cwT, c.bias)),
                *(_arr(t, w, 0) for t in (m.dt_bias, A, m.D, m.norm.weight)), ne, m.ngroups,
                _arr(m.out_proj.weight, w, 0))  # fmt: skip

    return _Plan(params, (block.drop,), build)


def mamba2_block_step(block, x: Tensor, state: dict) -> Tensor | None:
    """A Mamba-2 block on one token: x (B, 1, d_model) -> (B, 1, d_model); None when the
    kernel does not apply (the torch path then runs)."""
    plan = _plan(block, _mamba2_plan)
    w = plan.arrays(block, x)
    if w is None:
        return None
    m = block.mixer
    conv, S = plan.state_views(
        _state(x, state, (m.conv_dim, m.conv_size - 1), (m.nheads, m.headdim, m.state_size))
    )
    xn, out, out2 = _tokens(x)
    rows = xn.shape[0]
    work = rows * (w[3].size + w[-1].size + 3 * m.d_inner * m.state_size)
    if not _run(_mamba2_rows, rows, work, xn, *w, conv, S, out2):
        return None
    return torch.from_numpy(out)


# -- Gated DeltaNet ---------------------------------------------------------------------------
def _gdn_plan(block) -> _Plan:
    from ..delta_rule import L2_EPS

    m = block.mixer
    kind = _mlp_kind(block.ffn)
    n1, n2 = _norm_params(block.norm1), _norm_params(block.norm2)
    if kind is None or n1 is None or n2 is None or type(block.norm1).__name__ != "RMSNorm":
        return _Plan(None)
    c = m.conv1d
    params = (*n1, m.in_proj.weight, c.weight, m.A_log, m.dt_bias, m.o_norm.weight,
              m.out_proj.weight, *n2, *_mlp_params(block.ffn))  # fmt: skip

    def build() -> tuple:
        w = m.in_proj.weight
        dt = _arr(w, w, 0).dtype
        with torch.no_grad():
            A = -torch.exp(m.A_log)
            cwT = c.weight.reshape(c.weight.shape[0], -1).t()
        zb = np.zeros(max(w.shape[0], m.out_proj.weight.shape[0]), dtype=dt)
        n1w, n1b, n1e, _ = _norm_arrays(block.norm1)
        return (n1w, n1b, n1e, _arr(w, w, 0), zb, _arr(cwT, w, 0), np.zeros(cwT.shape[1], dt),
                _arr(A, w, 0), _arr(m.dt_bias, w, 0), np.full(1, L2_EPS, dt),
                _arr(m.o_norm.weight, w, 0), np.full(1, m.o_norm.eps, dt),
                _arr(m.out_proj.weight, w, 0))  # fmt: skip

    def build_all() -> tuple:
        return (*build(), kind, *_norm_arrays(block.norm2), *_mlp_arrays(block.ffn, m.A_log))

    return _Plan(params, (block.drop, block.ffn.drop), build_all)


def gdn_block_step(block, x: Tensor, state: dict) -> Tensor | None:
    """A Gated DeltaNet block (mixer and MLP) on one token: x (B, 1, d_model) ->
    (B, 1, d_model); None when the kernel does not apply."""
    plan = _plan(block, _gdn_plan)
    w = plan.arrays(block, x)
    if w is None:
        return None
    m = block.mixer
    conv, S = plan.state_views(
        _state(x, state, (m.conv_size - 1, m.conv_dim), (m.n_heads, m.head_k_dim, m.head_v_dim))
    )
    xn, out, out2 = _tokens(x)
    rows = xn.shape[0]
    work = rows * (w[3].size + w[12].size + 2 * w[18].size)
    if not _run(_gdn_rows, rows, work, xn, *w[:13], conv, S, *w[13:], out2):
        return None
    return torch.from_numpy(out)

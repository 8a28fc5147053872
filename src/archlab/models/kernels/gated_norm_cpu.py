"""Fused CPU gated RMSNorm (numba), forward and backward, for Mamba-2 and Gated DeltaNet.

Over each of the groups of ``size`` channels of a (rows, C) input, with s = SiLU(gate):

    gate first (Mamba-2's RMSNormGated):   out = w * RMSNorm(x * s)
    gate after (Gated DeltaNet's o_norm):  out = w * RMSNorm(x) * s

In torch each form is ~6 elementwise ops forward and ~10 backward over (B, T, C) tensors;
here one pass each way, saving only the inputs. Work item: one batch row (its T rows of
channels), which also owns its partial sum of the weight's gradient.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._numba import NUMBA, kernel, parallel_for, warm_up_once

__all__ = ["gated_rms_norm", "warm_up"]

if NUMBA:
    from ._numba import helper, vsigmoid

    # the sigmoid is vsigmoid (float32 through a float64 exp: within 1 ulp, torch's within 2),
    # not one over exp32 (2 ulp in the exp): that error, times the gate's gradient summed into
    # in_proj's, came to 1e-5 against transformers' Mamba-2

    @helper
    def _normed_input(xr, s, gate_first, u):
        """u = x * SiLU(gate) (gate first) or x (gate after): what the RMSNorm normalises."""
        if gate_first:
            for c in range(u.shape[0]):
                u[c] = xr[c] * s[c]
        else:
            for c in range(u.shape[0]):
                u[c] = xr[c]

    @kernel
    def _norm_fwd(lo, hi, x, gate, w, size, eps, gate_first, out):
        """x, gate, out (B, T, C); w (C,)."""
        T, C = x.shape[1], x.shape[2]
        typed = np.zeros(1, dtype=x.dtype)  # float64 -> the dtype (a float64 would promote)
        u = np.zeros(C, dtype=x.dtype)
        s = np.zeros(C, dtype=x.dtype)
        for b in range(lo, hi):
            for t in range(T):
                xr, gr, orow = x[b, t], gate[b, t], out[b, t]
                for c in range(C):
                    s[c] = gr[c] * vsigmoid(gr[c])
                _normed_input(xr, s, gate_first, u)
                for g0 in range(0, C, size):
                    ss = 0.0  # the sums in float64: float32 rounding here showed in gradients
                    for c in range(g0, g0 + size):
                        ss += np.float64(u[c]) * u[c]
                    typed[0] = 1.0 / np.sqrt(ss / size + eps)
                    r = typed[0]
                    for c in range(g0, g0 + size):
                        v = w[c] * u[c] * r
                        orow[c] = v if gate_first else v * s[c]

    @kernel
    def _norm_bwd(lo, hi, x, gate, w, size, eps, gate_first, gout, dx, dgate, dw_b):
        """Gradients of :func:`_norm_fwd`; dw_b (B, C) per batch row. The gate_first branches
        sit outside the channel loops, so each loop vectorises."""
        T, C = x.shape[1], x.shape[2]
        one = np.ones(1, dtype=x.dtype)[0]
        typed = np.zeros(1, dtype=x.dtype)  # float64 -> the dtype (a float64 would promote)
        u = np.zeros(C, dtype=x.dtype)
        s = np.zeros(C, dtype=x.dtype)
        ds = np.zeros(C, dtype=x.dtype)  # d silu / d gate
        dn = np.zeros(C, dtype=x.dtype)
        for b in range(lo, hi):
            dwr = dw_b[b]
            for c in range(C):
                dwr[c] = 0.0
            for t in range(T):
                xr, gr, go = x[b, t], gate[b, t], gout[b, t]
                dxr, dgr = dx[b, t], dgate[b, t]
                for c in range(C):
                    sg = vsigmoid(gr[c])
                    s[c] = gr[c] * sg
                    ds[c] = sg * (one + gr[c] * (one - sg))
                _normed_input(xr, s, gate_first, u)
                for g0 in range(0, C, size):
                    ss = 0.0
                    for c in range(g0, g0 + size):
                        ss += np.float64(u[c]) * u[c]
                    typed[0] = 1.0 / np.sqrt(ss / size + eps)
                    r = typed[0]
                    m = 0.0
                    if gate_first:
                        for c in range(g0, g0 + size):
                            n = u[c] * r
                            dwr[c] += go[c] * n
                            d = go[c] * w[c]
                            dn[c] = d
                            m += np.float64(d) * n
                    else:
                        for c in range(g0, g0 + size):
                            n = u[c] * r
                            gw = go[c] * w[c]
                            dwr[c] += go[c] * n * s[c]
                            dgr[c] = gw * n * ds[c]
                            d = gw * s[c]
                            dn[c] = d
                            m += np.float64(d) * n
                    typed[0] = m / size
                    mr = typed[0] * r
                    if gate_first:
                        for c in range(g0, g0 + size):
                            du = r * (dn[c] - u[c] * mr)
                            dxr[c] = du * s[c]
                            dgr[c] = du * xr[c] * ds[c]
                    else:
                        for c in range(g0, g0 + size):
                            dxr[c] = r * (dn[c] - u[c] * mr)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, w, size, eps, gate_first):  # type: ignore[override]
        Bsz, T, C = x.shape
        out = torch.empty_like(x)
        args = (_np(x), _np(gate), _np(w), size, eps, gate_first)
        parallel_for(_norm_fwd, Bsz, Bsz * T * C * 4, *args, _np(out))
        ctx.save_for_backward(x, gate, w)
        ctx.opts = (size, eps, gate_first)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # type: ignore[override]
        x, gate, w = ctx.saved_tensors
        Bsz, T, C = x.shape
        dx, dgate, dw_b = torch.empty_like(x), torch.empty_like(gate), x.new_empty(Bsz, C)
        args = (_np(x), _np(gate), _np(w), *ctx.opts, _np(gout.contiguous()))
        parallel_for(_norm_bwd, Bsz, Bsz * T * C * 8, *args, _np(dx), _np(dgate), _np(dw_b))
        return dx, dgate, dw_b.sum(0), None, None, None


def gated_rms_norm(
    x: Tensor, gate: Tensor, weight: Tensor, size: int, eps: float, gate_first: bool
) -> Tensor:
    """x, gate (B, T, C), weight (C,), groups of ``size`` channels -> (B, T, C); see the module
    docstring for the two forms. CPU, one float32/float64 dtype."""
    dtype = x.dtype
    with torch.autocast("cpu", enabled=False):
        return _GatedRMSNorm.apply(
            x.contiguous(), gate.to(dtype).contiguous(), weight.to(dtype), size, eps, gate_first
        )


_warm: set[torch.dtype] = set()


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load) both kernels for ``dtype``; raises on failure."""
    if not NUMBA:
        raise RuntimeError("numba is not available")

    def tiny_step() -> None:
        g = torch.Generator().manual_seed(0)
        x, z = (torch.randn(1, 2, 4, generator=g, dtype=dtype, requires_grad=True) for _ in "xz")
        w = torch.randn(4, generator=g, dtype=dtype, requires_grad=True)
        for first in (True, False):
            gated_rms_norm(x, z, w, 2, 1e-5, first).sum().backward()

    warm_up_once(_warm, dtype, tiny_step)

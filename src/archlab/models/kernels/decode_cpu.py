"""Fused single-token decode steps on CPU (numba): a whole recurrent block in one call.

Why: one decode token through a nano block is 0.1-0.3 M multiply-adds, a few microseconds of
arithmetic, while every torch op costs 2-10 microseconds of dispatch. Op by op, a Mamba block
took 55 us per token, of which its fused mixer kernel was 15: RMSNorm alone took 10, the
residual add and the glue the rest, and Mamba has twice dense's layers. Here a block is one
kernel call with a few microseconds of Python around it:

    Mamba             x + Mixer(RMSNorm(x))
    Hybrid, Mamba     x + Mixer(N1(x));              x + MLP(N2(x))
    HyperMixer        x + OutNorm(HyperMix(N1(x)));  x + MLP(N2(x))

N is LayerNorm or RMSNorm and MLP is GELU (tanh) or SwiGLU, with or without biases: the
block's own modules decide, and the kernel reads their weights. The bare mixers' steps
(:func:`mamba_step`, :func:`hyper_step`: the same math without norms, residuals and MLP) serve
callers of a lone mixer and the blocks that do not qualify (training mode with dropout, say).
The pieces every step shares (linear, norm and MLP kernels, the per-module plans, the call
over batch rows) are in ``_decode.py``.

float32 uses the vectorised exp of ``_numba`` in SiLU, softplus, GELU-tanh (as x sigmoid(2u),
which equals 0.5 x (1 + tanh u)) and erf-GELU; float64 the exact math functions, so the tests
compare it with the torch path to 1e-10. Decode steps run on the calling thread unless the
batch is large (:func:`parallel_for` over batch rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._decode import (
    MLP_NONE,
    _arr,
    _linear_params,
    _mlp_arrays,
    _mlp_kind,
    _mlp_params,
    _norm_arrays,
    _norm_params,
    _np,
    _Plan,
    _plan,
    _run,
    _tokens,
)
from ._numba import NUMBA, kernel

__all__ = [
    "hyper_block_step",
    "hyper_step",
    "mamba_block_step",
    "mamba_step",
]

if NUMBA:
    from ._decode import _linear, _mlp_residual, _norm
    from ._numba import gelu_and_grad, vexp, vsoftplus

    @kernel
    def _mamba_token(xn, inw, zb, cwT, cb, xw, dtwT, dtb, A, Dv, outw, conv, h, out):
        """The Mamba mixer on one normalised token xn (d_model,) -> out (d_model,):
        in_proj, causal depthwise conv + SiLU, x_proj, dt_proj + softplus, the recurrent update
        of h (di, N), the SiLU(z)-gated read-out, out_proj. conv (di, K - 1) holds the last conv
        inputs and shifts in place; A = -exp(A_log) (di, N); zb zeros (2 di,)."""
        di = Dv.shape[0]
        K = cwT.shape[0]
        R = dtwT.shape[0]
        N = A.shape[1]
        one = np.ones(1, dtype=xn.dtype)[0]
        xz = np.empty(2 * di, dtype=xn.dtype)
        xc = np.empty(di, dtype=xn.dtype)
        proj = np.empty(xw.shape[0], dtype=xn.dtype)  # dt (R), B (N), C (N)
        delta = np.empty(di, dtype=xn.dtype)
        dA = np.empty(N, dtype=xn.dtype)
        y = np.empty(di, dtype=xn.dtype)
        _linear(inw, zb, xn, xz)
        for d in range(di):
            acc = cb[d] + cwT[K - 1, d] * xz[d]
            for k in range(K - 1):
                acc += cwT[k, d] * conv[d, k]
            for k in range(K - 2):
                conv[d, k] = conv[d, k + 1]
            if K > 1:
                conv[d, K - 2] = xz[d]
            xc[d] = acc
        for d in range(di):
            a = xc[d]
            xc[d] = a / (one + vexp(-a))
        _linear(xw, zb, xc, proj)
        for d in range(di):
            delta[d] = dtb[d]
        for r in range(R):  # dt_proj as R axpys over the channels (R is small)
            pr = proj[r]
            for d in range(di):
                delta[d] += dtwT[r, d] * pr
        for d in range(di):
            delta[d] = vsoftplus(delta[d])
        for d in range(di):
            dl = delta[d]
            for n in range(N):  # the decays first: a loop of exps alone vectorises
                dA[n] = vexp(A[d, n] * dl)
            du = dl * xc[d]
            acc = Dv[d] * xc[d]
            for n in range(N):
                hn = dA[n] * h[d, n] + du * proj[R + n]
                h[d, n] = hn
                acc += proj[R + N + n] * hn
            zz = xz[di + d]
            y[d] = acc * zz / (one + vexp(-zz))
        _linear(outw, zb, y, out)

    @kernel
    def _mamba_rows(lo, hi, x, inw, zb, cwT, cb, xw, dtwT, dtb, A, Dv, outw, conv, h, out):
        """The bare mixer for batch rows [lo, hi): out[b] = Mixer(x[b])."""
        for b in range(lo, hi):
            _mamba_token(x[b], inw, zb, cwT, cb, xw, dtwT, dtb, A, Dv, outw, conv[b], h[b], out[b])

    @kernel
    def _mamba_block_rows(
        lo, hi, x, n1w, n1b, n1e, rms1, inw, zb, cwT, cb, xw, dtwT, dtb, A, Dv, outw, conv, h,
        kind, n2w, n2b, n2e, rms2, fcw, fcb, pw, pb, out,
    ):  # fmt: skip
        """out[b] = x[b] + Mixer(N1(x[b])), then (kind > 0) out[b] += MLP(N2(out[b]))."""
        Dm = x.shape[1]
        xn = np.empty(Dm, dtype=x.dtype)
        mo = np.empty(Dm, dtype=x.dtype)
        hid = np.empty(fcw.shape[0], dtype=x.dtype)
        for b in range(lo, hi):
            _norm(x[b], n1w, n1b, n1e, rms1, xn)
            _mamba_token(xn, inw, zb, cwT, cb, xw, dtwT, dtb, A, Dv, outw, conv[b], h[b], mo)
            r = out[b]
            for d in range(Dm):
                r[d] = x[b, d] + mo[d]
            if kind > 0:
                _mlp_residual(r, n2w, n2b, n2e, rms2, kind, fcw, fcb, pw, pb, xn, hid, mo)

    @kernel
    def _hypernet(hin, fw, fb, pw, pb, hid, w):
        """w = pw @ GELU(fw @ hin + fb) + pb (erf GELU, as F.gelu)."""
        _linear(fw, fb, hin, hid)
        for r in range(hid.shape[0]):
            hid[r] = gelu_and_grad(hid[r])[0]
        _linear(pw, pb, hid, w)

    @kernel
    def _hyper_token(xn, pe, f1w, f1b, p1w, p1b, f2w, f2b, p2w, p2b, tied, S, inv, out):
        """Causal HyperMixing of one normalised token xn (D,): w_k = proj_k(GELU(fc_k(xn + pe)))
        (w2 = w1 when tied), S (M, D) += w1 xn^T in place, out = w2 . GELU(S * inv)."""
        D = xn.shape[0]
        M = p1w.shape[0]
        hin = np.empty(D, dtype=xn.dtype)
        hid = np.empty(f1w.shape[0], dtype=xn.dtype)
        w1 = np.empty(M, dtype=xn.dtype)
        w2 = np.empty(M, dtype=xn.dtype)
        for d in range(D):
            hin[d] = xn[d] + pe[d]
        _hypernet(hin, f1w, f1b, p1w, p1b, hid, w1)
        if tied:
            w2[:] = w1
        else:
            _hypernet(hin, f2w, f2b, p2w, p2b, hid, w2)
        out[:] = 0.0
        for m in range(M):
            a = w1[m]
            c = w2[m]
            for d in range(D):
                s = S[m, d] + a * xn[d]
                S[m, d] = s
                out[d] += c * gelu_and_grad(s * inv)[0]

    @kernel
    def _hyper_rows(lo, hi, x, pe, f1w, f1b, p1w, p1b, f2w, f2b, p2w, p2b, tied, S, inv, out):
        """The bare mixer for batch rows [lo, hi)."""
        for b in range(lo, hi):
            _hyper_token(
                x[b], pe, f1w, f1b, p1w, p1b, f2w, f2b, p2w, p2b, tied, S[b], inv[0], out[b]
            )

    @kernel
    def _hyper_block_rows(
        lo, hi, x, pe, n1w, n1b, n1e, rms1, f1w, f1b, p1w, p1b, f2w, f2b, p2w, p2b, tied, S,
        inv, on, onw, onb, one_, rmso, kind, n2w, n2b, n2e, rms2, fcw, fcb, pw, pb, out,
    ):  # fmt: skip
        """out[b] = x[b] + OutNorm(HyperMix(N1(x[b]))) (``on``: the out norm exists), then
        out[b] += MLP(N2(out[b]))."""
        Dm = x.shape[1]
        xn = np.empty(Dm, dtype=x.dtype)
        mo = np.empty(Dm, dtype=x.dtype)
        mn = np.empty(Dm, dtype=x.dtype)
        hid = np.empty(fcw.shape[0], dtype=x.dtype)
        for b in range(lo, hi):
            _norm(x[b], n1w, n1b, n1e, rms1, xn)
            _hyper_token(xn, pe, f1w, f1b, p1w, p1b, f2w, f2b, p2w, p2b, tied, S[b], inv[0], mo)
            if on:
                _norm(mo, onw, onb, one_, rmso, mn)
            else:
                mn[:] = mo
            r = out[b]
            for d in range(Dm):
                r[d] = x[b, d] + mn[d]
            _mlp_residual(r, n2w, n2b, n2e, rms2, kind, fcw, fcb, pw, pb, xn, hid, mo)


# -- Mamba ---------------------------------------------------------------------------------
def _mamba_params(mixer) -> tuple[Tensor, ...]:
    c, dtp = mixer.conv1d, mixer.dt_proj
    return (mixer.in_proj.weight, c.weight, c.bias, mixer.x_proj.weight, dtp.weight, dtp.bias,
            mixer.A_log, mixer.D, mixer.out_proj.weight)  # fmt: skip


def _mamba_arrays(mixer) -> tuple:
    """(in_proj, zeros (2 di,), conv^T (K, di), conv bias, x_proj, dt_proj^T (R, di),
    dt_proj bias, A = -exp(A_log), D, out_proj) as numpy arrays."""
    c, dtp = mixer.conv1d, mixer.dt_proj
    w = mixer.in_proj.weight
    with torch.no_grad():
        A = -torch.exp(mixer.A_log)
        conv_t = c.weight.reshape(c.weight.shape[0], -1).t()
    ts = (conv_t, c.bias, mixer.x_proj.weight, dtp.weight.t(), dtp.bias, A, mixer.D)
    return (_arr(w, w, 0), np.zeros(w.shape[0], dtype=_np(w).dtype),
            *(_arr(t, w, 0) for t in ts), _arr(mixer.out_proj.weight, w, 0))  # fmt: skip


def _mamba_state(mixer, x: Tensor, state: dict) -> tuple[Tensor, Tensor]:
    """The layer's conv window (B, di, K - 1) and SSM state (B, di, N), contiguous in x's
    dtype (zeros on the first token); the kernels update them in place."""
    conv, h = state.get("conv"), state.get("ssm")
    if conv is None or h is None:
        B, di = x.shape[0], mixer.d_inner
        conv = x.new_zeros(B, di, mixer.conv_size - 1)
        h = x.new_zeros(B, di, mixer.state_size)
    if conv.dtype != x.dtype or h.dtype != x.dtype:
        conv, h = conv.to(x.dtype), h.to(x.dtype)
    if not (conv.is_contiguous() and h.is_contiguous()):
        conv, h = conv.contiguous(), h.contiguous()
    state["conv"], state["ssm"] = conv, h
    return conv, h


def _mamba_work(mixer, rows: int) -> int:
    return rows * mixer.d_inner * (3 * mixer.d_model + 2 * mixer.state_size + mixer.dt_rank)


def _mamba_mixer_plan(mixer) -> _Plan:
    return _Plan(_mamba_params(mixer), (), lambda: _mamba_arrays(mixer))


def mamba_step(mixer, x: Tensor, state: dict) -> Tensor | None:
    """The bare MambaMixer on one token x (B, d_model) -> (B, d_model); ``state`` {"conv",
    "ssm"} updated. None when the kernel does not apply."""
    plan = _plan(mixer, _mamba_mixer_plan)
    w = plan.arrays(mixer, x)
    if w is None:
        return None
    conv, h = plan.state_views(_mamba_state(mixer, x, state))
    out = x.new_empty(x.shape)
    rows = x.shape[0]
    if not _run(_mamba_rows, rows, _mamba_work(mixer, rows), _np(x.contiguous()), *w,
                conv, h, _np(out)):  # fmt: skip
        return None
    return out


def _mamba_block_plan(block) -> _Plan:
    """A Mamba block (``norm1``, ``mixer``, ``drop``) and, in the hybrid, ``norm2`` and ``ffn``."""
    mixer = block.mixer
    ffn = getattr(block, "ffn", None)
    norm2 = getattr(block, "norm2", None) if ffn is not None else None
    kind = _mlp_kind(ffn)
    n1 = _norm_params(block.norm1)
    n2 = _norm_params(norm2) if ffn is not None else ()
    if kind is None or n1 is None or n2 is None:
        return _Plan(None)

    def build() -> tuple:
        n2a = _norm_arrays(norm2 if norm2 is not None else block.norm1)  # unread without MLP
        return (*_norm_arrays(block.norm1), *_mamba_arrays(mixer), kind, *n2a,
                *_mlp_arrays(ffn, mixer.A_log))  # fmt: skip

    drops = (block.drop,) if ffn is None else (block.drop, ffn.drop)
    return _Plan(n1 + _mamba_params(mixer) + n2 + _mlp_params(ffn), drops, build)


def mamba_block_step(block, x: Tensor, state: dict) -> Tensor | None:
    """A Mamba block on one token: x (B, 1, d_model) -> (B, 1, d_model); None when the kernel
    does not apply. Every step here is cheap: this runs once per layer and token."""
    plan = _plan(block, _mamba_block_plan)
    w = plan.arrays(block, x)
    if w is None:
        return None
    mixer = block.mixer
    conv, h = plan.state_views(_mamba_state(mixer, x, state))
    xn, out, out2 = _tokens(x)
    rows = xn.shape[0]
    work = _mamba_work(mixer, rows) + rows * 3 * w[19].size  # + the MLP's fc
    if not _run(_mamba_block_rows, rows, work, xn, *w[:14], conv, h, *w[14:], out2):
        return None
    return torch.from_numpy(out)


# -- HyperMixer ----------------------------------------------------------------------------
def _hyper_params(mixer) -> tuple[Tensor, ...]:
    nets = (mixer.hyper_w1,) if mixer.hyper_w2 is None else (mixer.hyper_w1, mixer.hyper_w2)
    return tuple(p for net in nets for lin in (net.fc, net.proj) for p in _linear_params(lin))


def _hyper_arrays(mixer) -> tuple:
    """(fc.weight, fc.bias, proj.weight, proj.bias) of both hypernetworks, zero biases where
    absent; a tied mixer passes its one network twice; then ``tied``."""
    out: list = []
    w2 = mixer.hyper_w1 if mixer.hyper_w2 is None else mixer.hyper_w2
    like = mixer.hyper_w1.fc.weight
    for net in (mixer.hyper_w1, w2):
        fc, proj = net.fc, net.proj
        out += [_arr(fc.weight, like, 0), _arr(fc.bias, like, fc.out_features),
                _arr(proj.weight, like, 0), _arr(proj.bias, like, proj.out_features)]  # fmt: skip
    return (*out, mixer.hyper_w2 is None)


def _hyper_prepare(
    mixer, x: Tensor, state: dict, pos: int, pe: Tensor | None = None
) -> tuple | None:
    """(S contiguous in x's dtype, 1 / (count + 1), positions (D,)), or None without a state."""
    S = state.get("S")
    if S is None or S.dtype != x.dtype:
        return None
    if state["count"] != pos:
        raise ValueError(f"hypermixer decode state holds {state['count']} tokens, not {pos}")
    if pe is None:
        pe = mixer._positions(pos, 1, x.shape[-1], x.device)[0]
    if pe.dtype != x.dtype:
        pe = pe.to(x.dtype)
    inv = np.full(1, 1.0 / (pos + 1), dtype=_np(x).dtype)
    return S.contiguous(), inv, pe.contiguous()


def _hyper_work(mixer, rows: int, D: int) -> int:
    return rows * mixer.mixing_dim * D * 4


def _hyper_mixer_plan(mixer) -> _Plan:
    return _Plan(_hyper_params(mixer), (), lambda: _hyper_arrays(mixer))


def hyper_step(mixer, x: Tensor, state: dict, pos: int, pe: Tensor | None = None) -> Tensor | None:
    """The bare CausalHyperMixing on one token x (B, D) -> (B, D) (before its out norm), pe (D,)
    its positions; ``state`` {"S", "count"} updated. None when the kernel does not apply."""
    plan = _plan(mixer, _hyper_mixer_plan)
    w = plan.arrays(mixer, x)
    if w is None:
        return None
    prep = _hyper_prepare(mixer, x, state, pos, pe)
    if prep is None:
        return None
    S, inv, pe = prep
    (Sn,) = plan.state_views((S,))
    out = torch.empty_like(x)
    rows = x.shape[0]
    if not _run(_hyper_rows, rows, _hyper_work(mixer, rows, x.shape[1]), _np(x.contiguous()),
                _np(pe), *w, Sn, inv, _np(out)):  # fmt: skip
        return None
    state["S"], state["count"] = S, pos + 1
    return out


def _hyper_block_plan(block) -> _Plan:
    mixer, ffn = block.mixer, block.ffn
    kind = _mlp_kind(ffn)
    n1, n2 = _norm_params(block.norm1), _norm_params(block.norm2)
    no = () if mixer.out_norm is None else _norm_params(mixer.out_norm)
    if kind is None or kind == MLP_NONE or n1 is None or n2 is None or no is None:
        return _Plan(None)

    def build() -> tuple:
        out_norm = mixer.out_norm if mixer.out_norm is not None else block.norm1  # unread
        return (*_norm_arrays(block.norm1), *_hyper_arrays(mixer), mixer.out_norm is not None,
                *_norm_arrays(out_norm), kind, *_norm_arrays(block.norm2),
                *_mlp_arrays(ffn, block.norm2.weight))  # fmt: skip

    params = n1 + _hyper_params(mixer) + no + n2 + _mlp_params(ffn)
    return _Plan(params, (mixer.drop, ffn.drop), build)


def hyper_block_step(block, x: Tensor, state: dict, pos: int) -> Tensor | None:
    """A HyperMixer block on one token: x (B, 1, D) -> (B, 1, D); None when the kernel does not
    apply (then the caller runs the torch path, which also starts a state from nothing)."""
    plan = _plan(block, _hyper_block_plan)
    w = plan.arrays(block, x)
    if w is None:
        return None
    mixer = block.mixer
    prep = _hyper_prepare(mixer, x, state, pos)
    if prep is None:
        return None
    S, inv, pe = prep
    (Sn,) = plan.state_views((S,))
    xn, out, out2 = _tokens(x)
    rows, D = xn.shape
    work = _hyper_work(mixer, rows, D) + rows * 3 * w[23].size  # + the MLP's fc
    if not _run(_hyper_block_rows, rows, work, xn, _np(pe), *w[:13], Sn, inv, *w[13:], out2):
        return None
    state["S"], state["count"] = S, pos + 1
    return torch.from_numpy(out)

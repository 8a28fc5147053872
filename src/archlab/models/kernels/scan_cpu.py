"""Fused CPU selective scan (numba): one pass over time, the state in registers.

Same math and layout as :mod:`archlab.models.scan` (u, delta, z (B, T, D); B, C (B, T, N);
A (D, N); states (B, D, N)), but the whole layer (softplus(delta + bias), exp(delta A), the
recurrence, <C, h>, D u and the SiLU gate) is one kernel call forward and one backward instead of
hundreds of small torch ops.

Work split: one work item is (batch b, block of ``_LANES`` consecutive channels; the forward
takes a group of neighbouring blocks per item, see :func:`block_group`). Its state
h (N, lanes) stays in L1; the inner loop runs over the channels of the block (64 float32 lanes =
four AVX-512 vectors), the loop above it over the N states, the outer loop over time. Items
are independent: :func:`._numba.parallel_for` splits B x D / lanes over torch's thread count. Sums over channels
(dB, dC) are reduced inside an item and written per channel block; the few blocks are summed in
torch afterwards.

Memory: forward saves the state entering every ``_CHUNK``-step chunk, (B, T / chunk, D, N) - 1/64
of the (B, T, D, N) states - besides its inputs. The backward pass walks the chunks in reverse: it
recomputes one chunk's states, decays and pre-gate outputs y + D u from its checkpoint into
per-item buffers (chunk x N x lanes, 256 KiB each in float32, in L2) and runs the adjoint
recurrence backwards over them.
Flops per (b, t, d, n): forward 1 exp + 4, backward 1 exp + ~16; bytes per (b, t, d): ~20 read
and written forward, ~40 backward; everything of size N lives in cache.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._numba import NUMBA, kernel, parallel_for, warm_up_once

__all__ = ["available", "fused_selective_scan", "scan_backward", "scan_forward", "warm_up"]

# channels per work item. 64 rather than one 16-lane vector: the backward's sums over channels
# (dB, dC per step and state) then take one horizontal reduction per four vectors. Thread CPU
# time per (b, t, d, n) at T = 1024, B = 8, D = 256, 1 thread: lanes 16 / 32 / 64 / 128 ->
# backward 4.05 / 1.86 / 1.75 / 1.58 ns, forward 0.75 / 0.86 / 0.76 / 0.68 ns
_LANES = 64
_CHUNK = 64  # time steps between state checkpoints
_MAX_GROUP = 8  # channel blocks per forward work item (its state: 8 x N x 64 floats, in L1/L2)
_MAX_GROUP_BWD = 4  # per backward item: its row buffers, 7 x chunk x 4 x 64 floats, and the
# block's recomputed chunk (2 x chunk x N x 64) stay within a 1 MiB L2 at N = 16


def available() -> bool:
    return NUMBA


if NUMBA:
    from ._numba import helper, vexp, vsoftplus

    @helper
    def _load_group(b, c0, ng, At, state, has_state, bias, Dv, has_D, Ab, h, bl, Dl):
        """Lanes of the ng blocks from channel c0 on: A^T into Ab (G, N, lanes), batch row b of
        a (B, D, N) state into h (h0 forward, glast backward), delta bias and D into bl, Dl;
        every lane zero first (lanes past D stay zero)."""
        N, D = At.shape
        Ab[:, :, :] = 0.0
        h[:, :, :] = 0.0
        bl[:, :] = 0.0
        Dl[:, :] = 0.0
        for gi in range(ng):
            d0 = c0 + gi * _LANES
            w = min(_LANES, D - d0)
            for n in range(N):
                for j in range(w):
                    Ab[gi, n, j] = At[n, d0 + j]
                    if has_state:
                        h[gi, n, j] = state[b, d0 + j, n]
            for j in range(w):
                bl[gi, j] = bias[d0 + j]
                if has_D:
                    Dl[gi, j] = Dv[d0 + j]

    @kernel
    def _scan_fwd(lo, hi, G, u, dlt, At, Bm, Cm, Dv, z, bias, h0, flags, K, out, last, ckpt):
        """Forward. flags = (has_D, has_z, softplus, has_h0). At is A transposed, (N, D).

        A work item is (batch row b, group of G consecutive channel blocks); per time step it
        runs the group's blocks in turn, so it reads and writes G x 64 contiguous channels of
        each (B, T, D) row (one block alone read 256 bytes per 1 KiB row at D = 256, and ran at
        half the speed: 0.77 against 0.38 ns per (t, d, n) with G = 4, 1 thread).
        Every loop with transcendental math or the N-loop runs over all ``_LANES`` lanes of
        local arrays (constant trip count: whole vectors); lanes past D hold zeros (A = 0,
        delta u = 0, so their state stays 0) and are never written back."""
        Bsz, T, D = u.shape
        N = At.shape[0]
        nblk = (D + _LANES - 1) // _LANES
        ngrp = (nblk + G - 1) // G
        has_D, has_z, softplus, has_h0 = flags[0], flags[1], flags[2], flags[3]
        one = np.ones(1, dtype=u.dtype)[0]
        h = np.zeros((G, N, _LANES), dtype=u.dtype)
        Ab = np.zeros((G, N, _LANES), dtype=u.dtype)  # A of the group's blocks
        bl = np.zeros((G, _LANES), dtype=u.dtype)
        Dl = np.zeros((G, _LANES), dtype=u.dtype)
        dv = np.zeros(_LANES, dtype=u.dtype)
        uv = np.zeros(_LANES, dtype=u.dtype)
        zv = np.zeros(_LANES, dtype=u.dtype)
        du = np.zeros(_LANES, dtype=u.dtype)
        y = np.zeros(_LANES, dtype=u.dtype)
        ov = np.zeros(_LANES, dtype=u.dtype)
        for item in range(lo, hi):
            b = item // ngrp
            g0 = (item % ngrp) * G
            ng = min(G, nblk - g0)
            _load_group(b, g0 * _LANES, ng, At, h0, has_h0, bias, Dv, has_D, Ab, h, bl, Dl)
            for t in range(T):
                for gi in range(ng):
                    d0 = (g0 + gi) * _LANES
                    w = min(_LANES, D - d0)
                    hg = h[gi]
                    Ag = Ab[gi]
                    if t % K == 0:
                        c = t // K
                        for n in range(N):
                            for j in range(w):
                                ckpt[b, c, d0 + j, n] = hg[n, j]
                    for j in range(w):
                        dv[j] = dlt[b, t, d0 + j]
                        uv[j] = u[b, t, d0 + j]
                        if has_z:
                            zv[j] = z[b, t, d0 + j]
                    for j in range(_LANES):
                        v = dv[j] + bl[gi, j]
                        if softplus:
                            v = vsoftplus(v)
                        du[j] = v * uv[j]
                        dv[j] = v
                        y[j] = 0.0
                    for n in range(N):  # hot loop
                        bn = Bm[b, t, n]
                        cn = Cm[b, t, n]
                        for j in range(_LANES):
                            hv = vexp(dv[j] * Ag[n, j]) * hg[n, j] + du[j] * bn
                            hg[n, j] = hv
                            y[j] += cn * hv
                    for j in range(_LANES):
                        o = y[j] + Dl[gi, j] * uv[j]
                        if has_z:
                            o = o * zv[j] / (one + vexp(-zv[j]))
                        ov[j] = o
                    for j in range(w):
                        out[b, t, d0 + j] = ov[j]
            for gi in range(ng):
                d0 = (g0 + gi) * _LANES
                w = min(_LANES, D - d0)
                for n in range(N):
                    for j in range(w):
                        last[b, d0 + j, n] = h[gi, n, j]

    @kernel
    def _scan_bwd(
        lo, hi, G, u, dlt, At, Bm, Cm, Dv, z, bias, flags, K, ckpt, gout, glast,
        du_out, ddlt, dA_b, dB_blk, dC_blk, dD_b, dz, dbias_b, dh0,
    ):  # fmt: skip
        """Backward. flags = (has_D, has_z, softplus, has_h0, has_glast); writes every grad.

        dA_b (B, N, D), dD_b and dbias_b (B, D) are per-batch partial sums; dB_blk, dC_blk
        (nblk, B, T, N) per channel block. Lanes as in the forward kernel.

        A work item is (batch row b, group of G channel blocks). Per chunk it copies the
        group's columns of u, delta, gout and z into row buffers in forward time order (long
        contiguous reads), runs each block's recompute and adjoint pass from them, and writes
        the three (B, T, D) gradients back the same way. Walking the rows backwards in time
        straight from memory, a block at a time, ran at half the speed.
        """
        Bsz, T, D = u.shape
        N = At.shape[0]
        nblk = (D + _LANES - 1) // _LANES
        ngrp = (nblk + G - 1) // G
        nck = (T + K - 1) // K
        W = G * _LANES
        has_D, has_z, softplus, has_glast = flags[0], flags[1], flags[2], flags[4]
        one = np.ones(1, dtype=u.dtype)[0]
        zero = np.zeros(1, dtype=u.dtype)[0]
        # per block of the group, carried over the chunks
        gG = np.zeros((G, N, _LANES), dtype=u.dtype)  # dL/dh_t, carried backwards
        AbG = np.zeros((G, N, _LANES), dtype=u.dtype)
        dAG = np.zeros((G, N, _LANES), dtype=u.dtype)
        blG = np.zeros((G, _LANES), dtype=u.dtype)
        DlG = np.zeros((G, _LANES), dtype=u.dtype)
        dDG = np.zeros((G, _LANES), dtype=u.dtype)
        dbG = np.zeros((G, _LANES), dtype=u.dtype)
        # the group's rows of the chunk (columns past D stay zero)
        US = np.zeros((K, W), dtype=u.dtype)  # u
        DS = np.zeros((K, W), dtype=u.dtype)  # delta before bias and softplus
        GO = np.zeros((K, W), dtype=u.dtype)  # gout
        ZS = np.zeros((K, W), dtype=u.dtype)  # z
        GU = np.zeros((K, W), dtype=u.dtype)  # du
        GD = np.zeros((K, W), dtype=u.dtype)  # ddelta
        GZ = np.zeros((K, W), dtype=u.dtype)  # dz
        # one block's recomputed chunk
        hs = np.zeros((K + 1, N, _LANES), dtype=u.dtype)  # h_{t0-1} .. h_{t1-1}
        As = np.zeros((K, N, _LANES), dtype=u.dtype)  # exp(delta A) of the chunk
        dts = np.zeros((K, _LANES), dtype=u.dtype)
        DU = np.zeros((K, _LANES), dtype=u.dtype)  # delta u of the chunk
        sig = np.zeros((K, _LANES), dtype=u.dtype)  # d softplus / d input
        PRE = np.zeros((K, _LANES), dtype=u.dtype)  # y + D u of the chunk (recomputed)
        yv = np.zeros(_LANES, dtype=u.dtype)
        dzv = np.zeros(_LANES, dtype=u.dtype)
        dy = np.zeros(_LANES, dtype=u.dtype)
        ddu = np.zeros(_LANES, dtype=u.dtype)  # dL/d(delta u)
        ddt = np.zeros(_LANES, dtype=u.dtype)  # dL/d delta through the decays
        for item in range(lo, hi):
            b = item // ngrp
            g0 = (item % ngrp) * G
            ng = min(G, nblk - g0)
            c0 = g0 * _LANES
            cw = min(W, D - c0)
            _load_group(b, c0, ng, At, glast, has_glast, bias, Dv, has_D, AbG, gG, blG, DlG)
            dAG[:, :, :] = 0.0
            for arr2 in (dDG, dbG, US, DS, GO, ZS):
                arr2[:, :] = 0.0
            for c in range(nck - 1, -1, -1):
                t0 = c * K
                L = min(T, t0 + K) - t0
                for i in range(L):  # the chunk's rows, forward in time
                    t = t0 + i
                    for j in range(cw):
                        US[i, j] = u[b, t, c0 + j]
                        DS[i, j] = dlt[b, t, c0 + j]
                        GO[i, j] = gout[b, t, c0 + j]
                    if has_z:
                        for j in range(cw):
                            ZS[i, j] = z[b, t, c0 + j]
                for gi in range(ng):
                    d0 = c0 + gi * _LANES
                    w = min(_LANES, D - d0)
                    off = gi * _LANES
                    g, Ab, dA = gG[gi], AbG[gi], dAG[gi]
                    bl, Dl, dDl, dbl = blG[gi], DlG[gi], dDG[gi], dbG[gi]
                    for n in range(N):
                        for j in range(_LANES):
                            hs[0, n, j] = ckpt[b, c, d0 + j, n] if j < w else zero
                    for i in range(L):  # recompute the chunk's states and decays
                        t = t0 + i
                        for j in range(_LANES):
                            v = DS[i, off + j] + bl[j]
                            s = one
                            if softplus:
                                e = vexp(v)
                                s = one if v > 20.0 else e / (one + e)
                                v = vsoftplus(v)
                            dts[i, j] = v
                            sig[i, j] = s
                            DU[i, j] = v * US[i, off + j]
                            yv[j] = 0.0
                        for n in range(N):
                            bn = Bm[b, t, n]
                            cn = Cm[b, t, n]
                            for j in range(_LANES):
                                a = vexp(dts[i, j] * Ab[n, j])
                                As[i, n, j] = a
                                hv = a * hs[i, n, j] + DU[i, j] * bn
                                hs[i + 1, n, j] = hv
                                yv[j] += cn * hv
                        for j in range(_LANES):
                            PRE[i, j] = yv[j] + Dl[j] * US[i, off + j]
                    for i in range(L - 1, -1, -1):  # adjoint recurrence, backwards in time
                        t = t0 + i
                        for j in range(_LANES):
                            go = GO[i, off + j]
                            if has_z:
                                zz = ZS[i, off + j]
                                sz = one / (one + vexp(-zz))
                                dzv[j] = go * PRE[i, j] * sz * (one + zz * (one - sz))
                                go = go * zz * sz
                            dy[j] = go
                            dDl[j] += go * US[i, off + j]
                            ddu[j] = 0.0
                            ddt[j] = 0.0
                        blk = g0 + gi
                        for n in range(N):  # hot loop
                            bn = Bm[b, t, n]
                            cn = Cm[b, t, n]
                            acc_c = zero
                            acc_b = zero
                            for j in range(_LANES):
                                gv = g[n, j] + cn * dy[j]  # dL/dh_t
                                acc_c += dy[j] * hs[i + 1, n, j]
                                acc_b += gv * DU[i, j]
                                ddu[j] += gv * bn
                                a = As[i, n, j]
                                ga = gv * hs[i, n, j] * a  # dL/d(delta A)
                                dA[n, j] += ga * dts[i, j]
                                ddt[j] += ga * Ab[n, j]
                                g[n, j] = gv * a  # dL/dh_{t-1} through the recurrence
                            dC_blk[blk, b, t, n] = acc_c
                            dB_blk[blk, b, t, n] = acc_b
                        for j in range(_LANES):
                            GU[i, off + j] = ddu[j] * dts[i, j] + dy[j] * Dl[j]
                            gd = (ddt[j] + ddu[j] * US[i, off + j]) * sig[i, j]
                            GD[i, off + j] = gd
                            dbl[j] += gd
                            GZ[i, off + j] = dzv[j]
                for i in range(L):  # the chunk's gradient rows, forward in time
                    t = t0 + i
                    for j in range(cw):
                        du_out[b, t, c0 + j] = GU[i, j]
                        ddlt[b, t, c0 + j] = GD[i, j]
                    if has_z:
                        for j in range(cw):
                            dz[b, t, c0 + j] = GZ[i, j]
            for gi in range(ng):
                d0 = c0 + gi * _LANES
                w = min(_LANES, D - d0)
                for n in range(N):
                    for j in range(w):
                        dh0[b, d0 + j, n] = gG[gi, n, j]
                        dA_b[b, n, d0 + j] = dAG[gi, n, j]
                for j in range(w):
                    dD_b[b, d0 + j] = dDG[gi, j]
                    dbias_b[b, d0 + j] = dbG[gi, j]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def block_group(rows: int, nblk: int, most: int = 0) -> int:
    """Channel blocks per work item: as many as leave ~4 items per thread (up to ``most``,
    default _MAX_GROUP), so each item reads long contiguous stretches of every row. The result
    does not depend on it (every channel's arithmetic is the same)."""
    most = most or _MAX_GROUP
    return max(1, min(nblk, most, rows * nblk // (4 * torch.get_num_threads())))


def scan_forward(u, delta, At, B, C, Dv, z, bias, h0, softplus, has_D=True):
    """Forward kernel call: (out (B, T, D), h_T (B, D, N), checkpoints, flags). ``At`` is A^T
    (N, D); z and h0 may be None; all contiguous, one dtype."""
    Bsz, T, Dm = u.shape
    N = At.shape[0]
    dummy = u.new_zeros(1, 1, 1)
    flags = np.array([has_D, z is not None, softplus, h0 is not None, False])
    out = torch.empty_like(u)
    last = u.new_empty(Bsz, Dm, N)
    ckpt = u.new_empty(Bsz, -(-T // _CHUNK), Dm, N)
    nblk = -(-Dm // _LANES)
    G = block_group(Bsz, nblk)
    parallel_for(
        _scan_fwd, Bsz * -(-nblk // G), Bsz * T * Dm * N, G,
        _np(u), _np(delta), _np(At), _np(B), _np(C), _np(Dv),
        _np(z if z is not None else dummy), _np(bias),
        _np(h0 if h0 is not None else dummy), flags, _CHUNK,
        _np(out), _np(last), _np(ckpt),
    )  # fmt: skip
    return out, last, ckpt, flags


def scan_backward(u, delta, At, B, C, Dv, z, bias, ckpt, flags, gout, glast):
    """Backward kernel call: (du, ddelta, dA (D, N), dB, dC, dD, dz, dbias, dh0); ``gout``
    contiguous, ``glast`` (B, D, N) or None."""
    Bsz, T, Dm = u.shape
    N = At.shape[0]
    nblk = -(-Dm // _LANES)
    flags = flags.copy()
    flags[4] = glast is not None
    dummy = u.new_zeros(1, 1, 1)
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
    dA_b = u.new_empty(Bsz, N, Dm)
    dB_blk, dC_blk = u.new_empty(nblk, Bsz, T, N), u.new_empty(nblk, Bsz, T, N)
    dD_b, dbias_b = u.new_empty(Bsz, Dm), u.new_empty(Bsz, Dm)
    dh0 = u.new_empty(Bsz, Dm, N)
    G = block_group(Bsz, nblk, _MAX_GROUP_BWD)
    parallel_for(
        _scan_bwd, Bsz * -(-nblk // G), Bsz * T * Dm * N, G,
        _np(u), _np(delta), _np(At), _np(B), _np(C), _np(Dv),
        _np(z if z is not None else dummy), _np(bias), flags, _CHUNK, _np(ckpt),
        _np(gout), _np(glast.contiguous() if glast is not None else dummy),
        _np(du), _np(ddelta), _np(dA_b), _np(dB_blk), _np(dC_blk), _np(dD_b), _np(dz),
        _np(dbias_b), _np(dh0),
    )  # fmt: skip
    return (
        du, ddelta, dA_b.sum(0).t(), dB_blk.sum(0) if nblk > 1 else dB_blk[0],
        dC_blk.sum(0) if nblk > 1 else dC_blk[0], dD_b.sum(0), dz, dbias_b.sum(0), dh0,
    )  # fmt: skip


class _FusedScan(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, h0) -> (out, h_T); all in one dtype, contiguous."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus):  # type: ignore[override]
        Dm = u.shape[2]
        At = A.t().contiguous()  # (N, D)
        Dv = D if D is not None else u.new_zeros(Dm)
        bias = delta_bias if delta_bias is not None else u.new_zeros(Dm)
        out, last, ckpt, flags = scan_forward(
            u, delta, At, B, C, Dv, z, bias, h0, softplus, has_D=D is not None
        )
        ctx.save_for_backward(u, delta, At, B, C, Dv, z, bias, ckpt)
        ctx.flags = flags
        ctx.has = (D is not None, z is not None, delta_bias is not None, h0 is not None)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):  # type: ignore[override]
        u, delta, At, B, C, Dv, z, bias, ckpt = ctx.saved_tensors
        gout = gout.contiguous() if gout is not None else torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = scan_backward(
            u, delta, At, B, C, Dv, z, bias, ckpt, ctx.flags, gout, glast
        )
        has_D, has_z, has_bias, has_h0 = ctx.has
        return (
            du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None,
            dbias if has_bias else None, dh0 if has_h0 else None, None,
        )  # fmt: skip


_warm: set[torch.dtype] = set()


def _tiny_step(dtype: torch.dtype) -> None:
    """One forward and backward of both kernels on a tiny problem."""
    g = torch.Generator().manual_seed(0)
    u, dl, z = (torch.randn(1, 2, 3, generator=g, dtype=dtype) for _ in range(3))
    Bm, Cm = (torch.randn(1, 2, 2, generator=g, dtype=dtype) for _ in range(2))
    A, D = -torch.ones(3, 2, dtype=dtype), torch.ones(3, dtype=dtype)
    h0 = torch.zeros(1, 3, 2, dtype=dtype)
    args = [u, dl, A, Bm, Cm, D, z, D, h0]
    for t in args:
        t.requires_grad_(True)
    out, last = _FusedScan.apply(*args, True)
    (out.sum() + last.sum()).backward()


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load) both kernels for ``dtype`` once; raises on failure. Runs isolated
    (outside inference mode, no_grad and checkpoint recomputation) so the tiny backward pass
    can be taken wherever the first use happens."""
    warm_up_once(_warm, dtype, lambda: _tiny_step(dtype))


def fused_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Fused scan in ``dtype`` (float32 or float64); returns (out (B, T, D), h_T (B, D, N))."""

    def prep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    with torch.autocast("cpu", enabled=False):
        return _FusedScan.apply(
            prep(u), prep(delta), prep(A), prep(B), prep(C), prep(D), prep(z),
            prep(delta_bias), prep(initial_state), bool(delta_softplus),
        )  # fmt: skip

"""Selective scan of Mamba (Gu & Dao 2023): a fast chunked scan and a sequential reference.

For batch b, channel d and state n, with the discretisation of the reference implementation
(zero-order hold for A, Euler for B):

    a_t = exp(delta_t * A)                  decay in (0, 1], A < 0 (S4D-real)
    h_t = a_t * h_{t-1} + delta_t * u_t * B_t        state (B, D, N)
    y_t = <C_t, h_t> + D * u_t
    out_t = y_t * silu(z_t)                 optional gate

Layout is channels-last, as the linear layers produce it: u, delta, z (B, T, D); B, C (B, T, N);
A (D, N); D (D,); states (B, D, N). ``delta_bias``/``delta_softplus`` behave as in the reference
(delta <- softplus(delta + bias)).

`selective_scan` (training and prefill) is a two-level chunked scan with a hand-written backward:

1. local scans: the time axis is cut into chunks of length L and the recurrence runs inside
   every chunk from a zero state, all chunks at once (L vectorised steps over (B, T/L, D, N));
2. carry: a short loop over the T/L chunks computes the true state entering each chunk from the
   previous chunk's final state and the chunk's total decay;
3. fix-up: the entering states are propagated into the chunks (another L vectorised steps).

Only products of decays in (0, 1] occur (never exp of a positive number, never a division), so
it is stable for any delta and A; Python runs about 2L + T/L steps instead of T (L ~ sqrt(T)).
The work is done over blocks of channels (channels are independent) into a few reused buffers of
about 16 MiB, so no (B, T, D, N) tensor is ever allocated whole. The forward pass saves only its
inputs and the state entering each chunk, (B, T/L, D, N); the backward pass recomputes a block's
states from those in one pass (no carry needed), then runs the same scan in reverse time on
dL/dh. Peak memory is O(B T D + B (T/L) D N + block), nothing of size T^2.

Cost model on CPU: about 8 elementwise passes over B T D N numbers forward and 19 backward, each
a large vectorised op; the sequential loop does fewer passes but T small ops per pass, and keeps
every per-step state for autograd (5-6x the memory measured in benchmarks/bench_layers.py).

`selective_scan_sequential` is the step-by-step reference (autograd through a loop over time).

Implementations. :func:`selective_scan` dispatches: on CPU it runs the fused numba kernel of
``kernels/scan_cpu.py`` (one pass over time, state in registers; 20-40x the chunked scan, see
``benchmarks/bench_layers.py``), falling back to the chunked scan above with a one-line notice
when numba is missing or the kernel fails to compile; elsewhere (CUDA without mamba_ssm, MPS) the
chunked scan. ``ARCHLAB_SCAN=fused|chunked|sequential`` forces one (``fused`` falls back to
chunked off CPU), as does the ``impl`` argument.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCAN_IMPLS",
    "default_chunk_size",
    "resolve_scan_impl",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_sequential",
    "selective_step",
]
SCAN_IMPLS = ("fused", "chunked", "sequential")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _discretised_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    dtype = _compute_dtype(delta)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype
) -> Tensor:
    """Skip connection and gate on (B, T, D) outputs."""
    if D is not None:
        y = y + u * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def default_chunk_size(T: int) -> int:
    """L ~ sqrt(T) balances the L vectorised in-chunk steps against the T/L carry steps."""
    return max(1, min(T, round(math.sqrt(T))))


# ---- the chunked scan (no autograd inside) ------------------------------------------------
# Channels are independent, so the scan runs over blocks of channels whose (B, T, Db, N)
# working set stays in cache; the block buffers are allocated once and reused. Inside a block the
# layout is (L, B, nc, Db, N): time within chunk first, so one in-chunk step is a contiguous slab.
_BLOCK_ELEMENTS = 1 << 21  # ~8 MiB of float32 per block buffer


def _chunk_major(x: Tensor, L: int, nc: int) -> Tensor:
    """(B, T, ...) -> (L, B, nc, ...) contiguous, zero-padded to nc * L steps."""
    B, T = x.shape[:2]
    pad = nc * L - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    return x.unflatten(1, (nc, L)).movedim(2, 0).contiguous()


def _time_major(x: Tensor, T: int) -> Tensor:
    """(L, B, nc, ...) -> (B, T, ...): inverse of _chunk_major."""
    L, B, nc = x.shape[:3]
    return x.movedim(0, 2).reshape(B, nc * L, *x.shape[3:])[:, :T]


class _Blocks:
    """Shapes, channel blocks and reusable buffers of one chunked scan call."""

    def __init__(self, B: int, T: int, D: int, N: int, L: int, ref: Tensor) -> None:
        self.L, self.nc = L, -(-T // L)
        self.B, self.T, self.D, self.N = B, T, D, N
        per_channel = B * self.nc * L * N
        n_blocks = -(-D * per_channel // _BLOCK_ELEMENTS)
        self.Db = -(-D // n_blocks)  # equal blocks, never a tiny last one
        self.numel = L * B * self.nc * self.Db * N
        self.ref = ref
        self.buffers = [self.new_buffer() for _ in range(2)]

    def new_buffer(self) -> Tensor:
        return torch.empty(self.numel, dtype=self.ref.dtype, device=self.ref.device)

    def ranges(self):
        """Yield (d0, d1, contiguous (L, B, nc, d1 - d0, N) views of the buffers)."""
        for d0 in range(0, self.D, self.Db):
            d1 = min(self.D, d0 + self.Db)
            shape = (self.L, self.B, self.nc, d1 - d0, self.N)
            n = math.prod(shape)
            yield d0, d1, [buf[:n].view(shape) for buf in self.buffers]


def _decays_inputs(a, x, dl, dlu, A, Bp):
    """a <- exp(delta A), x <- delta u B; all (L, B, nc, Db, N); returns (a, x)."""
    torch.mul(dl.unsqueeze(-1), A, out=a).exp_()
    torch.mul(dlu.unsqueeze(-1), Bp.unsqueeze(-2), out=x)
    return a, x


def _contract_n(x: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """sum_n x[..., d, n] * v[..., n] -> (..., Db), using ``out`` (x's shape) as scratch."""
    return torch.mul(x, v.unsqueeze(-2), out=out).sum(dim=-1)


class _ChunkedSelectiveScan(torch.autograd.Function):
    """(u, delta, A, B, C, h0) -> (<C_t, h_t>, h_T); delta already discretised (> 0).

    Saves only the inputs and the state entering every chunk (B, nc, D, N); the backward pass
    recomputes the states of one channel block at a time.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, L):  # type: ignore[override]
        Bsz, T, D = u.shape
        N = A.shape[1]
        blk = _Blocks(Bsz, T, D, N, L, u)
        L, nc = blk.L, blk.nc
        dl = _chunk_major(delta, L, nc)  # (L, B, nc, D)
        dlu = _chunk_major(delta * u, L, nc)
        Bp = _chunk_major(B, L, nc)  # (L, B, nc, N)
        Cp = _chunk_major(C, L, nc)
        dl_sum = dl.sum(dim=0)  # (B, nc, D)
        y = torch.empty(L, Bsz, nc, D, dtype=u.dtype, device=u.device)
        entering = torch.zeros(Bsz, nc, D, N, dtype=u.dtype, device=u.device)
        if h0 is not None:
            entering[:, 0] = h0
        last = torch.empty(Bsz, D, N, dtype=u.dtype, device=u.device)
        for d0, d1, (a, h) in blk.ranges():
            _decays_inputs(a, h, dl[..., d0:d1], dlu[..., d0:d1], A[d0:d1], Bp)
            for i in range(1, L):  # 1. local scans from a zero state, every chunk at once
                h[i].addcmul_(a[i], h[i - 1])
            if nc > 1 or h0 is not None:
                # decay across each chunk: prod_i exp(delta_i A) = exp(A sum_i delta_i)
                total = torch.mul(dl_sum[..., d0:d1, None], A[d0:d1]).exp_()  # (B, nc, Db, N)
                ent, h_end = entering[:, :, d0:d1], h[L - 1]
                for c in range(nc - 1):  # 2. carry: true state entering each chunk
                    torch.addcmul(h_end[:, c], total[:, c], ent[:, c], out=ent[:, c + 1])
                corr = ent.clone()
                for i in range(L):  # 3. fix-up: h_i += prod_{j<=i} a_j * entering state
                    h[i].add_(corr.mul_(a[i]))
            last[:, d0:d1] = h[L - 1][:, nc - 1]
            y[..., d0:d1] = _contract_n(h, Cp, out=a)  # <C, h>; a is no longer needed
        ctx.save_for_backward(u, delta, A, B, C, h0, entering)
        ctx.L, ctx.device_type = L, u.device.type
        return _time_major(y, T), last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_last):  # type: ignore[override]
        with torch.autocast(ctx.device_type, enabled=False):  # float32 math under autocast too
            return _ChunkedSelectiveScan._backward(ctx, gy, g_last)

    @staticmethod
    def _backward(ctx, gy, g_last):
        u, delta, A, B, C, h0, entering = ctx.saved_tensors
        Bsz, T, D = u.shape
        N = A.shape[1]
        blk = _Blocks(Bsz, T, D, N, ctx.L, u)
        L, nc = blk.L, blk.nc
        blk.buffers += [blk.new_buffer(), blk.new_buffer()]
        dl = _chunk_major(delta, L, nc)
        dlu = _chunk_major(delta * u, L, nc)
        Bp = _chunk_major(B, L, nc)
        Cp = _chunk_major(C, L, nc)
        gyp = _chunk_major(gy if gy is not None else torch.zeros_like(u), L, nc)
        dl_rest = dl[1:].sum(dim=0)  # (B, nc, D)
        gB = torch.empty_like(dl)  # (L, B, nc, D): sum_n g B
        ddelta_a = torch.empty_like(dl)  # sum_n dL/d(delta A) A
        dA = torch.empty_like(A)
        dB = torch.zeros_like(Bp)
        dC = torch.zeros_like(Cp)
        dh0 = torch.empty_like(h0) if h0 is not None and ctx.needs_input_grad[5] else None
        M = L * Bsz * nc
        for d0, d1, (a, h, g, tmp) in blk.ranges():
            Db = d1 - d0
            ent = entering[:, :, d0:d1]
            # recompute the states from the saved entering states: one pass, no carry
            _decays_inputs(a, h, dl[..., d0:d1], dlu[..., d0:d1], A[d0:d1], Bp)
            h[0].addcmul_(a[0], ent)
            for i in range(1, L):
                h[i].addcmul_(a[i], h[i - 1])
            # g_t = dL/dh_t = C_t gy_t + a_{t+1} g_{t+1}: the forward scan in reverse
            torch.mul(gyp[..., d0:d1].unsqueeze(-1), Cp.unsqueeze(-2), out=g)
            if g_last is not None:
                g[L - 1][:, nc - 1] += g_last[:, d0:d1]  # padding steps carry it unchanged
            for i in range(L - 2, -1, -1):  # 1. local reverse scans
                g[i].addcmul_(a[i + 1], g[i + 1])
            # 2. carry from the right: v_c = a at chunk c's first step * true g there
            incoming = torch.zeros_like(ent)  # (B, nc, Db, N) value entering chunk c
            if nc > 1 or dh0 is not None:
                # decay over steps 1 .. L-1 of each chunk, exp(A sum_{i>=1} delta_i)
                after_first = torch.mul(dl_rest[..., d0:d1, None], A[d0:d1]).exp_()
                v = torch.empty_like(ent[:, 0])
                g0, a0 = g[0], a[0]
                for c in range(nc - 1, 0, -1):
                    torch.addcmul(g0[:, c], after_first[:, c], incoming[:, c], out=v)
                    torch.mul(a0[:, c], v, out=incoming[:, c - 1])
                if dh0 is not None:  # dL/dh0 = a_0 * g_0 of the first chunk
                    torch.addcmul(g0[:, 0], after_first[:, 0], incoming[:, 0], out=v)
                    dh0[:, d0:d1] = a0[:, 0] * v
            for i in range(L - 1, -1, -1):  # 3. fix-up
                g[i].add_(incoming)
                incoming.mul_(a[i])
            g2 = g.view(M, Db, N)
            dC += torch.bmm(gyp[..., d0:d1].reshape(M, 1, Db), h.view(M, Db, N)).view_as(dC)
            dB += torch.bmm(dlu[..., d0:d1].reshape(M, 1, Db), g2).view_as(dB)
            gB[..., d0:d1] = _contract_n(g, Bp, out=tmp)
            # w = dL/d(delta A) = g_t * a_t * h_{t-1}
            w = g.mul_(a)
            w[1:].mul_(h[:-1])
            w[0].mul_(ent)
            dA[d0:d1] = torch.mul(w, dl[..., d0:d1].unsqueeze(-1), out=tmp).sum(dim=(0, 1, 2))
            ddelta_a[..., d0:d1] = w.mul_(A[d0:d1]).sum(dim=-1)
        up = _chunk_major(u, L, nc)
        ddelta = _time_major(ddelta_a.add_(gB * up), T)
        du = _time_major(gB.mul_(dl), T)
        return du, ddelta, dA, _time_major(dB, T), _time_major(dC, T), dh0, None


def resolve_scan_impl(device: torch.device, impl: str | None = None) -> str:
    """The implementation a scan on ``device`` runs: ``impl``, else $ARCHLAB_SCAN, else the
    fastest available (fused on CPU when its kernel loads, chunked otherwise)."""
    from .kernels import fused_available, kernel_notice

    choice = impl or os.environ.get("ARCHLAB_SCAN", "").strip().lower() or None
    if choice is not None and choice not in SCAN_IMPLS:
        raise ValueError(f"ARCHLAB_SCAN={choice!r}: expected one of {', '.join(SCAN_IMPLS)}")
    if choice in ("chunked", "sequential"):
        return choice
    if device.type != "cpu":
        return "chunked"
    if fused_available("scan"):
        return "fused"
    kernel_notice("scan", "selective scan: fused CPU kernel unavailable, using the chunked scan")
    return "chunked"


def _fused_ready(warm_up, dtype: torch.dtype) -> bool:
    """Compile (or load) the fused kernels for ``dtype`` once; on failure disable them."""
    from .kernels import disable_fused, kernel_notice

    try:
        warm_up(dtype)
    except Exception as exc:  # a numba that cannot compile here: never fail training
        disable_fused("scan", exc)
        kernel_notice("scan", "selective scan: fused CPU kernel failed, using the chunked scan")
        return False
    return True


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int | None = None,
    impl: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan by the implementation :func:`resolve_scan_impl` picks; shapes and
    arguments as :func:`selective_scan_chunked` (``chunk_size`` only matters to that one).

    Returns out (B, T, D) in u's dtype, and with ``return_last_state`` also h_T (B, D, N) in the
    compute dtype (float32, or float64 for float64 inputs).
    """
    if u.shape[1] == 0:
        raise ValueError("selective_scan: empty sequence")
    which = resolve_scan_impl(u.device, impl)
    if which == "fused":
        from .kernels import scan_cpu

        dtype = _compute_dtype(delta)
        if _fused_ready(scan_cpu.warm_up, dtype):
            out, last = scan_cpu.fused_selective_scan(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dtype
            )
            out = out.to(u.dtype)
            return (out, last) if return_last_state else out
        which = "chunked"
    if which == "sequential":
        return selective_scan_sequential(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state
        )
    return selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state,
        chunk_size,
    )  # fmt: skip


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked selective scan; shapes in the module docstring. Computes in float32 (or float64).

    Returns out (B, T, D) in u's dtype, and with ``return_last_state`` also h_T (B, D, N) in the
    compute dtype. ``initial_state`` (B, D, N) continues a scan (decoding, chunked prefill).
    """
    dtype_in = u.dtype
    Bsz, T, Dm = u.shape
    if T == 0:
        raise ValueError("selective_scan: empty sequence")
    delta = _discretised_delta(delta, delta_bias, delta_softplus).contiguous()
    dtype = delta.dtype
    uc = u.to(dtype).contiguous()
    h0 = initial_state.to(dtype).contiguous() if initial_state is not None else None
    L = min(T, chunk_size) if chunk_size else default_chunk_size(T)
    with torch.autocast(u.device.type, enabled=False):  # the scan always runs in dtype
        y, last = _ChunkedSelectiveScan.apply(
            uc, delta, A.to(dtype), B.to(dtype).contiguous(), C.to(dtype).contiguous(), h0, L
        )
    out = _finish(y, uc, D, z, dtype_in)
    return (out, last) if return_last_state else out


def selective_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One recurrent step for decoding: u, delta, z (B, D); B, C (B, N); state (B, D, N).

    delta is already discretised. Returns (out (B, D), new state); the state keeps its dtype.
    """
    dtype = state.dtype
    delta = delta.to(dtype)
    a = torch.exp(delta.unsqueeze(-1) * A.to(dtype))  # (B, D, N)
    state = torch.addcmul((delta * u.to(dtype)).unsqueeze(-1) * B.to(dtype).unsqueeze(1), a, state)
    y = torch.bmm(state, C.to(dtype).unsqueeze(-1)).squeeze(-1)  # (B, D)
    return _finish(y, u.to(dtype), D, z, u.dtype), state


def selective_scan_sequential(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference: the recurrence one time step at a time, differentiated by autograd.

    Like the reference ``selective_scan_ref`` of state-spaces/mamba it precomputes the
    discretised a_t and delta_t u_t B_t for all t and loops only over the recurrence.
    """
    dtype_in = u.dtype
    delta = _discretised_delta(delta, delta_bias, delta_softplus)
    dtype = delta.dtype
    u = u.to(dtype)
    a = torch.exp(delta.unsqueeze(-1) * A.to(dtype))  # (B, T, D, N)
    x = (delta * u).unsqueeze(-1) * B.to(dtype).unsqueeze(2)  # (B, T, D, N)
    h = (
        initial_state.to(dtype)
        if initial_state is not None
        else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    )
    ys = []
    for a_t, x_t, c_t in zip(a.unbind(1), x.unbind(1), C.to(dtype).unbind(1), strict=True):
        h = a_t * h + x_t  # (B, D, N)
        ys.append(torch.bmm(h, c_t.unsqueeze(-1)).squeeze(-1))  # (B, D)
    y = torch.stack(ys, dim=1)  # (B, T, D)
    out = _finish(y, u, D, z, dtype_in)
    return (out, h) if return_last_state else out

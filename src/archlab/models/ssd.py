"""State-space duality (SSD, Dao & Gu 2024, arXiv 2405.21060): the scan of Mamba-2.

Per head h with a scalar decay a_t = dt_t A_h (A_h < 0), state S (headdim P x d_state N):

    S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T          x_t (P), B_t (N)
    y_t = S_t C_t                                    C_t (N); the D skip is added by the caller

B and C are shared by the H / G heads of a group (``ngroups`` G). Three forms, equal in exact
arithmetic:

* :func:`ssd_chunked` (training): split T into chunks of Q. Within a chunk the recurrence is
  a masked "attention" (C B^T) * L with L[l, s] = exp(sum a_{s+1..l}); between chunks only
  the states pass, through a (chunks+1)^2 lower-triangular matrix of chunk decays. Everything
  is a batched matmul; every exponent is <= 0 (no overflow for strong decay).
* :func:`ssd_sequential` (the reference the tests hold the chunked form to).
* :func:`ssd_step` (decoding): one token from the carried state.

Compute dtype: at least float32 (half precision is upcast, float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """x (b, T, H, P), dt (b, T, H) (after softplus), A (H,), B, C (b, T, G, N),
    initial_state (b, H, P, N) or None -> y (b, T, H, P) without D, final state (b, H, P, N)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    r = H // G  # heads per group
    dtype = _compute_dtype(x)
    Q = max(1, min(chunk_size, T))
    nc = -(-T // Q)
    pad = nc * Q - T
    dt = dt.to(dtype)
    a = dt * A.to(dtype)  # (b, T, H) log decay per step, <= 0
    xdt = x.to(dtype) * dt.unsqueeze(-1)  # (b, T, H, P)
    if pad:  # padded steps decay by exp(0) = 1 and add nothing: the final state is unchanged
        a = F.pad(a, (0, 0, 0, pad))
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    # head-major chunked layouts: heads (b, G, r, nc, Q, .), groups (b, G, 1, nc, Q, .)
    acs = a.view(b, nc, Q, G, r).permute(0, 3, 4, 1, 2).cumsum(-1)  # (b, G, r, nc, Q)
    xc = xdt.view(b, nc, Q, G, r, P).permute(0, 3, 4, 1, 2, 5)  # (b, G, r, nc, Q, P)
    Bc = B.to(dtype).view(b, nc, Q, G, N).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b,G,1,nc,Q,N)
    Cc = C.to(dtype).view(b, nc, Q, G, N).permute(0, 3, 1, 2, 4).unsqueeze(2)

    # 1. within each chunk: y = ((C B^T) * L) (x dt), L[l, s] = exp(acs_l - acs_s) for s <= l
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (acs.unsqueeze(-1) - acs.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = (Cc @ Bc.transpose(-1, -2)) * seg.exp()  # (b, G, r, nc, Q, Q)
    y = scores @ xc  # (b, G, r, nc, Q, P)

    # 2. each chunk's own contribution to the state at its end: sum_s exp(acs_end - acs_s) ...
    to_end = (acs[..., -1:] - acs).exp()  # (b, G, r, nc, Q)
    states = (xc * to_end.unsqueeze(-1)).transpose(-1, -2) @ Bc  # (b, G, r, nc, P, N)

    # 3. pass states between chunks: start[c] = sum_{j <= c} exp(cs_c - cs_j) own[j]
    if initial_state is None:
        first = states.new_zeros(b, G, r, 1, P, N)
    else:
        first = initial_state.to(dtype).reshape(b, G, r, 1, P, N)
    own = torch.cat([first, states], dim=3).flatten(-2)  # (b, G, r, nc + 1, P N)
    cs = F.pad(acs[..., -1], (1, 0)).cumsum(-1)  # (b, G, r, nc + 1)
    inter = torch.ones(nc + 1, nc + 1, dtype=torch.bool, device=x.device).tril()
    decay = (cs.unsqueeze(-1) - cs.unsqueeze(-2)).masked_fill(~inter, float("-inf")).exp()
    passed = (decay @ own).view(b, G, r, nc + 1, P, N)
    start, final = passed[:, :, :, :-1], passed[:, :, :, -1]  # (b,G,r,nc,P,N), (b,G,r,P,N)

    # 4. the carried state's output inside each chunk: exp(acs_l) C_l S_start
    y = y + (Cc @ start.transpose(-1, -2)) * acs.exp().unsqueeze(-1)  # (b, G, r, nc, Q, P)
    y = y.reshape(b, H, nc * Q, P)[:, :, :T].transpose(1, 2)  # (b, T, H, P)
    return y, final.reshape(b, H, P, N)


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One token: state (b, H, P, N), x (b, H, P), dt (b, H) (after softplus), A (H,),
    B, C (b, G, N) -> y (b, H, P) without D, the new state."""
    H, G = x.shape[1], B.shape[1]
    dtype = _compute_dtype(state)
    dt = dt.to(dtype)
    Bh = B.to(dtype).repeat_interleave(H // G, dim=1)  # (b, H, N)
    Ch = C.to(dtype).repeat_interleave(H // G, dim=1)
    decay = (dt * A.to(dtype)).exp()[..., None, None]  # (b, H, 1, 1)
    state = state.to(dtype) * decay + (x.to(dtype) * dt.unsqueeze(-1)).unsqueeze(-1) * Bh.unsqueeze(
        -2
    )
    y = (state @ Ch.unsqueeze(-1)).squeeze(-1)  # (b, H, P)
    return y, state


def ssd_sequential(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the reference for tests); same contract as ssd_chunked."""
    b, T, H, P = x.shape
    N = B.shape[3]
    state = (
        x.new_zeros(b, H, P, N, dtype=_compute_dtype(x)) if initial_state is None else initial_state
    )
    ys = []
    for t in range(T):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state

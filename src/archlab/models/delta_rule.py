"""The gated delta rule (Yang, Kautz & Hatamizadeh 2024): chunked training form, recurrence.

Per head, with a state S (dk, dv), unit-norm keys k_t, values v_t, a log-decay g_t <= 0 and
a write strength beta_t:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

(the transposed layout of the paper's S_t = S_{t-1} exp(g_t) (I - beta k k^T) + beta v k^T,
as in flash-linear-attention and transformers). ``recurrent_gated_delta_rule`` runs it step by
step (the reference, and decoding); ``chunk_gated_delta_rule`` is the training form: within a
chunk of C tokens the C rank-one updates collapse into one triangular solve (the WY / UT
representation: (I + L) [U, W] = [beta v, beta exp(gamma) k] with
L_ij = beta_i exp(gamma_i - gamma_j) k_i . k_j for j < i, gamma the in-chunk cumulative log
decay), so the work is batched matmuls; the state is carried from chunk to chunk:

    V' = U - W S,    O = (Q exp(gamma)) S + (Q K^T * decay, causal) V',
    S  = exp(gamma_C) S + (K exp(gamma_C - gamma))^T V'.

All functions take (B, H, T, .) tensors, q already scaled (1 / sqrt(dk)), and compute in the
inputs' dtype (callers promote half precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_delta_step(
    S: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor]:
    """One token: S (B, H, dk, dv), q, k (B, H, dk), v (B, H, dv), g, beta (B, H) -> o, S."""
    S = S * g.exp()[..., None, None]
    kv = (k.unsqueeze(-2) @ S).squeeze(-2)  # (B, H, dv): what S already recalls for k
    delta = beta.unsqueeze(-1) * (v - kv)  # (B, H, dv)
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)  # rank-one write of the correction
    o = (q.unsqueeze(-2) @ S).squeeze(-2)  # (B, H, dv)
    return o, S


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token by token: q, k (B, H, T, dk), v (B, H, T, dv), g, beta (B, H, T) -> o, final S."""
    B, H, T, dk = k.shape
    S = initial_state if initial_state is not None else v.new_zeros(B, H, dk, v.shape[-1])
    outs = []
    for t in range(T):
        o, S = gated_delta_step(S, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t])
        outs.append(o)
    return torch.stack(outs, dim=2), S


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked form (see the module docstring); same arguments and results as the recurrence.

    A ragged last chunk is padded with g = 0, beta = 0, k = 0 steps, which leave S unchanged.
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = max(1, min(chunk_size, T))
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // C
    BH = B * H
    q, k = q.reshape(BH, n, C, dk), k.reshape(BH, n, C, dk)
    v = v.reshape(BH, n, C, dv)
    g, beta = g.reshape(BH, n, C), beta.reshape(BH, n, C)

    gamma = g.cumsum(-1)  # (BH, n, C): log decay from the chunk's start to each position
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(gamma_i - gamma_j) for j <= i; the masked entries are exp(-inf) = 0
    # (masking before the exp: gamma_i - gamma_j > 0 above the diagonal could overflow)
    decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    system = (k_beta @ k.transpose(-1, -2)) * decay  # (BH, n, C, C); the diagonal is unused
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * gamma.exp().unsqueeze(-1)], dim=-1)
    uw = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = uw.split([dv, dk], dim=-1)  # (BH, n, C, dv), (BH, n, C, dk)
    attn = (q @ k.transpose(-1, -2)) * decay  # (BH, n, C, C) causal, with the diagonal
    # the reads of the carried state, [Q exp(gamma); W], in one matmul per chunk
    reads = torch.cat([q * gamma.exp().unsqueeze(-1), w], dim=-2)  # (BH, n, 2C, dk)
    k_end = (k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)).transpose(-1, -2)  # (.., dk, C)
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # (BH, n, 1, 1)

    S = (
        initial_state.reshape(BH, dk, dv).to(v.dtype)
        if initial_state is not None
        else v.new_zeros(BH, dk, dv)
    )
    outs = []
    for i in range(n):
        r = reads[:, i] @ S  # (BH, 2C, dv)
        v_new = u[:, i] - r[:, C:]  # what the chunk writes beyond what S already recalls
        outs.append(torch.baddbmm(r[:, :C], attn[:, i], v_new))
        S = torch.baddbmm(S * chunk_decay[:, i], k_end[:, i], v_new)
    o = torch.stack(outs, dim=1).reshape(B, H, n * C, dv)[:, :, :T]
    return o, S.reshape(B, H, dk, dv)

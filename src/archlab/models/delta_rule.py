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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_BASE = 8  # diagonal blocks of this size are inverted by forward substitution
# fla's l2norm of q and k before the rule: x / sqrt(sum x^2 + eps) (gdn.l2norm; the fused
# decode step reads it from here: kernels import no block module, which imports them)
L2_EPS = 1e-6


def _diag_blocks(M: Tensor, s: int) -> Tensor:
    """The diagonal (s, s) blocks of M (..., P, P) as (..., P / s, s, s)."""
    P = M.shape[-1]
    nb = P // s
    blocks = M.reshape(*M.shape[:-2], nb, s, nb, s).diagonal(dim1=-4, dim2=-2)
    return blocks.movedim(-1, -3)  # (..., nb, s, s)


def _unit_lower_inverse(L: Tensor) -> Tensor:
    """(I + L)^-1 for strictly lower triangular L (..., C, C), without autograd.

    All diagonal blocks of ``_BASE`` at once by forward substitution, then doubling the block
    size, [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]], for every pair at once: a
    few dozen batched ops whatever C. (torch's batched ``solve_triangular`` loops over the
    batch on CPU and was half of a training step.) C is padded to _BASE 2^m with zeros."""
    C = L.shape[-1]
    s = min(_BASE, C)
    P = s * 2 ** max(0, math.ceil(math.log2(C / s)))
    if P != C:
        L = F.pad(L, (0, P - C, 0, P - C))
    Lb = _diag_blocks(L, s)  # (..., P / s, s, s)
    X = torch.eye(s, dtype=L.dtype, device=L.device).expand_as(Lb).clone()
    for i in range(1, s):  # row i of X = e_i - sum_{j < i} L_ij X_j
        X[..., i, :i] -= (Lb[..., i : i + 1, :i] @ X[..., :i, :i]).squeeze(-2)
    while s < P:
        pairs = _diag_blocks(L, 2 * s)  # (..., nb, 2s, 2s)
        A, D = X[..., 0::2, :, :], X[..., 1::2, :, :]
        Y = torch.zeros_like(pairs)
        Y[..., :s, :s], Y[..., s:, s:] = A, D
        Y[..., s:, :s] = -(D @ pairs[..., s:, :s] @ A)
        X, s = Y, 2 * s
    X = X.reshape(*L.shape[:-2], P, P) if X.shape[-3] == 1 else X
    return X[..., :C, :C]


class UnitLowerInverse(torch.autograd.Function):
    """(I + L)^-1 of a strictly lower triangular L; gradient -(X^T G X^T), strictly lower."""

    @staticmethod
    def forward(ctx, L: Tensor) -> Tensor:  # type: ignore[override]
        X = _unit_lower_inverse(L)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (X,) = ctx.saved_tensors
        Xt = X.transpose(-1, -2)
        return -(Xt @ grad @ Xt).tril(-1)


class ChunkScan(torch.autograd.Function):
    """The sequential part of the chunked form, chunk after chunk, with a hand-written reverse
    loop. Inputs are chunk-major (n, BH, ...) so that each chunk is one contiguous block; per
    chunk i, with the reads R_i = [Q_i exp(gamma); W_i] (2C, dk):

        r = R_i S_i;  V'_i = U_i - r[C:];  O_i = r[:C] + A_i V'_i;  S_{i+1} = c_i S_i + K_i V'_i

    Only the states S_i and V' are kept; the gradients of R, A, K and c are batched matmuls
    after the loop, so each step costs three bmm both ways (autograd's graph through the loop
    cost ~20 nodes per chunk, and a full-size zero tensor per chunk for each indexing)."""

    @staticmethod
    def forward(ctx, reads, u, attn, k_end, chunk_decay, S0):  # type: ignore[override]
        n, C = u.shape[0], u.shape[2]
        S, states, v_new, outs = S0, [S0], [], []
        for i in range(n):
            r = torch.bmm(reads[i], S)  # (BH, 2C, dv)
            vn = u[i] - r[:, C:]
            outs.append(r[:, :C] + torch.bmm(attn[i], vn))
            S = S * chunk_decay[i] + torch.bmm(k_end[i], vn)
            v_new.append(vn)
            states.append(S)
        S_all, V = torch.stack(states), torch.stack(v_new)  # (n + 1, BH, dk, dv), (n, BH, C, dv)
        ctx.save_for_backward(reads, attn, k_end, chunk_decay, S_all, V)
        return torch.stack(outs), S

    @staticmethod
    def backward(ctx, d_o, d_last):  # type: ignore[override]
        reads, attn, k_end, chunk_decay, S_all, V = ctx.saved_tensors
        n, C = V.shape[0], V.shape[2]
        d_o = d_o.contiguous() if d_o is not None else torch.zeros_like(V)
        dS = d_last if d_last is not None else torch.zeros_like(S_all[0])
        attn_t, k_end_t = attn.transpose(-1, -2), k_end.transpose(-1, -2)
        q_t, w_t = reads[:, :, :C].transpose(-1, -2), reads[:, :, C:].transpose(-1, -2)
        dS_next, dV = [], []
        for i in reversed(range(n)):
            dS_next.append(dS)
            dvn = torch.bmm(attn_t[i], d_o[i]) + torch.bmm(k_end_t[i], dS)
            dS = dS * chunk_decay[i] + torch.bmm(q_t[i], d_o[i]) - torch.bmm(w_t[i], dvn)
            dV.append(dvn)
        dS_n, dV_all = torch.stack(dS_next[::-1]), torch.stack(dV[::-1])
        Vt, St = V.transpose(-1, -2), S_all[:n].transpose(-1, -2)
        d_reads = torch.cat([d_o, -dV_all], dim=-2) @ St
        d_decay = (dS_n * S_all[:n]).sum((-1, -2), keepdim=True)
        return d_reads, dV_all, d_o @ Vt, dS_n @ Vt, d_decay, dS


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
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    L = (k_beta @ k.transpose(-1, -2)) * decay.masked_fill(~strict, 0.0)  # (BH, n, C, C)
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * gamma.exp().unsqueeze(-1)], dim=-1)
    uw = UnitLowerInverse.apply(L) @ rhs  # (I + L)^-1 [beta V, beta exp(gamma) K]
    u, w = uw.split([dv, dk], dim=-1)  # (BH, n, C, dv), (BH, n, C, dk)
    attn = (q @ k.transpose(-1, -2)) * decay  # (BH, n, C, C) causal, with the diagonal
    # the reads of the carried state, [Q exp(gamma); W], in one matmul per chunk
    reads = torch.cat([q * gamma.exp().unsqueeze(-1), w], dim=-2)  # (BH, n, 2C, dk)
    k_end = (k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)).transpose(-1, -2)  # (.., dk, C)

    S0 = (
        initial_state.reshape(BH, dk, dv).to(v.dtype)
        if initial_state is not None
        else v.new_zeros(BH, dk, dv)
    )
    chunk_major = (t.transpose(0, 1).contiguous() for t in (reads, u, attn, k_end))
    decay_end = gamma[..., -1].exp().transpose(0, 1)[..., None, None]  # (n, BH, 1, 1)
    o, S = ChunkScan.apply(*chunk_major, decay_end, S0)  # o: (n, BH, C, dv)
    o = o.transpose(0, 1).reshape(B, H, n * C, dv)[:, :, :T]
    return o, S.reshape(B, H, dk, dv)

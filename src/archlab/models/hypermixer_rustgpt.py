"""The seed's RustGPT HyperMixer block, with its parameter layout kept and made causal.

Block (post-norm, like the seed's Transformer block): h = LN(x + TokenMix(x)); y = LN(h + FFN(h)).

TokenMix (seed): a hypernetwork d -> hidden -> P (ReLU, biases) maps the mean of the sequence
to the P = L*m + m + m*L + L parameters of a token-mixing MLP over the L = max_seq_len positions
(with d=128, hidden 32, L=80, m=64: P = 5120 + 64 + 5120 + 80 = 10,384), laid out as

    W1 (L x m) | b1 (m) | W2 (m x L) | b2 (L)

and applies it along the sequence axis, independently for every channel j:
out[:, j] = W2^T ReLU(W1^T x[:, j] + b1) + b2.

The seed pools and mixes the whole sequence, so position t reads the future.  Here position t
pools only the prefix, p_t = mean_{i<=t} x_i, generates its own parameters theta_t = hyper(p_t),
treats positions after t as zero inputs and keeps only its own output row:

    hidden_t = ReLU(sum_{i<=t} W1_t[i] x_i^T + b1_t)        (m x d)
    out_t    = W2_t[:, t]^T hidden_t + b2_t[t]              (d)

At t = L-1 with a full-length sequence this is exactly the seed's output at that position.
Cost is O(T^2 m d) (one mixing MLP per position), fine at T <= 80, and fully vectorised over
t.  Each position computes only the part of theta_t it uses (W1 rows of existing positions,
b1, its own column of W2, its own entry of b2): the same values, about half the work.  Decode state: {"x": (B, S, d)}, the block inputs seen so far; a new token recomputes only
its own row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rustgpt import FeedForward

if TYPE_CHECKING:
    from ..config import ModelConfig


class CausalSequenceHyperMixer(nn.Module):
    """Prefix-pooled hypernetwork generating a per-position token-mixing MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.length = L = cfg.max_seq_len
        self.mixing_dim = m = cfg.resolved_mixing_dim
        self.num_generated = L * m + m + m * L + L
        self.fc = nn.Linear(cfg.d_model, cfg.resolved_hyper_hidden)
        self.proj = nn.Linear(cfg.resolved_hyper_hidden, self.num_generated)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> Tensor:
        """x: (B, T, D) new inputs at positions pos..pos+T-1 -> their outputs (B, T, D)."""
        B, T, D = x.shape
        if state is not None:
            if "x" in state:
                x = torch.cat([state["x"], x], dim=1)
            state["x"] = x
        N = x.shape[1]  # prefix length including the new tokens
        if N > self.length:
            raise ValueError(f"RustGPT HyperMixer handles at most {self.length} positions, got {N}")
        start = N - T  # the queries are the last T positions
        q_pos = torch.arange(start, N, device=x.device)  # (T,)

        # pooled prefix means of the query positions: (B, T, D)
        pooled = x.cumsum(dim=1)[:, start:] / (q_pos + 1).to(x.dtype)[:, None]
        h = F.relu(self.fc(pooled))  # (B, T, H)

        # Generate only what each query uses (same values as the full 10,384-vector): the rows
        # of W1 for existing positions, b1, its own column of W2 and its own entry of b2.
        L, m = self.length, self.mixing_dim
        weight, bias = self.proj.weight, self.proj.bias  # (P, H), (P,)
        o_b1, o_w2, o_b2 = L * m, L * m + m, L * m + m + m * L
        # W1 rows for positions < N, reordered to (k, n) so the mixing is a plain batched matmul
        w1_weight = weight[: L * m].view(L, m, -1)[:N].transpose(0, 1).reshape(m * N, -1)
        w1_bias = bias[: L * m].view(L, m)[:N].t().reshape(m * N)
        w1 = F.linear(h, w1_weight, w1_bias).view(B, T, m, N)  # (B, T, m, N): W1_t^T
        b1 = F.linear(h, weight[o_b1:o_w2], bias[o_b1:o_w2])  # (B, T, m)
        w2_rows = o_w2 + torch.arange(m, device=x.device)[None, :] * L + q_pos[:, None]  # (T, m)
        w2_own = torch.einsum("bth,tkh->btk", h, weight[w2_rows]) + bias[w2_rows]  # (B, T, m)
        b2_rows = o_b2 + q_pos  # (T,)
        b2_own = (h * weight[b2_rows]).sum(-1, keepdim=True) + bias[b2_rows, None]  # (B, T, 1)

        # positions after each query are treated as zero inputs
        visible = torch.arange(N, device=x.device)[None, :] <= q_pos[:, None]  # (T, N)
        w1 = w1 * visible[None, :, None, :].to(w1.dtype)
        hidden = torch.matmul(w1.view(B, T * m, N), x).view(B, T, m, D) + b1.unsqueeze(-1)
        out = torch.matmul(w2_own.unsqueeze(-2), F.relu(hidden)).squeeze(-2)  # (B, T, D)
        return out + b2_own


class RustGPTHyperMixerBlock(nn.Module):
    display_name = "HyperMixerBlock"  # the seed's name in the summary's layer stack

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.mixer = CausalSequenceHyperMixer(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        h = self.norm1(x + self.mixer(x, state, pos))
        return self.norm2(h + self.ffn(h)), {}

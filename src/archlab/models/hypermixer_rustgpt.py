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
t.  Decode state: {"x": (B, S, d)}, the block inputs seen so far; a new token recomputes only
its own row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .rustgpt import FeedForward


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
        theta = self.proj(F.relu(self.fc(pooled)))  # (B, T, P)

        L, m = self.length, self.mixing_dim
        w1, b1, w2, b2 = theta.split([L * m, m, m * L, L], dim=-1)
        w1 = w1.view(B, T, L, m)[:, :, :N]  # (B, T, N, m) rows for the positions that exist
        w2 = w2.view(B, T, m, L)
        # each query keeps only its own output column of W2 and entry of b2
        idx = q_pos.view(1, T, 1, 1).expand(B, T, m, 1)
        w2_own = w2.gather(-1, idx).squeeze(-1)  # (B, T, m)
        b2_own = b2.gather(-1, q_pos.view(1, T, 1).expand(B, T, 1))  # (B, T, 1)

        # positions after each query are treated as zero inputs
        visible = torch.arange(N, device=x.device)[None, :] <= q_pos[:, None]  # (T, N)
        w1 = w1 * visible[None, :, :, None].to(w1.dtype)
        hidden = torch.einsum("btnk,bnd->btkd", w1, x) + b1.unsqueeze(-1)  # (B, T, m, D)
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

"""The seed's RustGPT Transformer block: post-norm, single head, no output projection.

h = LN(x + Attn(x)); y = LN(h + FFN(h)), with Attn using W_q, W_k, W_v only (no bias) and a
ReLU feed-forward with biases.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import ModelConfig


class RustGPTAttention(nn.Module):
    """Single-head causal attention with no output projection. State: {"k", "v"}: (B, S, D)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.w_q = nn.Linear(d, d, bias=False)
        self.w_k = nn.Linear(d, d, bias=False)
        self.w_v = nn.Linear(d, d, bias=False)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> Tensor:
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)  # (B, T, D)
        past = 0
        if state is not None:
            if "k" in state:
                past = state["k"].shape[1]
                k = torch.cat([state["k"], k], dim=1)
                v = torch.cat([state["v"], v], dim=1)
            state["k"], state["v"] = k, v
        T, S = q.shape[1], k.shape[1]
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


class FeedForward(nn.Module):
    """RustGPT feed-forward: Linear(d, h) -> ReLU -> Linear(h, d), both with biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)))


class RustGPTBlock(nn.Module):
    display_name = "TransformerBlock"  # the seed's name in the layer stack

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.mixer = RustGPTAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        h = self.norm1(x + self.mixer(x, state, pos))
        return self.norm2(h + self.ffn(h)), {}

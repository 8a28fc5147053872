"""Causal multi-head self-attention through SDPA, optional sliding window, KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import RMSNorm, RotaryEmbedding

if TYPE_CHECKING:
    from ..config import ModelConfig


def causal_mask(
    q_start: int, t_q: int, k_start: int, t_k: int, window: int | None, device: torch.device
) -> Tensor:
    """Boolean (t_q, t_k) mask, True where query position may attend to key position."""
    qpos = torch.arange(q_start, q_start + t_q, device=device)[:, None]
    kpos = torch.arange(k_start, k_start + t_k, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= (qpos - kpos) < window
    return allowed


def kv_cache_elements(cfg: ModelConfig, seq_len: int, window: int | None = None) -> int:
    """Elements one attention layer's decode cache holds after ``seq_len`` tokens (B = 1):
    keys and values of every kept position, 2 x min(T, window) x d_model."""
    kept = seq_len if window is None else min(seq_len, window)
    return 2 * kept * cfg.d_model


KV_GROWTH = 1.5  # capacity factor when a decode cache's buffer is full


def append_kv(cache: Tensor | None, new: Tensor) -> Tensor:
    """cache (B, H, S, hd) followed by new (B, H, T, hd) along the positions, as a prefix view
    of a (B, H, capacity, hd) buffer with room to spare: the next append writes into that room
    instead of copying the whole cache (torch.cat per token made decoding at context 4096
    spend most of each step copying keys and values). A full buffer is replaced by one
    KV_GROWTH times larger. The view is all the cache holds (its size counts only the positions
    seen); the room is found from its strides and storage (inference tensors keep no ``_base``).
    A cache that is not such a view, or one autograd records, is concatenated as before."""
    B, H, T, hd = new.shape
    recorded = torch.is_grad_enabled() and (
        new.requires_grad or (cache is not None and cache.requires_grad)
    )
    if recorded:
        return new if cache is None else torch.cat([cache, new], dim=2)
    S = 0
    if cache is not None:
        S = cache.shape[2]
        cap = cache.untyped_storage().nbytes() // max(1, B * H * hd * cache.element_size())
        if (
            cache.shape == (B, H, S, hd)
            and cache.dtype == new.dtype
            and cache.device == new.device
            and cache.storage_offset() == 0
            and cap >= S + T
            and cache.stride() == (H * cap * hd, cap * hd, hd, 1)
        ):  # a prefix view of a (B, H, cap, hd) buffer: write into its room
            grown = cache.as_strided((B, H, S + T, hd), cache.stride())
            grown[:, :, S:] = new
            return grown
    buf = new.new_empty(B, H, max(int((S + T) * KV_GROWTH), S + T + 16), hd)
    if S:
        buf[:, :, :S] = cache
    buf[:, :, S : S + T] = new
    return buf[:, :, : S + T]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention.

    ``window`` limits each query to the last ``window`` positions including itself
    (sliding-window attention); the decode cache then keeps only that many keys.
    ``qk_norm``: RMSNorm over the whole projected q and over k before the heads are split
    (OLMo 2 / OLMo-hybrid's attention). State (decode cache): {"k": (B, H, S, hd), "v": ...}.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        window: int | None = None,
        use_rope: bool | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.window = window
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_scale = True  # type: ignore[attr-defined]
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        rope = cfg.use_rope if use_rope is None else use_rope
        self.rope = RotaryEmbedding(self.head_dim) if rope else None
        self.q_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if qk_norm else None

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, H, T, hd)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(pos, T, x.device)
            q = RotaryEmbedding.apply(q, cos, sin)
            k = RotaryEmbedding.apply(k, cos, sin)
        k_start = pos
        if state is not None:
            if "k" in state:
                k_start = pos - state["k"].shape[2]
            if self.window is None:  # grows in place (amortised), no copy per token
                k, v = append_kv(state.get("k"), k), append_kv(state.get("v"), v)
            elif "k" in state:  # bounded by the window: concatenate and keep its last positions
                k = torch.cat([state["k"], k], dim=2)
                v = torch.cat([state["v"], v], dim=2)
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window)
            state["k"], state["v"] = k[:, :, -keep:], v[:, :, -keep:]
        drop = self.dropout if self.training else 0.0
        t_k = k.shape[2]
        if k_start == pos and self.window is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=T > 1)
        elif T == 1 and (self.window is None or t_k <= self.window):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            mask = causal_mask(pos, T, k_start, t_k, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.proj(y))

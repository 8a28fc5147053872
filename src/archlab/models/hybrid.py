"""Hybrid (Samba layout, Ren et al. 2024): Mamba layers alternating with sliding-window attention.

Every layer is a pre-norm pair ``x + Mixer(N(x)); x + MLP(N(x))``. Even layers mix tokens with
the selective SSM (recurrent, unbounded memory), odd layers with causal attention over the last
``local_window`` positions (RoPE on queries and keys; precise recall of recent tokens). Decoding
state: the Mamba layers keep {"conv", "ssm"}; the attention layers keep at most ``local_window``
keys and values, so memory stays constant however long the generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .attention import CausalSelfAttention, causal_mask, kv_cache_elements
from .layers import RotaryEmbedding, make_mlp, make_norm
from .mamba import SPEC as MAMBA_SPEC
from .mamba import SSM_FIELDS, SSM_FLAGS, MambaMixer, check_ssm
from .spec import (
    ATTENTION_FIELDS,
    MLP_FLAGS,
    ArchitectureSpec,
    SummaryField,
    check_attention_heads,
)

if TYPE_CHECKING:
    from ..config import ModelConfig


class HybridMambaBlock(nn.Module):
    """x + Mamba(N(x)); x + MLP(N(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = MambaMixer(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm2 = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        if state is not None and x.shape[1] == 1:  # a decode token on CPU: one kernel call
            from .kernels.decode_cpu import mamba_block_step

            out = mamba_block_step(self, x, state)
            if out is not None:
                return out, {}
        x = x + self.drop(self.mixer(self.norm1(x), state))
        x = x + self.ffn(self.norm2(x))
        return x, {}


class BlockedWindowAttention(CausalSelfAttention):
    """Sliding-window attention whose training / full-sequence pass runs in query blocks of
    ``window`` positions, each against only the keys it can see (at most 2 window - 1).

    The same function as :class:`CausalSelfAttention` with ``window`` (whose full pass hands
    SDPA a (T, T) mask: O(T^2) time, and the mask plus its float copy saved for the backward,
    ~80 MiB per layer at T = 4096); this one costs O(T window) and keeps only (window, 2 window)
    masks. Decoding (``state``) and short sequences take the parent's path unchanged."""

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> Tensor:
        B, T, D = x.shape
        W = self.window
        if state is not None or W is None or T <= 2 * W:
            return super().forward(x, state, pos)
        q, k, v = (
            t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
            for t in self.qkv(x).split(D, dim=-1)
        )
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(pos, T, x.device)
            q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        ys = []
        for s in range(0, T, W):
            e, ks = min(s + W, T), max(0, s - W + 1)
            mask = causal_mask(s, e - s, ks, e - ks, W, x.device)  # (e - s, e - ks)
            ys.append(
                F.scaled_dot_product_attention(
                    q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], attn_mask=mask, dropout_p=drop
                )
            )
        y = torch.cat(ys, dim=2).transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.proj(y))


class HybridAttentionBlock(nn.Module):
    """x + SlidingWindowAttention(N(x)); x + MLP(N(x)), RoPE on the attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 1) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = BlockedWindowAttention(cfg, window=cfg.local_window, use_rope=True)
        self.norm2 = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        x = x + self.mixer(self.norm1(x), state, pos)
        x = x + self.ffn(self.norm2(x))
        return x, {}


def is_mamba_layer(layer_idx: int) -> bool:
    """The layout: Mamba on even layers, sliding-window attention on odd ones."""
    return layer_idx % 2 == 0


def hybrid_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx`` of the hybrid stack (see ``is_mamba_layer``)."""
    if is_mamba_layer(layer_idx):
        return HybridMambaBlock(cfg, layer_idx)
    if (cfg.d_model // cfg.n_heads) % 2:
        raise ConfigError(
            f"--n-heads: the hybrid's attention uses RoPE, which needs an even head dimension "
            f"(d_model {cfg.d_model} / n_heads {cfg.n_heads} = {cfg.d_model // cfg.n_heads})"
        )
    return HybridAttentionBlock(cfg, layer_idx)


def _state_elements(cfg: ModelConfig, layer_idx: int, seq_len: int) -> int:
    """Mamba's SSM state on Mamba layers; at most ``local_window`` keys and values on the
    attention layers, however long the sequence."""
    if is_mamba_layer(layer_idx):
        assert MAMBA_SPEC.state_elements is not None
        return MAMBA_SPEC.state_elements(cfg, layer_idx, seq_len)
    return kv_cache_elements(cfg, seq_len, window=cfg.local_window)


def _validate(cfg: ModelConfig) -> None:
    check_attention_heads(cfg, always_rope=True)  # the attention layers always use RoPE
    check_ssm(cfg)
    if cfg.local_window < 1:
        raise ConfigError(f"--hybrid-local-window: must be >= 1 (got {cfg.local_window})")


def _fit_seq_len(
    cfg: ModelConfig, seq_len: int, explicit: frozenset[str]
) -> tuple[dict[str, int], str | None]:
    """A window that is a window: the default is at most half the training length (Samba
    trains at 4096 with 2048); an explicit one that covers the sequence gets a warning."""
    if "local_window" not in explicit and cfg.local_window > seq_len // 2:
        return {"local_window": max(1, seq_len // 2)}, None
    if cfg.local_window >= seq_len:
        return {}, (
            f"warning: --hybrid-local-window {cfg.local_window} >= the training sequence length "
            f"{seq_len}: the hybrid's sliding-window layers are full causal attention"
        )
    return {}, None


SPEC = ArchitectureSpec(
    name="hybrid",
    display_name="Hybrid (Mamba + Sliding-Window Attention)",
    block=hybrid_block,
    fields=("n_heads", *MLP_FLAGS, *SSM_FLAGS, "local_window"),
    norm="rmsnorm",  # as in Samba
    learned_positions=False,  # Mamba layers carry order; attention layers always use RoPE
    positions=lambda c: "rope (attention layers) + recurrent (Mamba layers)",
    # an even number of layers: as many Mamba as attention layers
    # and a window of half the context (Samba: 2048 of 4096); see _fit_seq_len
    size_override=lambda base: dict(
        n_layers=base["n_layers"] + base["n_layers"] % 2, local_window=base["max_seq_len"] // 2
    ),
    layer_multiple=2,
    summary_fields=(
        *ATTENTION_FIELDS,
        *SSM_FIELDS,
        SummaryField("local_window", "Local Attention Window", lambda c: c.local_window),
    ),
    validate=_validate,
    state_elements=_state_elements,
    linear_in_length=True,  # Mamba is O(T), the windowed attention O(T x window)
    fit_seq_len=_fit_seq_len,
)

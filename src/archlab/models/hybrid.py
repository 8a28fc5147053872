"""Hybrid (Samba layout, Ren et al. 2024): Mamba layers alternating with sliding-window attention.

Every layer is a pre-norm pair ``x + Mixer(N(x)); x + MLP(N(x))``. Even layers mix tokens with
the selective SSM (recurrent, unbounded memory), odd layers with causal attention over the last
``local_window`` positions (RoPE on queries and keys; precise recall of recent tokens). Decoding
state: the Mamba layers keep {"conv", "ssm"}; the attention layers keep at most ``local_window``
keys and values, so memory stays constant however long the generation.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ConfigError, ModelConfig
from .attention import CausalSelfAttention, kv_cache_elements
from .layers import make_mlp, make_norm
from .mamba import SPEC as MAMBA_SPEC
from .mamba import SSM_FIELDS, SSM_FLAGS, MambaMixer, check_ssm
from .spec import (
    ATTENTION_FIELDS,
    MLP_FLAGS,
    ArchitectureSpec,
    SummaryField,
    check_attention_heads,
)


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
        x = x + self.drop(self.mixer(self.norm1(x), state))
        x = x + self.ffn(self.norm2(x))
        return x, {}


class HybridAttentionBlock(nn.Module):
    """x + SlidingWindowAttention(N(x)); x + MLP(N(x)), RoPE on the attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 1) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = CausalSelfAttention(cfg, window=cfg.local_window, use_rope=True)
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


SPEC = ArchitectureSpec(
    name="hybrid",
    display_name="Hybrid (Mamba + Sliding-Window Attention)",
    block=hybrid_block,
    fields=("n_heads", *MLP_FLAGS, *SSM_FLAGS, "local_window"),
    norm="rmsnorm",  # as in Samba
    learned_positions=False,  # Mamba layers carry order; attention layers always use RoPE
    positions=lambda c: "rope (attention layers) + recurrent (Mamba layers)",
    # an even number of layers: as many Mamba as attention layers
    size_override=lambda base: dict(n_layers=base["n_layers"] + base["n_layers"] % 2),
    summary_fields=(
        *ATTENTION_FIELDS,
        *SSM_FIELDS,
        SummaryField("local_window", "Local Attention Window", lambda c: c.local_window),
    ),
    validate=_validate,
    state_elements=_state_elements,
    linear_in_length=True,  # Mamba is O(T), the windowed attention O(T x window)
)

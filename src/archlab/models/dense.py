"""Dense Transformer block (pre-norm): x + Attn(N(x)); x + MLP(N(x))."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from .attention import CausalSelfAttention, kv_cache_elements
from .layers import make_mlp, make_norm
from .rustgpt import RustGPTBlock
from .spec import ATTENTION_FIELDS, MLP_FLAGS, ArchitectureSpec, check_attention_heads

if TYPE_CHECKING:
    from ..config import ModelConfig


class DenseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        x = x + self.mixer(self.norm1(x), state, pos)
        x = x + self.ffn(self.norm2(x))
        return x, {}


SPEC = ArchitectureSpec(
    name="dense",
    aliases=("transformer",),
    display_name="Transformer",
    block=DenseBlock,
    fields=("n_heads", *MLP_FLAGS),
    summary_fields=ATTENTION_FIELDS,
    validate=check_attention_heads,
    rustgpt_block=RustGPTBlock,
    state_elements=lambda c, i, seq_len: kv_cache_elements(c, seq_len),
)

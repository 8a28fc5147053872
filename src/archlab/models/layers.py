"""Shared layers: normalisation, rotary position embedding, feed-forward MLP / SwiGLU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import ModelConfig


def swiglu_width(gelu_width: int, multiple_of: int = 8) -> int:
    """SwiGLU hidden width with the parameters of a GELU MLP of ``gelu_width`` (Llama's rule).

    A GELU MLP has 2 d f weights, SwiGLU 3 d h (gate, up, down): h = 2 f / 3, rounded up to a
    multiple of ``multiple_of`` as Llama's ``FeedForward`` does (f = 4 d gives Llama's 8 d / 3).
    """
    hidden = int(2 * gelu_width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019); computed in at least float32 for
    stability (half precision is upcast; float64 stays float64)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), w, self.eps).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.uses_rmsnorm:
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021), rotate-half layout as in GPT-NeoX / Llama."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: tuple[Tensor, Tensor] | None = None  # cos, sin for positions [0, n)

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin (length, hd) for positions [start, start + length), from a cached table
        (decoding asks for one position per token: recomputing it each time costs more than
        the attention at small sizes)."""
        end = start + length
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].device != torch.device(device):
            n = max(end, 2 * table[0].shape[0] if table is not None else 256)
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # (n, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
            table = self._table = (emb.cos(), emb.sin())
        return table[0][start:end], table[1][start:end]

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, H, T, hd); cos/sin: (T, hd)."""
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated.float() * sin).type_as(x)


class MLP(nn.Module):
    """Position-wise feed-forward: d -> d_ff -> d with GELU (tanh approximation)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.proj.residual_scale = True  # type: ignore[attr-defined]
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))

    def infer(self, x: Tensor) -> Tensor:
        """forward in eval mode without the submodule calls, whose overhead is half the time
        of one decoding token's (1, d) row (MoE decoding runs k of these per token)."""
        h = F.gelu(F.linear(x, self.fc.weight, self.fc.bias), approximate="tanh")
        return F.linear(h, self.proj.weight, self.proj.bias)


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020; Llama, Mixtral): down(silu(gate(x)) * up(x)).

    ``fc`` holds gate and up stacked, gate rows first (d -> 2h, one matmul): the layout of
    transformers' fused ``gate_up_proj``; Llama's gate_proj / up_proj are its two halves.
    """

    def __init__(self, d_model: int, hidden: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.proj.residual_scale = True  # type: ignore[attr-defined]
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)  # (..., h) each
        return self.drop(self.proj(F.silu(gate) * up))

    def infer(self, x: Tensor) -> Tensor:
        """forward in eval mode without the submodule calls (see ``MLP.infer``)."""
        gate, up = F.linear(x, self.fc.weight, self.fc.bias).chunk(2, dim=-1)  # (..., h) each
        return F.linear(F.silu(gate) * up, self.proj.weight, self.proj.bias)


def make_mlp(cfg: ModelConfig, gelu_width: int | None = None) -> nn.Module:
    """The block feed-forward ``cfg.mlp`` asks for; ``gelu_width`` is the GELU-equivalent
    width (default d_ff), which SwiGLU turns into swiglu_width(gelu_width) to match parameters."""
    width = cfg.d_ff if gelu_width is None else gelu_width
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.d_model, swiglu_width(width), cfg.bias, cfg.dropout)
    return MLP(cfg.d_model, width, cfg.bias, cfg.dropout)

"""The shared skeleton: embeddings -> blocks -> final norm -> head.

Knows nothing about any one architecture: a block factory supplies the blocks. Every block
has the signature ``block(x, state, pos) -> (x, aux)`` where ``state`` is a per-layer dict the
block fills for incremental decoding (or None in training), ``pos`` is the absolute position
of ``x[:, 0]`` and ``aux`` is a dict of auxiliary tensors (MoE losses, expert loads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .layers import make_norm
from .spec import ArchitectureSpec, BlockFactory

if TYPE_CHECKING:
    from ..config import ModelConfig

# Summary lines every architecture shares (its own come from its spec's summary_fields).
COMMON_LABELS = {
    "positions": "Positions",
    "norm": "Normalization",
    "mlp": "Feed-Forward",
    "bias": "Biases",
    "tied_embeddings": "Tied Embeddings",
}


@dataclass
class InferenceCache:
    """Decode state: the number of tokens seen and one state dict per layer."""

    pos: int = 0
    layers: list[dict] = field(default_factory=list)


class LanguageModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, block_factory: BlockFactory, spec: ArchitectureSpec | None = None
    ) -> None:
        super().__init__()
        if spec is None:
            from .registry import get

            spec = get(cfg.architecture)
        self.cfg = cfg
        self.spec = spec  # what the architecture declares (summary fields, positions, ...)
        self.rustgpt = cfg.preset == "rustgpt"
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.uses_learned_positions else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block_factory(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = None if self.rustgpt else make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=self.rustgpt)
        if cfg.tie_weights and not self.rustgpt:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init; residual output projections scaled by 1/sqrt(2 L); blocks may refine."""
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                s = resid_std if getattr(module, "residual_scale", False) else std
                nn.init.normal_(module.weight, 0.0, s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for module in self.modules():
            special = getattr(module, "special_init", None)
            if module is not self and callable(special):
                special()

    # ---- forward ---------------------------------------------------------------------
    def forward(
        self, idx: Tensor, cache: InferenceCache | None = None, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """idx (B, T) -> logits (B, T, V); with ``cache``, continues from cache.pos."""
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        x = self.tok_emb(idx)  # (B, T, D)
        if self.pos_emb is not None:
            if pos + T > self.cfg.max_seq_len:
                raise ConfigError(
                    f"sequence of {pos + T} tokens exceeds max_seq_len {self.cfg.max_seq_len} "
                    "of this model (learned positions)"
                )
            x = x + self.pos_emb(torch.arange(pos, pos + T, device=idx.device))
        x = self.drop(x)
        aux_all: list[dict] = []
        for i, block in enumerate(self.blocks):
            state = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x, aux = checkpoint(block, x, None, pos, use_reentrant=False)
            else:
                x, aux = block(x, state, pos)
            if aux:
                aux_all.append(aux)
        if self.norm_f is not None:
            x = self.norm_f(x)
        logits = self.head(x)
        if cache is not None:
            cache.pos = pos + T
        if not return_aux:
            return logits
        return logits, self._merge_aux(aux_all)

    @staticmethod
    def _merge_aux(aux_all: list[dict]) -> dict[str, Any]:
        """Sum the weighted losses over layers; stack per-layer diagnostics."""
        if not aux_all:
            return {}
        out: dict[str, Any] = {}
        for key in aux_all[0]:
            values = [a[key] for a in aux_all]
            if key == "expert_counts":
                out[key] = torch.stack(values)  # (L_moe, E)
            else:
                out[key] = torch.stack(values).sum()
        return out

    def init_cache(self) -> InferenceCache:
        return InferenceCache(pos=0, layers=[{} for _ in self.blocks])

    # ---- bookkeeping -------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters used per token (MoE counts only top_k experts)."""
        inactive = 0
        for module in self.modules():
            fn = getattr(module, "inactive_parameters", None)
            if module is not self and callable(fn):
                inactive += fn()
        return self.num_parameters() - inactive

    def parameter_breakdown(self) -> dict[str, int]:
        groups = {"embeddings": 0, "token_mixing": 0, "channel_mixing": 0, "norms": 0, "head": 0}
        for name, p in self.named_parameters():
            if name.startswith(("tok_emb", "pos_emb")):
                groups["embeddings"] += p.numel()
            elif name.startswith("head"):
                groups["head"] += p.numel()
            elif ".mixer." in name:
                groups["token_mixing"] += p.numel()
            elif ".ffn." in name:
                groups["channel_mixing"] += p.numel()
            else:
                groups["norms"] += p.numel()
        return groups

    def layer_stack(self) -> list[str]:
        stack = ["Embeddings"]
        stack += [getattr(b, "display_name", type(b).__name__) for b in self.blocks]
        if self.norm_f is not None:
            stack.append("FinalNorm")
        stack.append("OutputProjection")
        return stack

    def summary_dict(self) -> dict[str, Any]:
        cfg, spec = self.cfg, self.spec
        d: dict[str, Any] = {
            "architecture": cfg.architecture,
            "architecture_type": spec.display_name,
            "preset": cfg.preset,
            "embedding_dim": cfg.d_model,
            "hidden_dim": spec.hidden_dim(cfg) if spec.hidden_dim else cfg.ffn_hidden,
            "num_layers": cfg.n_layers,
            "max_seq_len": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size,
        }
        for f in spec.summary_fields:
            if f.when is None or f.when(cfg):
                d[f.key] = f.value(cfg)
        if not self.rustgpt:
            d["positions"] = spec.positions_of(cfg)
            d["norm"] = "RMSNorm" if cfg.uses_rmsnorm else "LayerNorm"
            if spec.has_mlp:
                d["mlp"] = "SwiGLU" if cfg.mlp == "swiglu" else "GELU"
            d["bias"] = cfg.bias
            d["tied_embeddings"] = cfg.tie_weights
        d["layer_stack"] = self.layer_stack()
        d["parameter_breakdown"] = self.parameter_breakdown()
        d["total_parameters"] = self.num_parameters()
        d["active_parameters"] = self.num_active_parameters()
        return d

    def summary(self) -> str:
        d = self.summary_dict()
        lines = [
            "=== Model Architecture Summary ===",
            f"Architecture Type: {d['architecture_type']}",
            f"Embedding Dimension: {d['embedding_dim']}",
            f"Hidden Dimension: {d['hidden_dim']}",
            f"Number of Layers: {d['num_layers']}",
            f"Max Sequence Length: {d['max_seq_len']}",
        ]
        labels = {f.key: f.label for f in self.spec.summary_fields} | COMMON_LABELS
        for key, label in labels.items():
            if key in d:
                lines.append(f"{label}: {d[key]}")
        lines += ["", "Layer Stack:"]
        lines += [f"  {i}: {name}" for i, name in enumerate(d["layer_stack"])]
        lines += ["", "Parameter Breakdown:"]
        for key, n in d["parameter_breakdown"].items():
            lines.append(f"  {key.replace('_', ' ').title()}: {n:,}")
        lines += ["", f"Total Parameters: {d['total_parameters']:,}"]
        if d["active_parameters"] != d["total_parameters"]:
            lines.append(f"Active Parameters per Token: {d['active_parameters']:,}")
        lines.append("==================================")
        return "\n".join(lines)

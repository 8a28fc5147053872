"""Model flags shared by train, summary, compare and bench (the seed's flag names)."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import (
    ALIASES,
    ARCHITECTURES,
    MLP_TYPES,
    MODEL_SIZES,
    PRESETS,
    ModelConfig,
    check_fields_apply,
    preset_config,
)


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def add_model_args(parser: argparse.ArgumentParser, architecture_required: bool = False) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--architecture",
        default=None if architecture_required else "dense",
        required=architecture_required,
        metavar="{" + ",".join(list(ARCHITECTURES) + list(ALIASES)) + "}",
        help="model family (default: dense)",
    )
    g.add_argument(
        "--model-size", choices=MODEL_SIZES, default=None, help="size preset (not with --preset)"
    )
    g.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="named model preset (fixes the shape: not with --model-size). A flag for a part "
        "the architecture or preset does not have is refused (exit 2), never ignored",
    )
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--d-model", type=int, default=None)
    g.add_argument("--n-layers", type=int, default=None)
    g.add_argument(
        "--n-heads", type=int, default=None, help="attention heads (dense, moe, hybrid, gdn)"
    )
    g.add_argument("--d-ff", type=int, default=None, help="MLP width (all but mamba, mamba2)")
    g.add_argument("--max-seq-len", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    _bool_flag(g, "--use-rope", "rotary position embedding instead of learned positions")
    _bool_flag(g, "--use-rmsnorm", "RMSNorm instead of LayerNorm")
    _bool_flag(g, "--tie-weights", "tie input embedding and output head")
    g.add_argument(
        "--mlp",
        choices=MLP_TYPES,
        default=None,
        help="feed-forward: gelu, or swiglu at 2/3 of the width, matched parameters "
        "(dense, moe, hybrid, hypermixer; gelu)",
    )
    _bool_flag(
        g, "--bias", "biases in attention and MLP linears (dense, moe, hybrid, hypermixer; none)"
    )
    g.add_argument(
        "--state-size",
        type=int,
        default=None,
        help="SSM state size (mamba, hybrid; 16; mamba2: 64-128 by size)",
    )
    g.add_argument(
        "--conv-size",
        type=int,
        default=None,
        help="causal conv kernel (mamba, mamba2, hybrid, gdn; 4)",
    )
    g.add_argument(
        "--expand", type=int, default=None, help="inner expansion (mamba, mamba2, hybrid; 2)"
    )
    g.add_argument(
        "--ssd-head-dim", type=int, default=None, help="SSD head dim, headdim (mamba2; 32-64)"
    )
    g.add_argument(
        "--ssd-groups", type=int, default=None, help="groups sharing B, C, ngroups (mamba2; 1)"
    )
    g.add_argument(
        "--ssd-chunk-size", type=int, default=None, help="chunk of the training form (mamba2; 64)"
    )
    g.add_argument("--num-experts", type=int, default=None, help="experts (moe only; 8)")
    g.add_argument(
        "--expert-capacity",
        "--top-k",
        dest="top_k",
        type=int,
        default=None,
        help="experts per token, top-k (moe only; 2)",
    )
    g.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="capacity factor (moe only); 0 drops no token",
    )
    g.add_argument(
        "--hybrid-local-window",
        dest="local_window",
        type=int,
        default=None,
        help="sliding attention window (hybrid only; 256)",
    )
    g.add_argument("--hypernetwork-hidden-dim", type=int, default=None, help="(hypermixer only)")
    g.add_argument(
        "--gdn-head-dim", type=int, default=None, help="key head dim (gdn; 3 d_model / 4 n_heads)"
    )
    g.add_argument(
        "--gdn-expand-v", type=int, default=None, help="value head dim / key head dim (gdn; 2)"
    )
    g.add_argument(
        "--gdn-chunk-size", type=int, default=None, help="chunk of the training form (gdn; 32)"
    )
    g.add_argument(
        "--gdn-attention-every",
        type=int,
        default=None,
        help="every K-th layer full attention, OLMo-hybrid's layout (gdn; 0: none)",
    )


MODEL_KEYS = (
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "max_seq_len",
    "dropout",
    "use_rope",
    "use_rmsnorm",
    "tie_weights",
    "mlp",
    "bias",
    "state_size",
    "conv_size",
    "expand",
    "ssd_head_dim",
    "ssd_groups",
    "ssd_chunk_size",
    "num_experts",
    "top_k",
    "capacity_factor",
    "local_window",
    "hypernetwork_hidden_dim",
    "gdn_head_dim",
    "gdn_expand_v",
    "gdn_chunk_size",
    "gdn_attention_every",
)


def model_config_from_args(args: Any, vocab_size: int | None = None) -> ModelConfig:
    """Preset/size first, then explicit flags override; validated."""
    overrides = {k: getattr(args, k, None) for k in MODEL_KEYS}
    check_fields_apply(
        args.architecture,
        getattr(args, "preset", None),
        [k for k, v in overrides.items() if v is not None],
        model_size=getattr(args, "model_size", None),
    )
    return preset_config(
        args.architecture,
        model_size=getattr(args, "model_size", None),
        preset=getattr(args, "preset", None),
        vocab_size=getattr(args, "vocab_size", None) or vocab_size,
        **overrides,
    )

"""What an architecture declares about itself: one ArchitectureSpec at the end of its module.

The skeleton (``lm.py``), the configuration (``config.py``) and the CLI know no architecture by
name; they ask the registry (``registry.py``) for the spec and read these fields. A spec is data
plus a few small functions of the config, so that adding an architecture is one new module that
ends with ``SPEC = ArchitectureSpec(...)`` and one line in ``registry.MODULES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import ModelConfig

# ModelConfig is named as a string: config.py sits above the registry and is only a type here.
BlockFactory = Callable[["ModelConfig", int], nn.Module]


@dataclass(frozen=True)
class SummaryField:
    """One line the architecture adds to ``archlab summary`` (key in --json, label in text)."""

    key: str
    label: str
    value: Callable[[ModelConfig], Any]
    # Shown only when this returns True (e.g. a field the rustgpt preset's block lacks).
    when: Callable[[ModelConfig], bool] | None = None


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything the rest of the package needs to know about one architecture."""

    name: str  # the --architecture value and config.json's "architecture"
    display_name: str  # the summary's "Architecture Type:" line
    block: BlockFactory  # (cfg, layer_idx) -> block; see lm.py for the block contract
    aliases: tuple[str, ...] = ()
    # Config fields (flags) this architecture uses among those only some use; a flag outside
    # it would change nothing and is refused (config.check_fields_apply).
    fields: tuple[str, ...] = ()
    # Default norm: "rmsnorm" forces RMSNorm (as in Mamba/Samba); "layernorm" honours
    # --use-rmsnorm.
    norm: str = "layernorm"
    # Positions: learned_positions=False means the blocks carry position themselves (no
    # embedding table even without --use-rope). ``positions`` says how, for the summary's
    # "Positions" line; None: "learned", or "rope" under --use-rope (attention rotates q, k).
    learned_positions: bool = True
    positions: Callable[[ModelConfig], str] | None = None
    # Change to the dense size preset's shape that keeps parameter counts comparable.
    size_override: Callable[[dict[str, int]], dict[str, Any]] | None = None
    # Layer counts come in multiples of this (the hybrid: one Mamba and one attention layer);
    # `archlab scale`'s dial moves the layer count in these steps to match dense's parameters.
    layer_multiple: int = 1
    # "Hidden Dimension" in the summary (default: the MLP's hidden width as built).
    hidden_dim: Callable[[ModelConfig], int] | None = None
    summary_fields: tuple[SummaryField, ...] = ()
    # Architecture-specific checks, raising ConfigError naming the flag.
    validate: Callable[[ModelConfig], None] | None = None
    # The block of the seed's rustgpt preset, for the architectures that define it.
    rustgpt_block: BlockFactory | None = None
    # Decode state the mixer of layer ``layer_idx`` holds after ``seq_len`` tokens of one
    # sequence, in elements (what MAD and Zoology normalise recall by; small buffers such as
    # Mamba's convolution window are not counted): (cfg, layer_idx, seq_len) -> elements.
    state_elements: Callable[[ModelConfig, int, int], int] | None = None
    # Token mixing costs O(T) per sequence (recurrence, a running sum, a fixed window) rather
    # than full attention's O(T^2): `bench scaling` looks for where it becomes cheaper.
    linear_in_length: bool = False
    # Defaults that depend on the training sequence length, and a warning for an explicit
    # setting that does not fit it: (cfg, seq_len, explicit fields) -> (changes, warning).
    # The trainer applies the changes to a fresh run's fields the user left unset.
    fit_seq_len: (
        Callable[[ModelConfig, int, frozenset[str]], tuple[dict[str, Any], str | None]] | None
    ) = None

    @property
    def has_mlp(self) -> bool:
        return "mlp" in self.fields

    def positions_of(self, cfg: ModelConfig) -> str:
        """The summary's "Positions" value: how this configuration encodes token order."""
        if self.positions is not None:
            return self.positions(cfg)
        if cfg.uses_learned_positions:
            return "learned"
        return "rope" if cfg.use_rope else "none (the blocks carry order)"

    def state_per_layer(self, cfg: ModelConfig, seq_len: int) -> list[int] | None:
        """``state_elements`` of every layer (None when the architecture declares none)."""
        if self.state_elements is None:
            return None
        return [self.state_elements(cfg, i, seq_len) for i in range(cfg.n_layers)]


# ---- pieces several architectures share ------------------------------------------------
ATTENTION_FIELDS = (SummaryField("num_heads", "Attention Heads", lambda c: c.n_heads),)
MLP_FLAGS = ("d_ff", "mlp", "bias")


def check_attention_heads(cfg: ModelConfig, always_rope: bool = False) -> None:
    """d_model must split into heads; RoPE needs an even head dimension."""
    if cfg.preset == "rustgpt":
        return
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"--n-heads: d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}"
        )
    if (cfg.use_rope or always_rope) and cfg.head_dim % 2:
        flag = "--n-heads" if always_rope else "--use-rope"
        raise ConfigError(
            f"{flag}: head dimension {cfg.head_dim} must be even for rotary embeddings"
        )

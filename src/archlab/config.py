"""Model configuration, size presets and validation.

Every user-facing mistake in a configuration raises :class:`ConfigError` with one line that
names the flag and the allowed values; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UserError
from .models import registry
from .models.layers import swiglu_width

__all__ = ["ConfigError", "ModelConfig", "UserError", "preset_config", "swiglu_width"]

MODEL_SIZES = ("nano", "micro", "tiny", "medium", "large")
PRESETS = ("rustgpt",)
MLP_TYPES = ("gelu", "swiglu")

# The architectures themselves are declared by their modules (models/registry.py); this module
# names none and sits above the registry: the blocks import no part of it but its type (under
# TYPE_CHECKING) and ConfigError (errors.py). ARCHITECTURES, ALIASES, DISPLAY_NAMES and
# ARCHITECTURE_FIELDS are live views of the registry (a test may add an architecture to it).


def _spec(name: str) -> Any:
    return registry.get(name)


def architecture_fields() -> dict[str, tuple[str, ...]]:
    """field -> the architectures that use it, for the fields only some architectures use."""
    specs = registry.SPECS.values()
    fields = dict.fromkeys(f for s in specs for f in s.fields)
    return {f: tuple(s.name for s in specs if f in s.fields) for f in fields}


def __getattr__(name: str) -> Any:
    if name == "ARCHITECTURES":
        return tuple(registry.SPECS)
    if name == "ALIASES":
        return dict(registry.ALIASES)
    if name == "DISPLAY_NAMES":
        return {s.name: s.display_name for s in registry.SPECS.values()}
    if name == "ARCHITECTURE_FIELDS":
        return architecture_fields()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def canonical_architecture(name: str) -> str:
    key = name.strip().lower()
    key = registry.ALIASES.get(key, key)
    if key not in registry.SPECS:
        allowed = ", ".join(list(registry.SPECS) + list(registry.ALIASES))
        raise ConfigError(f"--architecture: unknown architecture {name!r} (allowed: {allowed})")
    return key


@dataclass
class ModelConfig:
    """Everything needed to build a model; serialised as config.json in checkpoints."""

    architecture: str = "dense"
    vocab_size: int = 4096
    d_model: int = 128  # seed: "Embedding Dimension"
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512  # seed: "Hidden Dimension" (MLP width)
    max_seq_len: int = 256
    dropout: float = 0.0
    use_rope: bool = False  # False: learned absolute positions
    use_rmsnorm: bool = False  # False: LayerNorm
    tie_weights: bool = True
    norm_eps: float = 1e-5
    bias: bool = False  # biases in attention/MLP linears of the modern blocks
    # Feed-forward: "gelu" (d -> d_ff -> d) or "swiglu" (down(silu(gate x) * up x), Shazeer
    # 2020). d_ff stays the GELU-equivalent width; SwiGLU's hidden width is swiglu_width(d_ff),
    # so switching --mlp keeps the parameter count (see ffn_hidden).
    mlp: str = "gelu"
    # Mamba
    state_size: int = 16
    conv_size: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 -> ceil(d_model / 16)
    # Mamba-2 (state_size, conv_size, expand as above; the size presets set its own)
    ssd_head_dim: int = 64  # headdim: d_inner / ssd_head_dim heads, one scalar decay each
    ssd_groups: int = 1  # ngroups: heads share B and C within a group
    ssd_chunk_size: int = 64  # chunk length of the chunked (training) form; a speed knob
    # MoE
    num_experts: int = 8
    top_k: int = 2
    expert_d_ff: int = 0  # 0 -> d_ff // top_k (matches dense active parameters)
    capacity_factor: float = 0.0  # 0 -> no capacity limit (no token dropped)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    # Hybrid
    local_window: int = 256
    # HyperMixer
    hypernetwork_hidden_dim: int = 0  # 0 -> d_model // 4
    hypermixer_mixing_dim: int = 0  # d' of the generated token-mixing MLP; 0 -> d_model // 2
    # Gated DeltaNet (heads: n_heads; short conv: conv_size)
    gdn_head_dim: int = 0  # key head dim; 0 -> 3 d_model / (4 n_heads), OLMo-hybrid's default
    gdn_expand_v: int = 2  # value head dim = gdn_expand_v x key head dim (fla's expand_v)
    gdn_chunk_size: int = 32  # chunked (WY) form; 32 measured faster than 64 on CPU (2 threads)
    gdn_attention_every: int = 0  # >0: every K-th layer is full attention (OLMo-hybrid layout)
    # Presets ("rustgpt" switches to the seed's post-norm blocks)
    preset: str | None = None
    # Extra, free-form knobs (kept in config.json, ignored by builders that do not know them)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.architecture = canonical_architecture(self.architecture)

    # ---- derived values -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_expert_d_ff(self) -> int:
        return self.expert_d_ff or max(1, self.d_ff // self.top_k)

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the block MLP as built: d_ff for GELU, swiglu_width(d_ff) for SwiGLU."""
        return swiglu_width(self.d_ff) if self.mlp == "swiglu" else self.d_ff

    @property
    def expert_ffn_hidden(self) -> int:
        """Hidden width of one MoE expert as built (GELU-equivalent resolved_expert_d_ff)."""
        w = self.resolved_expert_d_ff
        return swiglu_width(w) if self.mlp == "swiglu" else w

    @property
    def resolved_hyper_hidden(self) -> int:
        return self.hypernetwork_hidden_dim or max(1, self.d_model // 4)

    @property
    def resolved_mixing_dim(self) -> int:
        return self.hypermixer_mixing_dim or max(1, self.d_model // 2)

    @property
    def uses_rmsnorm(self) -> bool:
        """RMSNorm when asked, and always where the architecture's spec says so (Mamba, Samba)."""
        return self.use_rmsnorm or _spec(self.architecture).norm == "rmsnorm"

    @property
    def uses_learned_positions(self) -> bool:
        """Learned absolute positions bound the sequence length; RoPE and Mamba do not."""
        if self.preset == "rustgpt":
            return True
        if not _spec(self.architecture).learned_positions:
            return False  # the blocks carry position (recurrence, or RoPE inside them)
        return not self.use_rope

    # ---- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config.json: unknown model config keys {unknown}")
        return cls(**d)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Raise ConfigError naming the offending flag; return self for chaining."""

        def positive(flag: str, value: float) -> None:
            if value <= 0:
                raise ConfigError(f"{flag}: must be a positive number (got {value})")

        positive("--vocab-size", self.vocab_size)
        positive("--d-model", self.d_model)
        positive("--n-layers", self.n_layers)
        positive("--n-heads", self.n_heads)
        positive("--d-ff", self.d_ff)
        positive("--max-seq-len", self.max_seq_len)
        if self.mlp not in MLP_TYPES:
            raise ConfigError(f"--mlp: unknown MLP {self.mlp!r} (allowed: {', '.join(MLP_TYPES)})")
        if self.mlp != "gelu" and self.preset == "rustgpt":
            raise ConfigError(
                f"--mlp {self.mlp}: the rustgpt preset is the seed's fixed model (ReLU feed-forward)"
            )
        uses_bias = self.architecture in architecture_fields().get("bias", ())
        if not self.bias and self.preset == "rustgpt" and uses_bias:
            raise ConfigError("--no-bias: the rustgpt preset is the seed's fixed model (biases)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout: must be in [0, 1) (got {self.dropout})")
        spec = _spec(self.architecture)
        if spec.validate is not None:
            spec.validate(self)
        if self.hypernetwork_hidden_dim < 0 or self.hypermixer_mixing_dim < 0:
            raise ConfigError("--hypernetwork-hidden-dim: must be >= 0")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(
                f"--preset: unknown preset {self.preset!r} (allowed: {', '.join(PRESETS)})"
            )
        if self.preset == "rustgpt" and spec.rustgpt_block is None:
            names = [s.name for s in registry.SPECS.values() if s.rustgpt_block is not None]
            raise ConfigError(
                f"--preset rustgpt: only defined for --architecture {' or '.join(names)}"
            )
        return self


# ---- flags that only some architectures use ----------------------------------------------
# A flag for a part the chosen architecture does not have would change nothing, so it is
# refused (one line, exit 2) instead of being silently ignored.
# Which architectures use which such field comes from each spec's ``fields``
# (ARCHITECTURE_FIELDS, read from the registry).
# The rustgpt preset's fixed design: single-head attention, learned positions, post-norm
# LayerNorm, untied head, ReLU feed-forward with biases.
RUSTGPT_FIXED = ("n_heads", "use_rope", "use_rmsnorm", "tie_weights", "mlp", "bias")
FLAG_NAMES = {"top_k": "--expert-capacity", "local_window": "--hybrid-local-window"}


def flag_name(field_name: str) -> str:
    return FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def check_fields_apply(
    architecture: str,
    preset: str | None,
    given: Any,
    model_size: str | None = None,
) -> None:
    """Refuse model flags that would change nothing for this architecture or preset.

    ``given``: the ModelConfig fields set explicitly (flags or --config keys).
    """
    arch = canonical_architecture(architecture)
    arch_fields: dict[str, tuple[str, ...]] = architecture_fields()
    given = [k for k in given if k in arch_fields or k in RUSTGPT_FIXED]
    if preset is not None and model_size is not None:
        raise ConfigError(
            f"--preset {preset} and --model-size {model_size} exclude each other: the preset "
            "fixes the model's shape"
        )
    if preset == "rustgpt":
        fixed = [k for k in given if k in RUSTGPT_FIXED]
        if fixed:
            names = ", ".join(flag_name(k) for k in fixed)
            raise ConfigError(
                f"{names}: fixed by --preset rustgpt (single-head attention, learned positions, "
                f"post-norm LayerNorm, untied head, ReLU feed-forward with biases); drop {'it' if len(fixed) == 1 else 'them'} "
                "or leave out --preset"
            )
    unused = [k for k in given if k in arch_fields and arch not in arch_fields[k]]
    if unused:
        names = ", ".join(flag_name(k) for k in unused)
        where = "; ".join(f"{flag_name(k)} applies to {', '.join(arch_fields[k])}" for k in unused)
        raise ConfigError(
            f"{names}: not used by --architecture {arch}, so {'they' if len(unused) > 1 else 'it'}"
            f" would change nothing ({where})"
        )


# ---- size presets -----------------------------------------------------------------------
# Dense shapes per size; the other architectures are scaled to land within 15% of dense's
# parameter count (Mamba doubles the layers as in its paper, MoE matches active parameters).
_DENSE_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=256),
    "micro": dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024, max_seq_len=512),
    "tiny": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024),
    "medium": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=1024),
    "large": dict(d_model=1536, n_layers=36, n_heads=16, d_ff=6144, max_seq_len=2048),
}
# Seed sizes use untied embeddings at a 32k vocabulary; CPU sizes tie them.
_SEED_SIZES = ("tiny", "medium", "large")
DEFAULT_VOCAB = {"nano": 4096, "micro": 4096, "tiny": 32000, "medium": 32000, "large": 32000}


def size_fields(architecture: str, model_size: str) -> dict[str, Any]:
    """The shape a size preset fixes for an architecture (its layers, widths, context)."""
    if model_size not in MODEL_SIZES:
        raise ConfigError(
            f"--model-size: unknown size {model_size!r} (allowed: {', '.join(MODEL_SIZES)})"
        )
    base = dict(_DENSE_SIZES[model_size])
    fields: dict[str, Any] = dict(base, tie_weights=model_size not in _SEED_SIZES)
    override = _spec(canonical_architecture(architecture)).size_override
    if override is not None:
        fields.update(override(base))
    return fields


def preset_config(
    architecture: str,
    model_size: str | None = None,
    preset: str | None = None,
    vocab_size: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """Build a validated config from a size preset or the rustgpt preset plus overrides."""
    arch = canonical_architecture(architecture)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"--preset: unknown preset {preset!r} (allowed: {', '.join(PRESETS)})"
            )
        kw: dict[str, Any] = dict(
            architecture=arch,
            vocab_size=vocab_size or 533,
            d_model=128,
            d_ff=256,
            n_layers=3,
            n_heads=1,
            max_seq_len=80,
            use_rope=False,
            use_rmsnorm=False,
            tie_weights=False,
            # the seed's linears have biases; an architecture without attention/MLP linears
            # (mamba) has no bias to set, and no --bias anybody gave to blame
            bias=arch in architecture_fields().get("bias", (arch,)),
            hypernetwork_hidden_dim=32,
            hypermixer_mixing_dim=64,
            preset="rustgpt",
        )
    else:
        size = model_size or "nano"
        if size not in MODEL_SIZES:
            raise ConfigError(
                f"--model-size: unknown size {size!r} (allowed: {', '.join(MODEL_SIZES)})"
            )
        base = dict(_DENSE_SIZES[size])
        kw = dict(architecture=arch, vocab_size=vocab_size or DEFAULT_VOCAB[size], **base)
        kw["tie_weights"] = size not in _SEED_SIZES
        override = _spec(arch).size_override
        if override is not None:
            kw.update(override(base))  # keeps parameter counts comparable to dense
    for key, value in overrides.items():
        if value is not None:
            kw[key] = value
    return ModelConfig(**kw).validate()

"""The ladder: one dial (depth) -> every architecture's shape, parameters, budget and rate.

The dial is nanochat's ``--depth``: depth D gives the dense reference shape n_layers = D,
d_model = width_per_depth x D, heads of ``head_dim`` channels, MLP 4 x d_model, context =
seq_len. Every other architecture takes that shape through its own size rule, then the
parameter match:

1. its size preset's rule (``SPEC.size_override``: Mamba doubles the layers, the HyperMixer
   adds 40%, the hybrid rounds to an even count, Gated DeltaNet narrows its MLP, Mamba-2 sets
   its head and state widths), with a head width capped at ``head_dim`` and a state no wider
   than the model (Mamba-2's preset state of 128 would be 2-8x the dial's widths of 16-64 and
   make its blocks 60% heavier than dense's);
2. the layer count, in the architecture's ``layer_multiple`` (the hybrid's pairs), whose active
   parameters come nearest dense's at that depth (ties: the rule's count). The presets' rules
   are tuned at preset widths (128 and up), where an embedding is a small part of the model;
   at the dial's widths they are 10-70% off, and this step brings every architecture within
   15% of dense at every rung where a whole layer step allows it (the hybrid at depth 1 cannot:
   its smallest stack, one Mamba and one attention layer, is ~29% over dense's single layer).

Each run trains for ``tokens_per_param`` x its active parameters, rounded up to whole steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from ...errors import UserError
from .settings import DEFAULT_VOCAB, ScaleSettings


@dataclass
class Rung:
    """One (architecture, depth) of the ladder: its shape, size, compute and rate."""

    architecture: str
    depth: int
    shape: dict[str, int]  # the ModelConfig fields the dial sets for this architecture
    params: int  # active parameters (MoE: per token), what the token budget is counted from
    total_params: int
    flops_per_token: float  # training FLOPs per token (train/flops.py)
    steps: int
    tokens: int  # steps x tokens per step (ratio x params, rounded up to whole steps)
    learning_rate: float
    lr_source: str

    @property
    def train_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def name(self) -> str:
        return f"{self.architecture}-d{self.depth}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"train_flops": self.train_flops}


def dense_shape(depth: int, s: ScaleSettings) -> dict[str, int]:
    """The dial: the dense reference shape of depth ``depth`` (nanochat's --depth rule)."""
    d_model = s.width_per_depth * depth
    return dict(
        d_model=d_model,
        n_layers=depth,
        n_heads=max(1, d_model // s.head_dim),
        d_ff=4 * d_model,
        max_seq_len=s.seq_len,
    )


def arch_shape(
    arch: str, depth: int, s: ScaleSettings, vocab_size: int = DEFAULT_VOCAB
) -> dict[str, int]:
    """Dense's shape through the architecture's size rule and the parameter match (module
    docstring), only the fields the architecture uses."""
    key = (s.width_per_depth, s.head_dim, s.seq_len, s.recipe)
    return dict(_matched_shape(arch, depth, key, vocab_size))


def _rule_shape(arch: str, base: dict[str, int], head_dim: int) -> dict[str, int]:
    """Step 1: the preset's rule, head widths capped at head_dim, the state at d_model."""
    from ...config import __getattr__ as config_attr
    from ...models import registry

    spec = registry.get(arch)
    shape = dict(base, **(spec.size_override(base) if spec.size_override else {}))
    for key in [k for k in shape if k.endswith("head_dim")]:
        # a head width fixed for preset widths (Mamba-2's 64) must split the narrow rungs
        shape[key] = min(shape[key], head_dim)
    if "state_size" in shape:
        shape["state_size"] = min(shape["state_size"], base["d_model"])
    only_some: dict[str, tuple[str, ...]] = config_attr("ARCHITECTURE_FIELDS")
    return {k: v for k, v in shape.items() if k not in only_some or arch in only_some[k]}


def _build(cfg: Any) -> Any:
    """The model, for counting: on the meta device from width 256 up (no memory), else a real
    CPU build (3-8x quicker at the dial's widths than the meta device's dispatch)."""
    from ...models import build_model

    return build_model(cfg, device="meta" if cfg.d_model >= 256 else "cpu")


@lru_cache(maxsize=1024)
def _params_of(arch: str, shape: tuple[tuple[str, int], ...], recipe: str, vocab: int) -> int:
    from ...config import preset_config

    cfg = preset_config(
        arch, model_size="nano", vocab_size=vocab, **_recipe_fields(recipe, arch), **dict(shape)
    )
    return int(_build(cfg).num_active_parameters())


def _active_params(arch: str, shape: dict[str, int], recipe: str, vocab_size: int) -> int:
    return _params_of(arch, tuple(shape.items()), recipe, vocab_size)


@lru_cache(maxsize=1024)
def _matched_shape(
    arch: str, depth: int, key: tuple[int, int, int, str], vocab_size: int
) -> tuple[tuple[str, int], ...]:
    """Step 2: the layer count nearest dense's parameters. Parameters are affine in the layer
    count (embedding + layers x one layer), so two builds give the line; a shape the
    architecture refuses is returned unmatched (rung_config says why, in one line)."""
    from ...config import ConfigError
    from ...models import registry

    width_per_depth, head_dim, seq_len, recipe = key
    base = dense_shape(depth, ScaleSettings([], width_per_depth=width_per_depth,
                                            head_dim=head_dim, seq_len=seq_len))  # fmt: skip
    shape = _rule_shape(arch, base, head_dim)
    step = registry.get(arch).layer_multiple
    if arch == "dense":
        return tuple(shape.items())
    try:
        target = _active_params("dense", _rule_shape("dense", base, head_dim), recipe, vocab_size)
        first = _active_params(arch, shape, recipe, vocab_size)
        per_step = _active_params(arch, dict(shape, n_layers=shape["n_layers"] + step), recipe,
                                  vocab_size) - first  # fmt: skip
    except ConfigError:
        return tuple(shape.items())
    if per_step <= 0:
        return tuple(shape.items())
    rule = shape["n_layers"]

    def guess(layers: int) -> float:
        return first + (layers - rule) / step * per_step

    near = max(1, round(rule / step + (target - first) / per_step))
    candidates = [k * step for k in range(max(1, near - 1), near + 2)]
    best = min(candidates, key=lambda n: (abs(guess(n) - target), abs(n - rule)))
    return tuple(dict(shape, n_layers=best).items())


def shape_flags(shape: dict[str, int]) -> list[str]:
    """The `archlab train` flags of a shape: --d-model 32 --n-layers 2 ... (each field's flag
    as train's parser spells it: local_window is --hybrid-local-window)."""
    flags = _train_flags()
    out: list[str] = []
    for key, value in shape.items():
        out += [flags[key], str(value)]
    return out


@lru_cache(maxsize=1)
def _train_flags() -> dict[str, str]:
    """ModelConfig field -> its `archlab train` option (the model flags' parser)."""
    import argparse

    from ...commands.model_args import add_model_args

    parser = argparse.ArgumentParser(add_help=False)
    add_model_args(parser)
    return {
        a.dest: next(o for o in a.option_strings if o.startswith("--"))
        for a in parser._actions
        if a.option_strings
    }


def learning_rate_for(s: ScaleSettings, arch: str, d_model: int) -> tuple[float, str]:
    """(rate, where it came from): --learning-rate, else the learning-rate table's rate for
    this width (inverse in width from the nearest swept entry, also below the narrowest swept
    width, capped at the largest rate its sweep ran: the dial's rungs are 2-8x narrower than
    nano, and nano's rate left them 2-3 nats short), else compare's default, said so."""
    from ..compare.settings import DEFAULT_LEARNING_RATE

    if s.learning_rate is not None:
        return s.learning_rate, "given (--learning-rate)"
    try:
        from ...train.lr_table import rate_for_width
    except ImportError:
        rate_for_width = None
    if rate_for_width is not None:
        try:
            choice = rate_for_width(arch, s.recipe, d_model, narrower="inverse")
            return choice.rate, choice.source
        except UserError as exc:
            why = str(exc).split(";")[0]
            return DEFAULT_LEARNING_RATE, f"compare's default ({why})"
    return DEFAULT_LEARNING_RATE, "compare's default (no learning-rate table in this checkout)"


def rung_config(s: ScaleSettings, arch: str, depth: int, vocab_size: int) -> Any:
    """The validated ModelConfig of one rung; a shape the architecture refuses is one line."""
    from ...config import ConfigError, preset_config

    shape = arch_shape(arch, depth, s, vocab_size)
    try:
        return preset_config(
            arch, model_size="nano", vocab_size=vocab_size, **recipe_overrides(s, arch), **shape
        )
    except ConfigError as exc:
        desc = " ".join(f"{k}={v}" for k, v in shape.items())
        raise UserError(f"--depths {depth}: {arch} refuses the shape {desc} ({exc})") from None


def check_shapes(s: ScaleSettings, vocab_size: int = DEFAULT_VOCAB) -> None:
    """Every rung's shape, before any folder or data work."""
    for arch in s.architectures:
        for depth in s.depths:
            rung_config(s, arch, depth, vocab_size)


def build_ladder(s: ScaleSettings, vocab_size: int) -> list[Rung]:
    """Every (architecture, depth) rung: shape, parameters, FLOPs, budget and rate."""
    from ...train.flops import flops_per_token

    rungs = []
    for arch in s.architectures:
        for depth in s.depths:
            cfg = rung_config(s, arch, depth, vocab_size)
            shape = arch_shape(arch, depth, s, vocab_size)
            model = _build(cfg)
            active = int(model.num_active_parameters())
            steps = max(1, math.ceil(s.tokens_per_param * active / s.tokens_per_step))
            rate, source = learning_rate_for(s, arch, shape["d_model"])
            rungs.append(
                Rung(
                    architecture=arch,
                    depth=depth,
                    shape=shape,
                    params=active,
                    total_params=int(model.num_parameters()),
                    flops_per_token=flops_per_token(model, s.seq_len),
                    steps=steps,
                    tokens=steps * s.tokens_per_step,
                    learning_rate=rate,
                    lr_source=source,
                )
            )
    return rungs


def _recipe_fields(recipe: str, arch: str) -> dict[str, Any]:
    """The recipe's model fields (archlab.recipes where it exists; else none)."""
    try:
        from ...recipes import recipe_fields
    except ImportError:
        return {}
    return recipe_fields(recipe, arch)


def recipe_overrides(s: ScaleSettings, arch: str) -> dict[str, Any]:
    return _recipe_fields(s.recipe, arch)


def recipes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("archlab.recipes") is not None

"""Training recipes: the model choices every architecture of a comparison shares.

``modern`` is the "Transformer++" the Mamba paper and Zoology compare against: RMSNorm
everywhere, RoPE in every attention layer (no learned position table anywhere), SwiGLU in
every MLP (MoE experts and HyperMixer's channel MLP included), no biases. ``classic`` is the
seed documents' GPT-2-style default: learned positions, LayerNorm, GELU (Mamba and the hybrid
keep the RMSNorm and the hybrid's attention the RoPE they always have).

A recipe is a set of ModelConfig fields. Explicit model flags (``--use-rope``, ``--mlp`` ...)
win over the recipe, always; the run then records the recipe as ``"<recipe> + <flags>"``
(see :func:`recipe_label`), so the report never names a recipe the model does not have.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelConfig

RECIPES = ("modern", "classic")
RECIPE_DESCRIPTIONS = {
    "modern": "RMSNorm everywhere, RoPE in every attention layer, SwiGLU in every MLP, no biases",
    "classic": "the seed's GPT-2-style defaults: learned positions, LayerNorm, GELU, no biases "
    "(Mamba and the hybrid keep RMSNorm, the hybrid's attention RoPE)",
}
# The fields a recipe fixes, and their flags (for labels and messages).
RECIPE_FLAGS = {
    "use_rope": "--use-rope",
    "use_rmsnorm": "--use-rmsnorm",
    "mlp": "--mlp",
    "bias": "--bias",
}


def check_recipe(recipe: str, flag: str = "--recipe") -> str:
    key = str(recipe).strip().lower()
    if key not in RECIPES:
        raise ConfigError(f"{flag}: unknown recipe {recipe!r} (allowed: {', '.join(RECIPES)})")
    return key


def recipe_fields(recipe: str, architecture: str) -> dict[str, Any]:
    """The ModelConfig fields ``recipe`` sets for ``architecture`` (only flags it uses)."""
    from .config import canonical_architecture
    from .models import registry

    recipe = check_recipe(recipe)
    spec = registry.get(canonical_architecture(architecture))
    modern = recipe == "modern"
    fields: dict[str, Any] = {"use_rope": modern, "use_rmsnorm": modern}
    if spec.has_mlp:
        fields["mlp"] = "swiglu" if modern else "gelu"
        fields["bias"] = False
    return fields


def apply_recipe(
    recipe: str, architecture: str, explicit: dict[str, Any], preset: str | None = None
) -> dict[str, Any]:
    """The model overrides of a run: the recipe's fields under the explicit flags.

    The rustgpt preset is the seed's fixed model: ``modern`` is refused with it, ``classic``
    adds nothing (the preset fixes those fields itself).
    """
    recipe = check_recipe(recipe)
    if preset is not None:
        if recipe == "modern":
            raise ConfigError(
                f"--recipe modern: --preset {preset} is the seed's fixed model (learned "
                "positions, LayerNorm, ReLU); drop one"
            )
        return dict(explicit)
    fields = recipe_fields(recipe, architecture)
    return {**fields, **{k: v for k, v in explicit.items() if v is not None}}


def recipe_label(cfg: ModelConfig, recipe: str) -> str:
    """How ``cfg`` relates to ``recipe``: its name, or the name plus the flags that changed it
    (e.g. "modern + --no-use-rope"); read from the built config, never from the flags."""
    if cfg.preset is not None:
        return f"preset {cfg.preset}"
    fields = recipe_fields(recipe, cfg.architecture)
    changed = []
    for key, value in fields.items():
        got = getattr(cfg, key)
        if got == value:
            continue
        flag = RECIPE_FLAGS[key]
        if isinstance(got, bool):
            changed.append(flag if got else "--no-" + flag[2:])
        else:
            changed.append(f"{flag} {got}")
    return recipe if not changed else f"{recipe} + {' '.join(changed)}"

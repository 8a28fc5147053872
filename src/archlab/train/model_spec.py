"""ModelSpec: the model a user asked for, before the data's vocabulary (or a checkpoint) fixes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import (
    ConfigError,
    ModelConfig,
    canonical_architecture,
    check_fields_apply,
    preset_config,
    size_fields,
)
from ..recipes import apply_recipe

DEFAULT_TRAIN_RECIPE = "classic"  # the seed documents' defaults (see README)


@dataclass
class ModelSpec:
    """What the user asked for; becomes a ModelConfig once the data's vocabulary is known."""

    architecture: str | None = None  # None: dense, or the checkpoint's
    model_size: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # explicit ModelConfig fields
    # --recipe (recipes.py); None: train's default, classic. Explicit overrides win over it.
    recipe: str | None = None

    @property
    def resolved_recipe(self) -> str:
        return self.recipe or DEFAULT_TRAIN_RECIPE

    def build(self, data_vocab: int) -> ModelConfig:
        kw = {k: v for k, v in self.overrides.items() if v is not None}
        arch = self.architecture or "dense"
        check_fields_apply(arch, self.preset, list(kw), model_size=self.model_size)
        if self.recipe is not None or self.preset is None:
            kw = apply_recipe(self.resolved_recipe, arch, kw, self.preset)
        vocab = kw.pop("vocab_size", None)
        if vocab is not None and vocab < data_vocab:
            raise ConfigError(
                f"--vocab-size: {vocab} is smaller than the data's vocabulary ({data_vocab})"
            )
        return preset_config(
            self.architecture or "dense",
            model_size=self.model_size,
            preset=self.preset,
            vocab_size=vocab or data_vocab,
            **kw,
        )

    def check_fits(self, cfg: ModelConfig, source: str) -> None:
        """Explicit model flags must agree with a checkpoint's config (--init-from/--resume)."""
        given = [k for k, v in self.overrides.items() if v is not None]
        check_fields_apply(
            cfg.architecture,
            self.preset or cfg.preset,
            given,
            self.model_size if self.preset else None,
        )
        if (
            self.architecture is not None
            and canonical_architecture(self.architecture) != cfg.architecture
        ):
            raise ConfigError(
                f"--architecture {self.architecture} does not fit {source} ({cfg.architecture})"
            )
        if self.preset is not None and self.preset != cfg.preset:
            raise ConfigError(f"--preset {self.preset} does not fit {source} (preset {cfg.preset})")
        if self.model_size is not None and self.preset is None:
            if cfg.preset is not None:
                raise ConfigError(
                    f"--model-size {self.model_size} does not fit {source} (preset {cfg.preset})"
                )
            given = {k for k, v in self.overrides.items() if v is not None}
            for key, value in size_fields(cfg.architecture, self.model_size).items():
                if key not in given and getattr(cfg, key) != value:
                    raise ConfigError(
                        f"--model-size {self.model_size} does not fit {source} "
                        f"({key} = {getattr(cfg, key)}, {self.model_size} has {value})"
                    )
        if self.recipe is not None and cfg.preset is None:
            wanted = apply_recipe(self.recipe, cfg.architecture, self.overrides)
            for key, value in wanted.items():
                if key not in self.overrides and getattr(cfg, key) != value:
                    raise ConfigError(
                        f"--recipe {self.recipe} does not fit {source} ({key} = "
                        f"{getattr(cfg, key)}, the recipe has {value})"
                    )
        for key, value in self.overrides.items():
            if value is not None and getattr(cfg, key) != value:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"{flag} {value} does not fit {source} ({key} = {getattr(cfg, key)})"
                )


def as_spec(model_arg: ModelConfig | ModelSpec | dict[str, Any] | None) -> ModelSpec:
    """The trainer's ``model`` argument as a spec (a ModelConfig gives an empty one)."""
    if isinstance(model_arg, ModelSpec):
        return model_arg
    if isinstance(model_arg, dict):
        d = dict(model_arg)
        return ModelSpec(
            architecture=d.pop("architecture", None),
            model_size=d.pop("model_size", None),
            preset=d.pop("preset", None),
            recipe=d.pop("recipe", None),
            overrides=d,
        )
    return ModelSpec()


def requested_architecture(spec: ModelSpec, model_arg: Any) -> str:
    """The architecture asked for (names a default run folder)."""
    if isinstance(model_arg, ModelConfig):
        return model_arg.architecture
    return spec.architecture or "dense"


def requested_preset(spec: ModelSpec, model_arg: Any, ckpt_cfg: ModelConfig | None) -> str | None:
    """The preset whose data a run needs (a checkpoint's own preset wins)."""
    if ckpt_cfg is not None:
        return ckpt_cfg.preset
    if isinstance(model_arg, ModelConfig):
        return model_arg.preset
    return spec.preset

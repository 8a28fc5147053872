"""build_model(cfg) -> LanguageModel: the registry's block factory in the shared skeleton.

Names no architecture: ``registry.py`` lists the architecture modules, each of which declares
its own :class:`~archlab.models.spec.ArchitectureSpec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import registry
from .lm import InferenceCache, LanguageModel

if TYPE_CHECKING:
    from ..config import ModelConfig


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> LanguageModel:
    """Build a validated model; ``device="meta"`` counts parameters without allocating."""
    cfg.validate()
    spec = registry.get(cfg.architecture)
    factory = spec.rustgpt_block if cfg.preset == "rustgpt" else spec.block
    assert factory is not None  # validate() refuses the preset for specs without its block
    if device is not None:
        with torch.device(device):
            return LanguageModel(cfg, factory, spec)
    return LanguageModel(cfg, factory, spec)


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters without allocating weights."""
    model = build_model(cfg, device="meta")
    return model.num_parameters(), model.num_active_parameters()


__all__ = ["InferenceCache", "LanguageModel", "build_model", "count_parameters", "nn"]

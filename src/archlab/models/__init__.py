"""Registry: architecture name -> block factory; build_model(cfg) -> LanguageModel."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .lm import InferenceCache, LanguageModel


def _block_factory(cfg: ModelConfig):
    arch = cfg.architecture
    if cfg.preset == "rustgpt":
        if arch == "dense":
            from .rustgpt import RustGPTBlock

            return RustGPTBlock
        from .hypermixer_rustgpt import RustGPTHyperMixerBlock

        return RustGPTHyperMixerBlock
    if arch == "dense":
        from .dense import DenseBlock

        return DenseBlock
    if arch == "hypermixer":
        from .hypermixer import HyperMixerBlock

        return HyperMixerBlock
    if arch == "mamba":
        from .mamba import MambaBlock

        return MambaBlock
    if arch == "moe":
        from .moe import MoEBlock

        return MoEBlock
    if arch == "hybrid":
        from .hybrid import hybrid_block

        return hybrid_block
    raise AssertionError(arch)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> LanguageModel:
    """Build a validated model; ``device="meta"`` counts parameters without allocating."""
    cfg.validate()
    factory = _block_factory(cfg)
    if device is not None:
        with torch.device(device):
            return LanguageModel(cfg, factory)
    return LanguageModel(cfg, factory)


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters without allocating weights."""
    model = build_model(cfg, device="meta")
    return model.num_parameters(), model.num_active_parameters()


__all__ = ["InferenceCache", "LanguageModel", "build_model", "count_parameters", "nn"]

"""archlab: train and compare small language-model architectures under one protocol."""

from typing import Any

from .config import ConfigError, ModelConfig, preset_config
from .models import InferenceCache, LanguageModel, build_model, count_parameters

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InferenceCache",
    "LanguageModel",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "generate",
    "load",
    "preset_config",
]


def __getattr__(name: str) -> Any:
    """`load` and `generate` import the generation stack lazily (tokenizers, safetensors)."""
    if name in ("load", "generate"):
        import importlib

        module = importlib.import_module(".generate", __name__)
        # importing the submodule binds `archlab.generate` to the module: rebind the function
        globals().update(load=module.load, generate=module.generate)
        return globals()[name]
    raise AttributeError(f"module 'archlab' has no attribute {name!r}")

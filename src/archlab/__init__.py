"""archlab: train and compare small language-model architectures under one protocol."""

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
    "preset_config",
]

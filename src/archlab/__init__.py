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
    "generate",
    "load",
    "preset_config",
]


# Eager on purpose: the submodule `archlab.generate` and the function share a name, and a lazy
# __getattr__ loses to the submodule attribute once anything imports `archlab.generate`
# (then `from archlab import generate` returned the module). Cheap: archlab.generate imports
# torch and the light archlab.data modules; safetensors and the trainer load inside load().
from .generate import generate, load  # noqa: E402

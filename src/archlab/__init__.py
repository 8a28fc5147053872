"""archlab: train and compare small language-model architectures under one protocol."""

import os as _os
import sys as _sys

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


def _started_as_command() -> bool:
    """True while the `archlab` script or `python -m archlab` is importing us."""
    return _os.path.basename(_sys.argv[0]) == "archlab" or _sys.argv[0] == "-m"


# Importing torch takes seconds: a Ctrl-C then is the user's, not a crash to show.
# `generate` is imported eagerly on purpose: the submodule `archlab.generate` and the function
# share a name, and a lazy __getattr__ loses to the submodule attribute once anything imports
# `archlab.generate` (then `from archlab import generate` returned the module). Cheap:
# archlab.generate imports torch and the light archlab.data modules; safetensors and the
# trainer load inside load().
try:
    from .config import ConfigError, ModelConfig, preset_config
    from .generate import generate, load
    from .models import InferenceCache, LanguageModel, build_model, count_parameters
except KeyboardInterrupt:
    if not _started_as_command():
        raise
    print("archlab: interrupted while starting; nothing was changed", file=_sys.stderr)
    raise SystemExit(130) from None

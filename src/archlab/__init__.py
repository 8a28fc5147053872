"""archlab: train and compare small language-model architectures under one protocol."""

import os as _os
import signal as _signal
import sys as _sys

from ._version import __version__ as __version__

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


# OpenMP spin: torch's workers spin ~300,000 iterations after each parallel op, taking a core
# from the fused kernels' threads. Shortened to 10,000 in either import order, a user's
# GOMP_SPINCOUNT / OMP_WAIT_POLICY kept (see _openmp.py).
from . import _openmp  # noqa: E402

if "torch" not in _sys.modules:
    _openmp.before_torch()
else:
    _openmp.after_torch()


def _started_as_command() -> bool:
    """True while the `archlab` script or `python -m archlab` is importing us."""
    if _os.path.basename(_sys.argv[0]) == "archlab":
        return True
    orig = getattr(_sys, "orig_argv", [])  # `python -m archlab.bench.recall.worker` is not one
    return any(a == "-m" and b == "archlab" for a, b in zip(orig, orig[1:], strict=False))


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Importing torch takes seconds and nothing has been written yet: leave at once.

    Raising KeyboardInterrupt instead is not enough: inside numpy's C import it surfaces as an
    ImportError or RecursionError with a traceback."""
    _os.write(2, b"archlab: interrupted while starting; nothing was changed\n")
    _os._exit(130)


_previous_sigint = None
if _started_as_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _previous_sigint = _signal.signal(_signal.SIGINT, _interrupted_while_starting)

# `generate` is imported eagerly on purpose: the submodule `archlab.generate` and the function
# share a name, and a lazy __getattr__ loses to the submodule attribute once anything imports
# `archlab.generate` (then `from archlab import generate` returned the module). Cheap:
# archlab.generate imports torch and the light archlab.data modules; safetensors and the
# trainer load inside load().
from .config import ConfigError, ModelConfig, preset_config  # noqa: E402
from .generate import generate, load  # noqa: E402
from .models import InferenceCache, LanguageModel, build_model, count_parameters  # noqa: E402


def _end_of_startup() -> None:
    """cli.main calls this inside its own Ctrl-C handling: from here a Ctrl-C is the command's."""
    global _previous_sigint
    if _previous_sigint is not None:
        _signal.signal(_signal.SIGINT, _previous_sigint)
        _previous_sigint = None

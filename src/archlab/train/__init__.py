"""Training engine: the loop, optimizer and schedule, checkpoints, metrics, data parallelism.

Heavy submodules load on first use so that ``import archlab.train`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig

__all__ = ["ModelSpec", "TrainConfig", "Trainer", "load_model", "run_training"]


def __getattr__(name: str) -> Any:
    if name in ("run_training", "Trainer", "ModelSpec"):
        from . import trainer

        return getattr(trainer, name)
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    raise AttributeError(name)

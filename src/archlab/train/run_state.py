"""Run state that exact resume needs besides weights and optimizer: RNG states and the data
position (the shared batch generator).

Everything here is saved as tensors and primitives, so trainer_state.pt loads with
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors and primitives (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


# ---- batches ---------------------------------------------------------------------------------
class GlobalBatchSampler:
    """One shared generator (same seed on every rank) drawing each step's global micro-batches.

    The dataset (built with this rank and the world size) draws ``batch_size * world_size``
    window starts from the generator and gathers only this rank's slice of them.
    """

    def __init__(self, dataset, batch_size: int, seq_len: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """(x, y) of this rank: (B, T) LongTensors on the host."""
        return self.dataset.get_batch(self.batch_size, self.seq_len, self.generator)

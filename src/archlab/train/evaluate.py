"""Validation during training: a fixed set of batches and the mean loss over them.

The set depends only on the data, the global batch, the sequence length and ``eval_seed``
(not on the architecture, the rank or the training state), so every architecture of a
comparison, and a run resumed half-way, is scored on the same windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .device import autocast, to_device
from .distributed import DistInfo, all_reduce_sum
from .step import IGNORE_INDEX


def eval_batches(
    val_ds, batch_size: int, seq_len: int, n_batches: int, seed: int, dist: DistInfo
) -> list[tuple[Tensor, Tensor]]:
    """This rank's rows of the fixed validation set.

    ``n_batches`` batches of ``batch_size x world_size`` windows (the global micro-batch),
    fixed by ``seed``; rank r keeps rows [r*B, (r+1)*B) of each, as in training, so one
    process and W processes at the same global batch evaluate the same windows.
    """
    B, r = batch_size, dist.rank
    out = []
    for x, y in val_ds.eval_batches(B * dist.world_size, seq_len, n_batches, seed):
        out.append((x[r * B : (r + 1) * B], y[r * B : (r + 1) * B]))  # (B, T) each
    return out


class Evaluator:
    """Scores the model on the fixed batches; every rank calls it (the sums are all-reduced).

    ``model`` is the plain module (switched to eval mode and back); ``eval_model`` is what is
    called: the compiled model in one process, the plain one under DDP (no gradients needed).
    """

    def __init__(
        self,
        model: nn.Module,
        eval_model: nn.Module,
        batches: list[tuple[Tensor, Tensor]],
        device: torch.device,
        dist: DistInfo,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.eval_model = eval_model
        self.batches = batches
        self.device = device
        self.dist = dist
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy per counted token over the fixed validation batches (all ranks)."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)  # (sum CE, tokens)
        for x, y in self.batches:
            x, y = to_device(x, self.device), to_device(y, self.device)
            with autocast(self.device, self.autocast_dtype):
                logits = self.eval_model(x, return_aux=True)[0]  # (B, T, V)
                ce = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(),
                    y.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            totals[0] += ce.double()
            totals[1] += (y != IGNORE_INDEX).sum()
        all_reduce_sum(totals, self.dist)
        self.model.train()
        s, n = totals.tolist()
        return s / n if n > 0 else float("nan")

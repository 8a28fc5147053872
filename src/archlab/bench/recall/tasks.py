"""The synthetic probes of `archlab bench recall`: one place that knows each task's data.

``mqar`` (Zoology's multi-query associative recall) and ``selective-copy`` (MAD's selective
copying) both produce fixed-length examples of ``seq_len + 1`` tokens and a mask of the answer
positions; this module maps a task name and its difficulty (the number of key-value pairs, or
of tokens to copy) to the generator, the chance level and the checks a user can trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...data import mqar, selective_copy
from ...errors import UserError

TASKS = ("mqar", "selective-copy")
IGNORE_INDEX = -100
# The difficulty axis of each task (what --kv-pairs means) and its name in tables.
DIFFICULTY = {"mqar": "key-value pairs", "selective-copy": "tokens to copy"}
DEFAULT_VOCAB = {"mqar": 32, "selective-copy": 16}  # small: CPU budgets (Zoology: 8192)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UserError(f"--task: unknown task {task!r} (allowed: {', '.join(TASKS)})")
    return task


@dataclass(frozen=True)
class TaskData:
    """One task at one difficulty and length: generates examples, knows its chance level."""

    task: str
    vocab_size: int
    pairs: int  # mqar: key-value pairs; selective-copy: tokens to copy
    seq_len: int
    power_a: float = 0.01  # mqar only

    def config(self, num_train: int = 1, num_val: int = 1):
        """The data module's own config, validated (raises UserError with the flag named)."""
        try:
            if self.task == "mqar":
                return mqar.MQARConfig(
                    vocab_size=self.vocab_size,
                    num_kv_pairs=self.pairs,
                    seq_len=self.seq_len,
                    num_train=num_train,
                    num_val=num_val,
                    power_a=self.power_a,
                ).validate()
            return selective_copy.SelectiveCopyConfig(
                vocab_size=self.vocab_size,
                num_tokens=self.pairs,
                seq_len=self.seq_len,
                num_train=num_train,
                num_val=num_val,
            ).validate()
        except UserError as exc:  # name bench recall's flags, not prepare's
            msg = str(exc)
            for old, new in (
                ("--mqar-vocab-size", "--vocab-size"),
                ("--sc-vocab-size", "--vocab-size"),
                ("--mqar-pairs", "--kv-pairs"),
                ("--sc-tokens", "--kv-pairs"),
                ("--mqar-seq-len", "--seq-len"),
                ("--sc-seq-len", "--seq-len"),
                ("--mqar-power-a", "--power-a"),
            ):
                msg = msg.replace(old, new)
            raise UserError(msg) from None

    @property
    def num_values(self) -> int:
        """How many tokens an answer can be: chance level is 1 / this."""
        if self.task == "mqar":
            return self.vocab_size - self.vocab_size // 2
        return self.vocab_size - selective_copy.FIRST_DATA

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    def generate(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, seq_len + 1) int64, mask (n, seq_len + 1) uint8)."""
        cfg = self.config()
        if self.task == "mqar":
            return mqar.generate(cfg, n, seed)
        return selective_copy.generate(cfg, n, seed)

    def tensors(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs x (n, seq_len) and targets y (n, seq_len), -100 off the answers."""
        return inputs_targets(*self.generate(n, seed))


def inputs_targets(tokens: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole examples (N, T+1) and their answer mask -> x (N, T), y (N, T) with -100 elsewhere."""
    t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    keep = torch.from_numpy(np.ascontiguousarray(mask[:, 1:])).bool()
    y = t[:, 1:].clone()
    y[~keep] = IGNORE_INDEX
    return t[:, :-1].contiguous(), y


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(right, counted): argmax hits among the answer positions only (targets != -100)."""
    keep = targets != IGNORE_INDEX
    pred = logits.argmax(dim=-1)
    return int((pred[keep] == targets[keep]).sum()), int(keep.sum())

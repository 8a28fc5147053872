"""TokenDataset: random windows from a prepared folder's memmap, in constant memory.

Language data (``task == "lm"``): each row of a batch is a contiguous window of ``seq_len + 1``
tokens starting anywhere in the split; ``x`` is its first ``seq_len`` tokens, ``y`` the next
ones, with ``y == -100`` where the mask (chat stage) says the token does not count.

MQAR (``task == "mqar"``): rows are whole, aligned examples (``seq_len`` must equal
``meta["seq_len"]``); ``y`` is -100 everywhere except the answers.

Ranks: every rank draws the same ``batch_size * world_size`` window starts from the generator
(seed it identically on all ranks) and keeps its own slice, so ranks see different windows and
together exactly the batch one process would draw with ``batch_size * world_size``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .folder import data_files_ok, load_meta, max_token_id
from .generated import FIXED_LENGTH_TASKS
from .tokenizer import TextTokenizer, load_tokenizer

IGNORE_INDEX = -100


class TokenDataset:
    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dir = Path(data_dir)
        self.meta: dict[str, Any] = load_meta(self.dir)
        problem = data_files_ok(self.dir, self.meta)
        if problem:
            raise UserError(
                f"data folder {self.dir} is incomplete ({problem}); re-run `archlab prepare --force`"
            )
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.task: str = self.meta.get("task", "lm")
        self.num_tokens = int(self.meta[f"{split}_tokens"])
        dtype = np.dtype(self.meta["dtype"])
        # np.memmap cannot map an empty file; an empty split is refused at batch time
        self._tokens = (
            np.memmap(self.dir / f"{split}.bin", dtype=dtype, mode="r")
            if self.num_tokens
            else np.zeros(0, dtype)
        )
        self._mask = None
        if self.meta["has_mask"] and self.num_tokens:
            self._mask = np.memmap(self.dir / f"{split}_mask.bin", dtype=np.uint8, mode="r")
        self._check_ids(split)
        self.fixed_seq_len: int | None = (
            int(self.meta["seq_len"]) if self.task in FIXED_LENGTH_TASKS else None
        )
        self._tokenizer: TextTokenizer | None = None

    def _check_ids(self, split: str) -> None:
        """Every token id must be below the vocabulary, or the embedding fails mid-run."""
        if not self.num_tokens:
            return
        top = self.meta.get(f"{split}_max_id")
        if not isinstance(top, int):  # a folder from an older archlab: one pass over the file
            top = max_token_id(self.dir / f"{split}.bin", self.meta["dtype"])
        vocab = int(self.meta["vocab_size"])
        if top >= vocab:
            raise UserError(
                f"data folder {self.dir}: {split}.bin holds token id {top}, but the vocabulary "
                f"has {vocab} ids (meta.json vocab_size); re-run `archlab prepare --force`"
            )

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.dir / "tokenizer.json")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.dir)!r}, split={self.split!r}, tokens={self.num_tokens}, task={self.task!r})"

    # ----------------------------------------------------------------------------------

    def _starts(
        self, batch_size: int, seq_len: int, g: torch.Generator, rank: int, world: int
    ) -> np.ndarray:
        """Window starts for this rank: (batch_size,) int64."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(
                f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}"
            )
        n_total = batch_size * world
        if self.task in FIXED_LENGTH_TASKS:
            assert self.fixed_seq_len is not None
            if seq_len != self.fixed_seq_len:
                raise UserError(
                    f"--seq-len {seq_len}: the {self.task} data in {self.dir} has sequences of "
                    f"{self.fixed_seq_len} tokens; pass --seq-len {self.fixed_seq_len}"
                )
            example = self.fixed_seq_len + 1
            n_examples = self.num_tokens // example
            if n_examples < 1:
                raise UserError(f"{self.dir}: the {self.split} split has no {self.task} examples")
            idx = torch.randint(0, n_examples, (n_total,), generator=g)
            starts = idx * example
        else:
            span = self.num_tokens - seq_len  # starts 0 .. N - T - 1
            if span < 1:
                raise UserError(
                    f"{self.dir}: the {self.split} split has {self.num_tokens} tokens, fewer than "
                    f"seq_len + 1 = {seq_len + 1}; use a smaller --seq-len or more data"
                )
            starts = torch.randint(0, span, (n_total,), generator=g)
        return starts[rank * batch_size : (rank + 1) * batch_size].numpy()

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = seq_len + 1
        w = np.stack([self._tokens[s : s + n] for s in starts]).astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(w[:, :-1])  # (B, T)
        y = torch.from_numpy(w[:, 1:].copy())  # (B, T)
        if self._mask is not None:
            m = np.stack([self._mask[s + 1 : s + n] for s in starts])  # (B, T) mask of targets
            y[torch.from_numpy(m == 0)] = IGNORE_INDEX
        return x, y

    def get_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors (B, T): this rank's windows, deterministic under ``generator``."""
        starts = self._starts(batch_size, seq_len, generator, self.rank, self.world_size)
        return self._windows(starts, seq_len)

    def eval_batches(
        self, batch_size: int, seq_len: int, n_batches: int, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of batches: depends only on the data, the shapes and ``seed`` (not on
        the architecture, the rank or the training state), so every model sees the same."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            starts = self._starts(batch_size, seq_len, g, 0, 1)
            yield self._windows(starts, seq_len)

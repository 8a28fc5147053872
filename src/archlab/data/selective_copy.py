"""``selective-copy``: the selective-copying probe of the MAD suite (Poli et al. 2024).

Each example is ``seq_len + 1`` tokens: a region of ``seq_len - num_tokens`` slots holding
``num_tokens`` data tokens at random (sorted) positions and the noise token everywhere else,
then one delimiter token, then the same data tokens again, in order. A model must remember
which tokens were data (not noise) and reproduce them in order after the delimiter: content
selection that a fixed (time-invariant) filter cannot do, which is why MAD uses it to tell
input-dependent mixers from convolutions.

Ids: 0 end-of-text (never appears), 1 the noise token, 2 the delimiter, ``3 .. vocab - 1`` the
data tokens (drawn with replacement). The mask marks the copied tokens, so with
``x = ex[:-1]`` and ``y = ex[1:]`` the loss and the accuracy count exactly the ``num_tokens``
positions from the delimiter on, each predicting the next data token to copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from .tokenizer import EOT, WordTokenizer

NOISE = 1
DELIMITER = 2
FIRST_DATA = 3
_CHUNK = 1024


@dataclass
class SelectiveCopyConfig:
    vocab_size: int = 16  # MAD's default
    num_tokens: int = 8  # data tokens to copy
    seq_len: int = 64  # model input length; examples hold seq_len + 1 tokens
    num_train: int = 20_000
    num_val: int = 1_000

    @property
    def num_data_tokens(self) -> int:
        return self.vocab_size - FIRST_DATA

    @property
    def region(self) -> int:
        """Slots before the delimiter (data tokens + noise)."""
        return self.seq_len - self.num_tokens

    def validate(self) -> SelectiveCopyConfig:
        k = self.num_tokens
        if k < 1:
            raise UserError(f"--sc-tokens must be at least 1 (got {k})")
        if self.vocab_size < FIRST_DATA + 2:
            raise UserError(
                f"--sc-vocab-size {self.vocab_size} is too small: ids 0-2 are end-of-text, noise "
                f"and delimiter, so at least 2 data tokens need vocab >= {FIRST_DATA + 2}"
            )
        if self.vocab_size > 2**31:
            raise UserError(f"--sc-vocab-size {self.vocab_size} is too large")
        if self.seq_len < 2 * k:
            raise UserError(
                f"--sc-seq-len {self.seq_len} is too short to copy {k} tokens (the tokens, a "
                f"delimiter and the copy need at least {2 * k})"
            )
        for flag, n in (
            ("--sc-train-examples", self.num_train),
            ("--sc-val-examples", self.num_val),
        ):
            if n < 1:
                raise UserError(f"{flag} must be at least 1 (got {n})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def generate(
    cfg: SelectiveCopyConfig, num_examples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens (N, seq_len + 1) int64 and mask (N, seq_len + 1) uint8 (1 on copied tokens)."""
    rng = np.random.default_rng(seed)
    K, L, R = cfg.num_tokens, cfg.seq_len, cfg.region
    tokens = np.empty((num_examples, L + 1), dtype=np.int64)
    mask = np.zeros((num_examples, L + 1), dtype=np.uint8)
    mask[:, R + 1 :] = 1
    for s in range(0, num_examples, _CHUNK):
        n = min(_CHUNK, num_examples - s)
        data = rng.integers(FIRST_DATA, cfg.vocab_size, size=(n, K))  # (n, K)
        where = np.sort(np.argsort(rng.random((n, R)), axis=1)[:, :K], axis=1)  # (n, K) slots
        ex = np.full((n, L + 1), NOISE, dtype=np.int64)
        rows = np.arange(n)[:, None]
        ex[rows, where] = data
        ex[:, R] = DELIMITER
        ex[:, R + 1 :] = data
        tokens[s : s + n] = ex
    return tokens, mask


def tokenizer(vocab_size: int) -> WordTokenizer:
    """Names the ids: 0 ``<|endoftext|>``, 1 ``_`` (noise), 2 ``|`` (delimiter), ``t0..``."""
    vocab = [EOT, "_", "|"] + [f"t{i}" for i in range(vocab_size - FIRST_DATA)]
    return WordTokenizer(vocab, specials=[EOT], eot_token=EOT, unk_token=None)

"""``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology").

Each example is ``seq_len + 1`` tokens: ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``,
then a query region where every key appears once more, at a slot drawn from Zoology's power
law over distances, immediately followed by its value; the other slots hold random filler
tokens. Keys come from ids ``1 .. vocab/2 - 1`` and values from ``vocab/2 .. vocab - 1``
(disjoint halves); id 0 is end-of-text and never appears. The mask marks the answer tokens, so
with ``x = ex[:-1]`` and ``y = ex[1:]`` the loss (and :func:`accuracy`) counts exactly the
positions where a query key must be answered with its value.

Unlike language data, examples are fixed-length and aligned: the loader returns whole
examples (``TokenDataset.get_batch`` requires ``seq_len == meta["seq_len"]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from .tokenizer import EOT, WordTokenizer

_CHUNK = 1024  # examples generated at a time (bounds memory for large vocabularies)


@dataclass
class MQARConfig:
    vocab_size: int = 256
    num_kv_pairs: int = 8
    seq_len: int = 64  # model input length; examples hold seq_len + 1 tokens
    num_train: int = 20_000
    num_val: int = 1_000
    power_a: float = 0.01  # Zoology's power law for the query positions

    def validate(self) -> MQARConfig:
        p = self.num_kv_pairs
        if p < 1:
            raise UserError(f"--mqar-pairs must be at least 1 (got {p})")
        if self.vocab_size // 2 - 1 < p:
            raise UserError(
                f"--mqar-vocab-size {self.vocab_size} is too small for {p} key-value pairs "
                f"(keys come from ids 1..vocab/2-1: need vocab >= {2 * (p + 1)})"
            )
        if self.vocab_size > 2**31:
            raise UserError(f"--mqar-vocab-size {self.vocab_size} is too large")
        if self.seq_len < 4 * p - 1:
            raise UserError(
                f"--mqar-seq-len {self.seq_len} is too short for {p} pairs and {p} queries "
                f"(need at least {4 * p - 1})"
            )
        for flag, n in (
            ("--mqar-train-examples", self.num_train),
            ("--mqar-val-examples", self.num_val),
        ):
            if n < 1:
                raise UserError(f"{flag} must be at least 1 (got {n})")
        if not 0 < self.power_a <= 1:
            raise UserError(f"--mqar-power-a must be in (0, 1] (got {self.power_a})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def generate(cfg: MQARConfig, num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens (N, seq_len + 1) int64 and mask (N, seq_len + 1) uint8 (1 on answers)."""
    rng = np.random.default_rng(seed)
    V, P, L = cfg.vocab_size, cfg.num_kv_pairs, cfg.seq_len
    half = V // 2
    ctx = 2 * P
    space = (L + 1 - ctx) // 2  # query slots of two tokens (query, answer)
    log_p = np.log(cfg.power_a) + (cfg.power_a - 1) * np.log(np.arange(1, space + 1))
    tokens = np.empty((num_examples, L + 1), dtype=np.int64)
    mask = np.zeros((num_examples, L + 1), dtype=np.uint8)
    for s in range(0, num_examples, _CHUNK):
        n = min(_CHUNK, num_examples - s)
        keys = 1 + np.argsort(rng.random((n, half - 1)), axis=1)[:, :P]  # (n, P) distinct
        values = half + np.argsort(rng.random((n, V - half)), axis=1)[:, :P]  # (n, P) distinct
        # Gumbel top-k = sampling P distinct slots with probabilities ~ power law
        gumbel = -np.log(-np.log(rng.random((n, space))))
        slots = np.argsort(-(log_p + gumbel), axis=1)[:, :P]  # (n, P): slot of key j's query
        ex = rng.integers(1, V, size=(n, L + 1))  # filler
        ex[:, 0:ctx:2] = keys
        ex[:, 1:ctx:2] = values
        rows = np.arange(n)[:, None]
        ex[rows, ctx + 2 * slots] = keys
        ex[rows, ctx + 2 * slots + 1] = values
        tokens[s : s + n] = ex
        mask[s : s + n][rows, ctx + 2 * slots + 1] = 1
    return tokens, mask


def tokenizer(vocab_size: int) -> WordTokenizer:
    """Names the ids: 0 ``<|endoftext|>``, keys ``k1..``, values ``v0..``."""
    half = vocab_size // 2
    vocab = [EOT] + [f"k{i}" for i in range(1, half)] + [f"v{i}" for i in range(vocab_size - half)]
    return WordTokenizer(vocab, specials=[EOT], eot_token=EOT, unk_token=None)


def accuracy(logits, targets) -> float:
    """Fraction of answer positions (targets != -100) whose argmax is the right value."""
    import torch

    keep = targets != -100
    if not bool(keep.any()):
        return float("nan")
    pred = logits.argmax(dim=-1)
    return float((pred[keep] == targets[keep]).to(torch.float64).mean())

"""Data baselines: the unigram and bigram entropies a model must beat to have learned anything.

Both are cross-entropies, in nats per token, of the **validation** split under a model whose
counts come from the **training** split only (as a trained LM's would), so they are losses a
model can be compared with directly. A model whose val loss is not below the unigram entropy
has learned nothing about context; the bigram entropy is what one token of context buys.

Targets are scored the way the trainer scores them: each token of the split predicted from the
one before it (the split's first token has no predecessor and is not scored); with a loss mask
(chat, MQAR) only the targets whose mask counts, in both the counts and the score. Counts run
across document boundaries exactly as the training windows do (end-of-text is a token).

Smoothing (so that no val token has probability zero):

* unigram: additive smoothing with ``alpha = 0.5`` per vocabulary entry (the Krichevsky-Trofimov
  estimator): ``p(w) = (c(w) + 0.5) / (N + 0.5 V)``.
* bigram: interpolated Kneser-Ney with one absolute discount ``D = 0.75``:
  ``p(w | u) = max(c(u, w) - D, 0) / c(u) + D N1+(u .) / c(u) * p_cont(w)``, where
  ``p_cont(w)`` is the continuation distribution ``N1+(. w) / N1+(. .)`` itself interpolated
  with the uniform distribution by the same rule, and a context ``u`` never seen in training
  falls back to ``p_cont``. This is the standard smoothed bigram (Chen & Goodman 1998); a plain
  add-k bigram over-smooths badly at the vocabulary sizes used here (4,096 BPE tokens).

Both are computed in constant memory from the memmaps, chunk by chunk, without materialising a
V x V table (vocabularies of 32k+ tokens work).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

UNIGRAM_ALPHA = 0.5
KN_DISCOUNT = 0.75
BASELINE_KEYS = ("unigram_entropy", "bigram_entropy")
# "Learned" means at least this far below the unigram entropy (nats/token): a model that has
# learned nothing about context sits at the unigram entropy, and 0.1 nats is 10.5% more
# likelihood per token than that, well outside the noise of a few validation batches.
LEARNED_MARGIN = 0.1


def learned(final_val_loss: float | None, unigram_entropy: float | None) -> bool | None:
    """Whether a run learned: final val loss LEARNED_MARGIN below the unigram entropy (None
    when either is unknown or not finite)."""
    if final_val_loss is None or unigram_entropy is None:
        return None
    if not (math.isfinite(final_val_loss) and math.isfinite(unigram_entropy)):
        return None if not math.isfinite(unigram_entropy) else False
    return final_val_loss < unigram_entropy - LEARNED_MARGIN


BASELINES_NOTE = (
    "nats/token on the val split under counts from the train split: unigram add-0.5, "
    "bigram interpolated Kneser-Ney (D=0.75); see archlab.data.baselines"
)
_CHUNK = 1 << 22  # tokens per chunk: bounded memory on large corpora


def _pairs(
    ids: np.ndarray, mask: np.ndarray | None, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prev, next) int64 for targets start..stop-1 (start >= 1) that count for the loss."""
    prev = np.asarray(ids[start - 1 : stop - 1], dtype=np.int64)
    nxt = np.asarray(ids[start:stop], dtype=np.int64)
    if mask is not None:
        keep = np.asarray(mask[start:stop]) != 0
        prev, nxt = prev[keep], nxt[keep]
    return prev, nxt


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + _CHUNK, n)) for s in range(1, n, _CHUNK)]


def _bigram_counts(
    ids: np.ndarray, mask: np.ndarray | None, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique pair codes ``prev * V + next`` and their counts over the split."""
    codes_all: list[np.ndarray] = []
    counts_all: list[np.ndarray] = []
    for s, e in _chunks(len(ids)):
        prev, nxt = _pairs(ids, mask, s, e)
        c, k = np.unique(prev * vocab_size + nxt, return_counts=True)
        codes_all.append(c)
        counts_all.append(k)
        if len(codes_all) > 8:  # merge now and then: memory stays ~ the distinct pairs
            codes_all, counts_all = list(_merge(codes_all, counts_all))
    codes, counts = _merge(codes_all, counts_all)
    return codes[0], counts[0]


def _merge(
    codes: list[np.ndarray], counts: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not codes:
        return [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    c = np.concatenate(codes)
    k = np.concatenate(counts).astype(np.int64)
    u, inv = np.unique(c, return_inverse=True)
    return [u], [np.bincount(inv, weights=k, minlength=len(u)).astype(np.int64)]


def compute_baselines(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    vocab_size: int,
    *,
    train_mask: np.ndarray | None = None,
    val_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """``{"unigram_entropy", "bigram_entropy"}`` in nats/token (see the module docstring).

    ``train_ids`` / ``val_ids``: 1-D token arrays (memmaps fine); ``*_mask``: optional uint8
    arrays of the same length, nonzero where a token counts as a target.
    """
    V = int(vocab_size)
    if V < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for name, a in (("train_ids", train_ids), ("val_ids", val_ids)):
        if len(a) < 2:
            raise ValueError(f"{name} needs at least 2 tokens, got {len(a)}")
    codes, counts = _bigram_counts(train_ids, train_mask, V)
    if codes.size and int(codes.max()) >= V * V:
        raise ValueError(f"a token id >= vocab_size {V} in train_ids")
    prev_of, next_of = codes // V, codes % V
    # unigram: target counts c(w); bigram: context counts c(u) (as contexts of scored targets)
    c_w = np.bincount(next_of, weights=counts, minlength=V)
    c_u = np.bincount(prev_of, weights=counts, minlength=V)
    n_follow = np.bincount(prev_of, minlength=V).astype(np.float64)  # N1+(u .)
    n_precede = np.bincount(next_of, minlength=V).astype(np.float64)  # N1+(. w)
    n_total = float(c_w.sum())
    n_types = float(len(codes))  # N1+(. .)
    p_uni = (c_w + UNIGRAM_ALPHA) / (n_total + UNIGRAM_ALPHA * V)  # (V,)
    # continuation distribution, interpolated with uniform by the same absolute-discount rule
    seen = float(np.count_nonzero(n_precede))
    if n_types > 0:
        p_cont = (
            np.maximum(n_precede - KN_DISCOUNT, 0.0) / n_types + (KN_DISCOUNT * seen / n_types) / V
        )
    else:
        p_cont = np.full(V, 1.0 / V)

    nll_uni = 0.0
    nll_bi = 0.0
    n_val = 0
    for s, e in _chunks(len(val_ids)):
        prev, nxt = _pairs(val_ids, val_mask, s, e)
        if prev.size == 0:
            continue
        if int(max(prev.max(), nxt.max())) >= V:
            raise ValueError(f"a token id >= vocab_size {V} in val_ids")
        nll_uni -= math.fsum(np.log(p_uni[nxt]))
        q = prev * V + nxt
        pos = np.searchsorted(codes, q)
        pos_c = np.minimum(pos, max(len(codes) - 1, 0))
        hit = (pos < len(codes)) & (codes[pos_c] == q) if len(codes) else np.zeros_like(q, bool)
        c_uw = np.where(hit, counts[pos_c] if len(codes) else 0, 0).astype(np.float64)
        cu = c_u[prev]
        known = cu > 0
        cu_safe = np.where(known, cu, 1.0)
        p_bi = np.where(
            known,
            np.maximum(c_uw - KN_DISCOUNT, 0.0) / cu_safe
            + KN_DISCOUNT * n_follow[prev] / cu_safe * p_cont[nxt],
            p_cont[nxt],
        )
        nll_bi -= math.fsum(np.log(p_bi))
        n_val += int(prev.size)
    if n_val == 0:
        raise ValueError("no val target counts (the mask excludes every token)")
    return {"unigram_entropy": nll_uni / n_val, "bigram_entropy": nll_bi / n_val}


def baselines_of_folder(data_dir: str | os.PathLike, meta: dict[str, Any]) -> dict[str, float]:
    """Compute the baselines from a prepared folder's token files (and masks)."""
    d = Path(data_dir)
    dtype = np.dtype(meta["dtype"])
    arrays: dict[str, Any] = {}
    for split in ("train", "val"):
        n = int(meta[f"{split}_tokens"])
        arrays[f"{split}_ids"] = (
            np.memmap(d / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
            if n
            else np.zeros(0, dtype)
        )
        arrays[f"{split}_mask"] = (
            np.memmap(d / f"{split}_mask.bin", dtype=np.uint8, mode="r", shape=(n,))
            if meta.get("has_mask") and n
            else None
        )
    return compute_baselines(
        arrays["train_ids"],
        arrays["val_ids"],
        int(meta["vocab_size"]),
        train_mask=arrays["train_mask"],
        val_mask=arrays["val_mask"],
    )

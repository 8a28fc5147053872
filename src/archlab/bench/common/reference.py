"""What a comparison is read against: the data's baselines and its bytes per token.

- Unigram entropy: the loss of a model that predicts every token by its frequency. A run
  that does not go below it by a margin (LEARNED_MARGIN, 0.1 nats) learned nothing about
  context ("did not learn").
- Bigram entropy: the loss of the best model that sees only the previous token.
- Entropy floor (the built-in generated corpus): the lowest loss any model can reach.
- Bytes per token of the validation split: turns nats/token into bits per byte, which does
  not depend on the tokenizer (a word-level and a BPE run become comparable).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...data.baselines import LEARNED_MARGIN, learned
from ...errors import UserError

__all__ = ["LEARNED_MARGIN", "Reference", "load_reference"]

MAX_BYTES_SAMPLE_TOKENS = 2_000_000  # bytes/token is estimated on at most this many tokens


@dataclass
class Reference:
    unigram_entropy: float | None = None  # nats/token
    bigram_entropy: float | None = None
    entropy_floor: float | None = None
    val_bytes_per_token: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reference:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def learned(self, final_val_loss: float | None) -> bool | None:
        """True when the loss is below the unigram baseline by LEARNED_MARGIN; None when
        either is unknown."""
        return learned(final_val_loss, self.unigram_entropy)

    def bits_per_byte(self, loss_nats: float | None) -> float | None:
        if loss_nats is None or not self.val_bytes_per_token:
            return None
        return loss_nats / math.log(2) / self.val_bytes_per_token

    def header_line(self) -> str:
        """The line above the table: every baseline the losses should be read against."""
        parts = []
        for label, v in (
            ("unigram", self.unigram_entropy),
            ("bigram", self.bigram_entropy),
            ("entropy floor", self.entropy_floor),
        ):
            if v is not None:
                bpb = self.bits_per_byte(v)
                parts.append(f"{label} {v:.4f}" + (f" ({bpb:.4f} bits/byte)" if bpb else ""))
        if not parts:
            return "Baselines: none known for this data (the 'learned' check is off)."
        return "Baselines (validation split, nats/token): " + ", ".join(parts) + "."


def load_reference(data_dir: Path, meta: dict[str, Any]) -> Reference:
    """The baselines of a prepared folder (stored in meta.json by prepare, computed for
    older folders) and the validation split's bytes per token."""
    base = _baselines(Path(data_dir), meta)
    return Reference(
        unigram_entropy=_finite(base.get("unigram_entropy")),
        bigram_entropy=_finite(base.get("bigram_entropy")),
        entropy_floor=_finite(meta.get("entropy_floor")),
        val_bytes_per_token=_bytes_per_token(Path(data_dir), meta),
    )


def _baselines(data_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    try:
        from ...data.folder import load_baselines
    except ImportError:  # before the data baselines landed: whatever meta.json holds
        return {k: meta.get(k) for k in ("unigram_entropy", "bigram_entropy")}
    stored = {k: meta.get(k) for k in ("unigram_entropy", "bigram_entropy")}
    if all(isinstance(v, (int, float)) for v in stored.values()):
        return stored
    try:  # an older folder: computed from its token files
        return dict(load_baselines(data_dir))
    except (UserError, OSError, ValueError, KeyError):
        return stored


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _bytes_per_token(data_dir: Path, meta: dict[str, Any]) -> float | None:
    """UTF-8 bytes per counted validation token (end-of-text counts one byte), decoded with
    the folder's tokenizer; None for tasks without text (MQAR) or when it cannot be read."""
    if meta.get("task", "lm") != "lm" or "val_tokens" not in meta:
        return None
    try:
        from ...data.tokenizer import load_tokenizer
        from ..eval.evaluate import text_bytes

        n = min(int(meta["val_tokens"]), MAX_BYTES_SAMPLE_TOKENS)
        tokens = np.memmap(data_dir / "val.bin", dtype=np.dtype(meta["dtype"]), mode="r")[:n]
        if meta.get("has_mask"):
            counted = np.memmap(data_dir / "val_mask.bin", dtype=np.uint8, mode="r")[:n] > 0
        else:
            counted = np.ones(n, dtype=bool)
        tok = load_tokenizer(data_dir / "tokenizer.json")
        n_counted = int(counted.sum())
        n_bytes = text_bytes(np.asarray(tokens), counted, tok, int(meta["eot_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if n_counted == 0 or n_bytes == 0:
        return None
    return n_bytes / n_counted


__all__ = ["Reference", "load_reference"]

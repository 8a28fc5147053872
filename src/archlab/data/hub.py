"""``tinystories``: TinyStories (Eldan & Li, 2023) through Hugging Face ``datasets``.

Uses the network or the local Hugging Face cache. Offline without a cached copy (or without
``datasets`` installed) it stops with one line saying how to pass a local copy instead. The
dataset's own train/validation splits are kept; validation stories that also occur in train
(the data set has duplicates) are dropped so that the splits share no document.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import UserError
from .documents import Doc, Source

DATASET = "roneneldan/TinyStories"
LOCAL_HINT = (
    "download it where you have network and pass a local copy instead, e.g. "
    "`archlab prepare path/to/TinyStories*.txt` or `--data path/to/*.txt` "
    "(.txt split on <|endoftext|>, .jsonl or .parquet)"
)


# official sizes of the two splits: a --num-stories subset keeps their ratio
OFFICIAL_TRAIN, OFFICIAL_VAL = 2_119_719, 21_990


def load_hub_split(split: str, streaming: bool = False) -> Iterable[dict[str, Any]]:
    """Rows of ``datasets.load_dataset(DATASET, split=split)``, with one-line errors.

    ``streaming`` reads only as many rows as are taken (for a --num-stories subset).
    """
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"tinystories: the `datasets` package is not installed (pip install datasets); or {LOCAL_HINT}"
        ) from None
    try:
        return datasets.load_dataset(DATASET, split=split, streaming=streaming)
    except Exception as exc:  # offline: ConnectionError, OfflineModeIsEnabled, FileNotFoundError...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"tinystories: cannot load {DATASET} from the Hugging Face Hub or its local cache "
            f"(offline? {type(exc).__name__}: {reason}); {LOCAL_HINT}"
        ) from None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def tinystories_source(num_stories: int | None) -> Source:
    if num_stories is not None and num_stories < 2:
        raise UserError(f"--num-stories must be at least 2 (got {num_stories})")
    info: dict[str, Any] = {"dataset": DATASET}
    n_train = n_val = None
    if num_stories is not None:
        n_val = max(1, round(num_stories * OFFICIAL_VAL / (OFFICIAL_TRAIN + OFFICIAL_VAL)))
        n_train = num_stories - n_val

    def docs() -> Iterator[Doc]:
        streaming = num_stories is not None
        train = load_hub_split("train", streaming)
        val = load_hub_split("validation", streaming)
        seen: set[bytes] = set()
        for row in itertools.islice(train, n_train):
            text = (row.get("text") or "").strip()
            if text:
                seen.add(_digest(text))
                yield Doc(text, split="train")
        dropped = 0
        for row in itertools.islice(val, n_val):
            text = (row.get("text") or "").strip()
            if not text:
                continue
            if _digest(text) in seen:
                dropped += 1
                continue
            yield Doc(text, split="val")
        info["val_duplicates_dropped"] = dropped

    return Source(
        name="tinystories",
        kind="tinystories",
        fingerprint={"dataset": DATASET, "num_stories": num_stories},
        docs=docs,
        num_docs=num_stories,
        split_mode="given",
        info=info,
    )

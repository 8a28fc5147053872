"""What a source is: :class:`Source` yields :class:`Doc` objects and carries a fingerprint.

Kept apart from ``sources.py`` (the built-in sources and the dispatch over every source) so that
the sources in their own modules (``hub.py``, ``local.py``) import these types from below the
dispatch that imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Doc:
    """One document. ``segments`` (chat): (text, counts_for_loss) pieces whose concatenation is
    ``text``; ``split`` forces "train"/"val" (sources with official splits), else hashed."""

    text: str
    logp: float | None = None
    segments: tuple[tuple[str, bool], ...] | None = None
    split: str | None = None


@dataclass
class Source:
    name: str  # default output folder name
    kind: str
    fingerprint: dict[str, Any]
    docs: Callable[[], Iterator[Doc]]
    num_docs: int | None = None  # for the progress bar, when known
    default_tokenizer: str = "bpe"
    chat: bool = False
    has_logp: bool = False
    split_mode: str = "hash"  # "hash" by content, "given" by the source, "tail" for one doc
    vocab_texts: Callable[[], Iterator[str]] | None = None  # word vocabulary from these texts
    info: dict[str, Any] = field(default_factory=dict)  # extra meta.json fields

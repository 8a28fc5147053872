"""Streaming text: generated token ids -> text pieces, cut at stop strings.

Incremental detokenisation emits only complete characters (byte-level BPE splits multi-byte
characters across tokens; a character still incomplete when generation ends is dropped, not
shown as U+FFFD), keeps the word spacing between prompt and continuation, and holds back any
tail that could still become a stop string, so nothing after a stop is ever shown. A word-level
tokenizer's text ("sunlight , water .") is detokenised ("sunlight, water.").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

STREAM_CONTEXT_TOKENS = 4  # prompt tokens re-decoded with the first piece (word spacing)


class Tokenizer(Protocol):
    """The part of archlab.data.tokenizer.TextTokenizer that generation uses."""

    eot_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# Word-level (RustGPT) text: tokens joined by single spaces. Closing punctuation and an
# apostrophe attach to the word before, opening brackets and an apostrophe to the word after.
_SPACE_BEFORE = re.compile(r" ([,.!?;:%)\]}'])")
_SPACE_AFTER = re.compile(r"([(\[{']) ")


def detokenize_words(text: str) -> str:
    """``"Saturn ' s rings , ( big ) ."`` -> ``"Saturn's rings, (big)."``: the spacing of the
    text a word-level tokenizer was trained on, which its decode (single spaces) loses. Only
    removes spaces next to punctuation tokens, so the text of a prefix is a prefix of the text
    of the whole (streaming relies on it)."""
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


class TextStream:
    """Turns generated tokens into text pieces without splitting a multi-byte character.

    Incremental detokenisation: each step decodes a short window (the tokens since the last
    emitted piece plus one piece of left context) and emits the new suffix only once it no
    longer ends in U+FFFD (an incomplete UTF-8 sequence of byte-level BPE). The left context
    starts in the prompt so word-level spacing between prompt and continuation is right.
    The concatenation of the pieces (plus :meth:`flush`) is the continuation text.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.tokens = list(context_ids)[-STREAM_CONTEXT_TOKENS:]
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.words = getattr(tokenizer, "kind", None) == "word"

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        return detokenize_words(text) if self.words else text

    def _pending(self) -> str:
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or not full.startswith(prefix):
            # the decoder rewrote the prefix (rare normalisations): emit what is new
            common = len(prefix) if full.startswith(prefix) else _common_prefix(prefix, full)
            return full[common:]
        return full[len(prefix) :]

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ('' while a character is partial)."""
        self.tokens.append(token)
        piece = self._pending()
        if not piece or piece.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return piece

    def flush(self) -> str:
        """Whatever is still held back at the end, without an incomplete last character
        (generation stopped inside it: its bytes are not a character, so nothing is shown)."""
        piece = self._pending() if self.read_offset < len(self.tokens) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        return piece.rstrip("\ufffd")


class StopFilter:
    """Text-level stop strings over a stream of pieces (for stops that are not one token,
    e.g. ``</s>`` in a byte-level BPE vocabulary).

    Holds back any tail that could still become a stop string, so nothing after a stop is
    ever emitted. With ``strip``, leading and trailing whitespace of the whole text is dropped
    (a chat answer), which means trailing whitespace is held back until more text follows.
    """

    def __init__(self, stops: Sequence[str] = (), strip: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.strip = strip
        self.held = ""
        self.started = not strip
        self.stopped = False

    def _safe_length(self) -> int:
        """How much of `held` cannot be the start of a stop string (or trailing space)."""
        n = len(self.held)
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, n), 0, -1):
                if self.held.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        safe = n - keep
        if self.strip:
            safe = len(self.held[:safe].rstrip())
        return safe

    def push(self, piece: str) -> str:
        """Add decoded text; return what is safe to show now."""
        if self.stopped or not piece:
            return ""
        self.held += piece
        if not self.started:
            self.held = self.held.lstrip()
            self.started = bool(self.held)
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out = self.held[: min(hits)]
            self.held = ""
            return out.rstrip() if self.strip else out
        safe = self._safe_length()
        out, self.held = self.held[:safe], self.held[safe:]
        return out

    def flush(self) -> str:
        """End of generation: release the held tail (a partial stop string is just text)."""
        out = "" if self.stopped else self.held
        self.held = ""
        return out.rstrip() if self.strip else out


def stream_text(
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    tokens: Iterator[int],
    stop: Sequence[str] = (),
    strip: bool = False,
    emit: Callable[[str], Any] | None = None,
) -> tuple[str, list[int]]:
    """Decode `tokens` as they come into text pieces (given to `emit`) until the tokens end or
    a stop string appears; return (text, token ids consumed). Closes `tokens` when stopping
    early, so generation ends there."""
    decoder = TextStream(tokenizer, prompt_ids)
    stops = StopFilter(stop, strip)
    pieces: list[str] = []
    ids: list[int] = []

    def give(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if emit is not None:
                emit(piece)

    try:
        for token in tokens:
            ids.append(token)
            give(stops.push(decoder.push(token)))
            if stops.stopped:
                break
        else:
            give(stops.push(decoder.flush()))
            give(stops.flush())
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
    return "".join(pieces), ids


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def stop_ids_for(tokenizer: Tokenizer, extra: Sequence[str] = ()) -> list[int]:
    """End-of-text plus any of `extra` that is a single token of this vocabulary."""
    ids = [int(tokenizer.eot_id)] if tokenizer.eot_id is not None else []
    for tok in extra:
        tid = tokenizer.token_to_id(tok)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids

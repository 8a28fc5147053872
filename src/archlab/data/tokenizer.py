"""Tokenizers: byte-level BPE, character-level and the RustGPT word-level rules.

Every kind is a :class:`TextTokenizer` and round-trips through one ``tokenizer.json``:

* ``bpe``: a Hugging Face ``tokenizers`` file (ByteLevel pre-tokenizer and decoder, so
  ``decode(encode(text)) == text`` for every string); any foreign HF ``tokenizer.json`` loads
  too (its kind is its model type, lower-cased: ``bpe``, ``wordlevel``, ``unigram``...).
* ``char`` and ``word``: a small JSON of our own, ``{"archlab_kind": "char"|"word", "vocab":
  [token for id 0, 1, ...], ...}``: simpler and exact, and these vocabularies are tiny.

The word-level rules are RustGPT's (seed): split on whitespace, every ASCII punctuation
character is its own token, ``</s>`` (end of text) is one token. Two deliberate differences:
an unknown word becomes ``<unk>`` (the seed silently drops it), and ``decode`` joins tokens
with single spaces, so the word tokenizer is lossy ("Hi, you." -> "Hi , you .").
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

EOT = "<|endoftext|>"  # end of text for BPE and char tokenizers
UNK = "<unk>"
WORD_EOT = "</s>"  # RustGPT's end-of-sequence word
ROLE_TOKENS = ("User:", "Assistant:")  # chat roles (the seed's format), special in chat BPE
ASCII_PUNCTUATION = frozenset(string.punctuation)  # == Rust's char::is_ascii_punctuation
FORMAT_VERSION = 1


class TextTokenizer:
    """Common interface: ``kind``, ``vocab_size``, ``eot_id``, encode/decode, save."""

    kind: str = ""
    eot_token: str = EOT

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        tid = self.token_to_id(self.eot_token)
        assert tid is not None
        return tid

    @property
    def special_tokens(self) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, idx: int) -> str | None:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        p.write_text(self.to_json(), encoding="utf-8")
        return p

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------------------
# Byte-level BPE (and any Hugging Face tokenizer.json)
# --------------------------------------------------------------------------------------

_EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")


class HFTokenizer(TextTokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``; ours are byte-level BPE."""

    def __init__(self, tok: Any, eot_token: str | None = None) -> None:
        self._tok = tok
        model = json.loads(tok.to_str())["model"]
        self.kind = str(model.get("type", "bpe")).lower()
        vocab = tok.get_vocab(with_added_tokens=True)
        if eot_token is None:
            eot_token = next((c for c in _EOT_CANDIDATES if c in vocab), None)
        if eot_token is None or eot_token not in vocab:
            raise UserError(
                "tokenizer has no end-of-text token (looked for " + ", ".join(_EOT_CANDIDATES) + ")"
            )
        self.eot_token = eot_token
        self._encode_fast = getattr(tok, "encode_batch_fast", tok.encode_batch)

    @property
    def hf(self) -> Any:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    def to_json(self) -> str:
        return self._tok.to_str(pretty=False)


def bpe_special_tokens(chat: bool) -> list[str]:
    return [EOT, *ROLE_TOKENS] if chat else [EOT]


def train_bpe(
    texts: Iterable[str], vocab_size: int, chat: bool = False, show_progress: bool = False
) -> HFTokenizer:
    """Train byte-level BPE on ``texts`` (the training split only).

    The 256 byte symbols are always in the vocabulary, so every string encodes and decodes
    exactly. In a chat corpus the role markers ``User:`` / ``Assistant:`` are single special
    tokens (only as whole words). The trainer stops early when the data has no more merges,
    so the result can be smaller than ``vocab_size``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = bpe_special_tokens(chat)
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs 256 byte tokens "
            f"+ {len(specials)} special token(s) = {minimum} at least"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    added = [EOT] + [AddedToken(t, single_word=True, special=True) for t in specials[1:]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(texts, 1000), trainer=trainer)
    return HFTokenizer(tok, eot_token=EOT)


def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------
# Vocabulary-list tokenizers (char, word): our own small JSON format
# --------------------------------------------------------------------------------------


class _VocabTokenizer(TextTokenizer):
    def __init__(
        self,
        vocab: list[str],
        specials: list[str],
        eot_token: str,
        unk_token: str | None,
    ) -> None:
        if len(set(vocab)) != len(vocab):
            raise UserError(f"{self.kind} tokenizer: duplicate tokens in the vocabulary")
        for t in [*specials, eot_token] + ([unk_token] if unk_token else []):
            if t not in vocab:
                raise UserError(f"{self.kind} tokenizer: special token {t!r} not in the vocabulary")
        self.vocab = list(vocab)
        self.stoi = {t: i for i, t in enumerate(self.vocab)}
        self._specials = list(specials)
        self.eot_token = eot_token
        self.unk_token = unk_token
        self._unk_id = self.stoi[unk_token] if unk_token else None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_tokens(self) -> list[str]:
        return list(self._specials)

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    def id_to_token(self, idx: int) -> str | None:
        idx = int(idx)
        return self.vocab[idx] if 0 <= idx < len(self.vocab) else None

    def _unknown(self, piece: str) -> int:
        if self._unk_id is None:
            raise UserError(f"{self.kind} tokenizer: {piece!r} is not in the vocabulary")
        return self._unk_id

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} out of range for vocabulary of {len(self.vocab)}")
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "archlab_kind": self.kind,
                "version": FORMAT_VERSION,
                "eot_token": self.eot_token,
                "unk_token": self.unk_token,
                "special_tokens": self._specials,
                "vocab": self.vocab,
            },
            ensure_ascii=False,
        )


class CharTokenizer(_VocabTokenizer):
    """One token per Unicode code point; special tokens match as whole strings.

    A character absent from the training split encodes to ``<unk>`` (and decodes as the
    literal text ``<unk>``); every character seen in training round-trips exactly.
    """

    kind = "char"

    def __init__(self, vocab: list[str], specials: list[str] | None = None) -> None:
        specials = [EOT, UNK] if specials is None else specials
        super().__init__(vocab, specials, EOT, UNK if UNK in specials else None)
        for t in self.vocab:
            if t not in self._specials and len(t) != 1:
                raise UserError(f"char tokenizer: token {t!r} is not a single character")
        self._special_re = re.compile(
            "|".join(re.escape(s) for s in sorted(specials, key=len)[::-1])
        )
        # code point -> id lookup: a dense table over the code points in the vocabulary
        chars = [(ord(t), i) for i, t in enumerate(self.vocab) if t not in self._specials]
        self._max_cp = max((c for c, _ in chars), default=0)
        unk = self._unk_id if self._unk_id is not None else -1
        self._table = np.full(self._max_cp + 2, unk, dtype=np.int64)
        for c, i in chars:
            self._table[c] = i
        self._vocab_arr = np.array(self.vocab, dtype=object)

    def _encode_plain(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._table[np.minimum(cps, self._max_cp + 1)]
        if (ids < 0).any():
            bad = text[int(np.argmax(ids < 0))]
            self._unknown(bad)
        return ids

    def encode(self, text: str) -> list[int]:
        if not self._specials or "<" not in text:
            return self._encode_plain(text).tolist()
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            out.extend(self._encode_plain(text[pos : m.start()]).tolist())
            out.append(self.stoi[m.group()])
            pos = m.end()
        out.extend(self._encode_plain(text[pos:]).tolist())
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in self._check_ids(ids))


def train_char(texts: Iterable[str]) -> CharTokenizer:
    """Vocabulary: the special tokens, then every character of the training split, sorted."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    return CharTokenizer([EOT, UNK, *sorted(chars - {EOT, UNK})])


def split_words(text: str, keep: frozenset[str] = frozenset({WORD_EOT})) -> list[str]:
    """RustGPT's rules: whitespace words; ASCII punctuation split off one char at a time;
    ``</s>`` (any word in ``keep``) stays one token when it is a whole word."""
    out: list[str] = []
    for word in text.split():
        if word in keep:
            out.append(word)
            continue
        current = []
        for c in word:
            if c in ASCII_PUNCTUATION:
                if current:
                    out.append("".join(current))
                    current = []
                out.append(c)
            else:
                current.append(c)
        if current:
            out.append("".join(current))
    return out


class WordTokenizer(_VocabTokenizer):
    """Word-level tokenizer with the seed's splitting rules; see the module docstring."""

    kind = "word"

    def __init__(
        self,
        vocab: list[str],
        specials: list[str] | None = None,
        eot_token: str = WORD_EOT,
        unk_token: str | None = UNK,
    ) -> None:
        specials = [UNK, WORD_EOT] if specials is None else specials
        super().__init__(vocab, specials, eot_token, unk_token)
        self._keep = frozenset(self._specials)

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        return [stoi[w] if w in stoi else self._unknown(w) for w in split_words(text, self._keep)]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[i] for i in self._check_ids(ids))


def train_word(texts: Iterable[str], vocab_size: int | None = None) -> WordTokenizer:
    """Specials ``<unk>``, ``</s>``, then the words (the most frequent ``vocab_size - 2`` when
    capped), sorted alphabetically so the ids do not depend on the order of the data."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(split_words(t))
    counts.pop(WORD_EOT, None)
    counts.pop(UNK, None)
    words = sorted(counts)
    if vocab_size is not None:
        if vocab_size < 3:
            raise UserError(
                f"--vocab-size {vocab_size} is too small: the word tokenizer needs 2 special "
                "tokens (<unk>, </s>) plus at least one word"
            )
        words = sorted(
            w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 2]
        )
    return WordTokenizer([UNK, WORD_EOT, *words])


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def tokenizer_from_json(text: str, origin: str = "tokenizer.json") -> TextTokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"corrupt tokenizer file {origin}: {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"corrupt tokenizer file {origin}: not a JSON object")
    kind = data.get("archlab_kind")
    if kind is not None:
        try:
            vocab = [str(t) for t in data["vocab"]]
            specials = [str(t) for t in data["special_tokens"]]
            if kind == "char":
                return CharTokenizer(vocab, specials)
            if kind == "word":
                return WordTokenizer(vocab, specials, str(data["eot_token"]), data.get("unk_token"))
        except (KeyError, TypeError) as exc:
            raise UserError(
                f"corrupt tokenizer file {origin}: missing or bad field {exc}"
            ) from None
        raise UserError(f"tokenizer file {origin}: unknown archlab_kind {kind!r} (char, word)")
    from tokenizers import Tokenizer

    if not isinstance(data.get("model"), dict):  # valid JSON, but no tokenizer in it
        raise UserError(
            f"{origin} is not a tokenizer: neither archlab's (archlab_kind) nor a Hugging "
            "Face tokenizer.json (model)"
        )
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a plain Exception on bad files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"corrupt tokenizer file {origin}: not a valid Hugging Face tokenizer ({first})"
        ) from None
    try:
        return HFTokenizer(tok)
    except UserError as exc:
        raise UserError(f"{origin}: {exc}") from None


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Load any tokenizer.json we write (or a Hugging Face one); ``path`` may be its folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"tokenizer file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read tokenizer file {p}: {exc}") from None
    return tokenizer_from_json(text, str(p))

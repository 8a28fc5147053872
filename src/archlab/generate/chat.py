"""Chat: a conversation with a loaded model in the chat stage's format, within its window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.sources import CHAT_FORMAT
from ..errors import UserError
from .decoding import DEFAULT_MAX_NEW_TOKENS, generate_ids
from .sampling import SamplingParams
from .text import Tokenizer, stop_ids_for, stream_text

if TYPE_CHECKING:
    from . import LoadedModel

# Chat format of the built-in chat stage (rustgpt-chat): "User: {q} Assistant: {a} </s>".
CHAT_USER_PREFIX = CHAT_FORMAT["user"] + " "
CHAT_ASSISTANT_PREFIX = " " + CHAT_FORMAT["assistant"]
CHAT_STOP = (CHAT_FORMAT["end"],)


@dataclass
class ChatFormat:
    """How a conversation is laid out as tokens (the chat stage's format).

    A turn is ``encode(user_prefix + question + assistant_prefix) + answer + [eot]``;
    generation stops at end-of-text or any string of `stop` (token or text).
    """

    user_prefix: str = CHAT_USER_PREFIX
    assistant_prefix: str = CHAT_ASSISTANT_PREFIX
    stop: tuple[str, ...] = CHAT_STOP

    def question_ids(self, tokenizer: Tokenizer, question: str) -> list[int]:
        return tokenizer.encode(f"{self.user_prefix}{question}{self.assistant_prefix}")


# First words of a question: a word-level chat corpus ends its questions with "?" (RustGPT's
# does, 141 of 144), so one typed without it gets it.
QUESTION_WORDS = frozenset(
    "what why how where when who whom whose which do does did is are was were can could "
    "will would should shall may might have has had".split()
)


def normalise_words(tokenizer: Tokenizer, text: str) -> str:
    """A question as a word-level tokenizer's training text spells it: each word in the
    vocabulary's case (the first word capitalised, later ones lower-case, where the
    vocabulary has that form), and a "?" after a question typed without end punctuation.

    A word-level vocabulary is case-sensitive and knows nothing of "mountains?" vs
    "mountains ?" vs "Mountains": without this, "what do mountains look like" is a different
    (partly unknown) sequence from the trained "What do mountains look like?".
    """
    from ..data.tokenizer import split_words

    words = split_words(text.strip())
    if not words:
        return text

    def known(w: str) -> bool:
        return tokenizer.token_to_id(w) is not None

    out = []
    for i, w in enumerate(words):
        forms = (w.capitalize(), w.lower()) if i == 0 else (w.lower(), w.capitalize())
        out.append(next((f for f in (*forms, w) if known(f)), w))
    if out[-1] not in ".!?" and out[0].lower() in QUESTION_WORDS:
        out.append("?")
    return " ".join(out)


@dataclass
class ChatSession:
    """A conversation with a loaded model, kept within its context window.

    Past turns are kept as token ids (no decode/encode round trip); before each answer the
    oldest turns are dropped until question + room for the answer fits ``max_seq_len``.
    """

    loaded: LoadedModel
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None
    keep_history: bool = True
    fmt: ChatFormat = field(default_factory=ChatFormat)
    warn: Callable[[str], None] | None = None
    turns: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = SamplingParams(self.temperature, self.top_k, self.top_p, self.greedy)
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: must be >= 1 (got {self.max_new_tokens})")
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        tok = self.loaded.tokenizer
        self.stop_ids = stop_ids_for(tok, self.fmt.stop)
        self.text_stops = [t for t in self.fmt.stop if tok.token_to_id(t) is None]
        self.separator = [int(tok.eot_id)]  # closes each answer, as in the training data

    @property
    def window(self) -> int:
        return int(self.loaded.config.max_seq_len)

    def reset(self) -> None:
        self.turns.clear()

    def build_prompt(self, question: str) -> tuple[list[int], list[int]]:
        """(history kept, new question) as token ids; oldest turns dropped to fit."""
        q = self.fmt.question_ids(self.loaded.tokenizer, question)
        reserve = min(self.max_new_tokens, self.window // 2)  # room left for the answer
        budget = max(self.window - reserve, 1)
        kept: list[list[int]] = []
        used = len(q)
        for turn in reversed(self.turns if self.keep_history else []):
            if used + len(turn) > budget:
                break
            kept.insert(0, turn)
            used += len(turn)
        self.turns = kept
        return [t for turn in kept for t in turn], q

    def ask(self, question: str, stream: Callable[[str], Any] | None = None) -> str:
        """Answer one question (streamed piece by piece when `stream` is given)."""
        question = question.strip()
        if not question:
            raise UserError("empty question")
        if getattr(self.loaded.tokenizer, "kind", None) == "word":
            question = normalise_words(self.loaded.tokenizer, question)
        history, q = self.build_prompt(question)
        prompt = history + q
        tokens = generate_ids(
            self.loaded.model,
            prompt,
            self.max_new_tokens,
            self.params,
            generator=self.generator,
            stop_ids=self.stop_ids,
            warn=self.warn,
        )
        answer, answer_ids = stream_text(
            self.loaded.tokenizer, prompt, tokens, stop=self.text_stops, strip=True, emit=stream
        )
        if self.keep_history:
            self.turns.append(q + answer_ids + self.separator)
        return answer

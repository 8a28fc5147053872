"""Text generation from any archlab model: sampling, cached decoding, streaming text, chat.

The loop prefills the prompt once (in chunks when it is long) and then feeds one token at a
time through the model's decode cache, so each new token costs O(1) in the prefix for the
recurrent mixers (Mamba, HyperMixer state) and O(T) for attention (its KV cache); the prefix
is never re-run per token.

Context window policy, by how the model encodes positions:

* learned absolute positions (``cfg.uses_learned_positions``: dense/MoE without RoPE,
  HyperMixer, the rustgpt preset) cannot see past ``max_seq_len``. A longer prompt keeps its
  last ``max_seq_len`` tokens (with a :class:`ContextWindowWarning`). When generation fills
  the window, the cache is rebuilt from the last ``max_seq_len - shift`` tokens (one chunked
  prefill, ``shift = max(1, max_seq_len // 4)`` by default), so the model always sees between
  3/4 of a window and a full window of context and the rebuild happens once every
  ``shift + 1`` tokens, not once per token (``shift=0`` is nanoGPT's crop-every-token).
* Mamba and the hybrid (Mamba state + sliding-window attention) stream on without limit at
  constant cost per token.
* RoPE attention (dense/MoE with ``use_rope``) does NOT slide: the KV cache keeps every
  token, exactly what a full forward over the whole sequence computes. RoPE has no hard length
  limit, but quality past the trained ``max_seq_len`` is extrapolation and the cache grows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .data.sources import CHAT_FORMAT
from .errors import UserError

DEFAULT_PREFILL_CHUNK = 512
DEFAULT_MAX_NEW_TOKENS = 128
# Chat format of the built-in chat stage (rustgpt-chat): "User: {q} Assistant: {a} </s>".
CHAT_USER_PREFIX = CHAT_FORMAT["user"] + " "
CHAT_ASSISTANT_PREFIX = " " + CHAT_FORMAT["assistant"]
CHAT_STOP = (CHAT_FORMAT["end"],)
STREAM_CONTEXT_TOKENS = 4  # prompt tokens re-decoded with the first piece (word spacing)


class ContextWindowWarning(UserWarning):
    """The prompt did not fit the model's context window and was truncated from the left."""


class Tokenizer(Protocol):
    """The part of archlab.data.tokenizer.TextTokenizer that generation uses."""

    eot_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked from the logits.

    ``greedy`` (or ``temperature == 0``) takes the argmax. Otherwise logits are divided by
    ``temperature``, then filtered by ``top_k`` (keep the k most likely) and ``top_p``
    (nucleus: keep the smallest set of most likely tokens whose probability reaches p), in
    that order, and one token is drawn.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"--temperature: must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k: must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p: must be in (0, 1] (got {self.top_p})")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest to -inf. logits: (..., V)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability >= p.

    A token is kept when the probability of the tokens ranked above it is still below p, so
    the most likely token is always kept and the set stops at the first token that reaches p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability ranked above each token
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Pick one token id from logits (V,) (any device; sampling itself runs on the CPU so a
    seed gives the same draw whatever the device of the model)."""
    if params.is_greedy:
        return int(torch.argmax(logits).item())
    x = logits.detach().float().cpu() / params.temperature
    if params.top_k is not None:
        x = top_k_filter(x, params.top_k)
    if params.top_p is not None:
        x = top_p_filter(x, params.top_p)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


# ---------------------------------------------------------------------------------------
# Cached decoding with a context-window policy
# ---------------------------------------------------------------------------------------
class DecodeState:
    """A model's decode cache plus the context-window policy described in the module doc.

    ``prefill(ids)`` and ``feed(token)`` return the logits (V,) for the next token.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        slide_shift: int | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise UserError(f"prefill chunk must be >= 1 (got {prefill_chunk})")
        self.model = model
        self.device = next(model.parameters()).device
        cfg = model.cfg
        self.window: int | None = cfg.max_seq_len if cfg.uses_learned_positions else None
        self.prefill_chunk = prefill_chunk
        if self.window is not None:
            shift = slide_shift if slide_shift is not None else max(1, self.window // 4)
            if not 0 <= shift < self.window:
                raise UserError(f"slide shift must be in [0, {self.window}) (got {shift})")
            self.keep = self.window - shift  # tokens kept when the window is rebuilt
        self.cache = model.init_cache()
        self.history: list[int] = []  # last `window` tokens (learned positions only)
        self.rebuilds = 0  # how often the window slid (for tests and diagnostics)

    @property
    def pos(self) -> int:
        return self.cache.pos

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int]) -> Tensor:
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
        logits = None
        for start in range(0, idx.shape[1], self.prefill_chunk):
            logits = self.model(idx[:, start : start + self.prefill_chunk], cache=self.cache)
        assert logits is not None
        return logits[0, -1]  # (V,)

    def _remember(self, ids: Sequence[int]) -> None:
        if self.window is not None:
            self.history.extend(ids)
            del self.history[: -self.window]

    def prefill(self, ids: Sequence[int]) -> Tensor:
        """Feed the prompt (its last `window` tokens for learned positions)."""
        if not ids:
            raise UserError("empty prompt: nothing to condition on")
        if self.window is not None and self.pos + len(ids) > self.window:
            raise ValueError("prefill past the window: truncate the prompt first")
        self._remember(ids)
        return self._forward(ids)

    def feed(self, token: int) -> Tensor:
        """Append one generated token; slide the window first if it is full."""
        if self.window is not None and self.pos + 1 > self.window:
            self.cache = self.model.init_cache()
            self.rebuilds += 1
            context = self.history[len(self.history) - (self.keep - 1) :] + [token]
            self.history = []
            self._remember(context)
            return self._forward(context)
        self._remember([token])
        return self._forward([token])


def truncate_prompt(
    ids: list[int], window: int | None, warn: Callable[[str], None] | None = None
) -> list[int]:
    """Keep the last `window` tokens of a too long prompt (learned positions), warning once."""
    if window is None or len(ids) <= window:
        return ids
    message = (
        f"prompt of {len(ids)} tokens exceeds the context window of {window} tokens "
        f"(learned positions); keeping its last {window} tokens"
    )
    if warn is None:
        warnings.warn(message, ContextWindowWarning, stacklevel=2)
    else:
        warn(message)
    return ids[-window:]


def generate_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    params: SamplingParams | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    slide_shift: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (stop tokens are not yielded).

    ``seed`` seeds a private CPU ``torch.Generator`` (same seed, same tokens); without seed
    nor ``generator`` the global torch RNG is used.
    """
    params = params or SamplingParams()
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: must be >= 0 (got {max_new_tokens})")
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise UserError("empty prompt: nothing to condition on")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    vocab = int(model.cfg.vocab_size)
    if min(ids) < 0 or max(ids) >= vocab:
        raise UserError(f"prompt token ids must be in [0, {vocab}) for this model")
    stops = set(int(s) for s in stop_ids)
    was_training = model.training
    model.eval()
    try:  # inference mode is entered per forward, never held across a yield
        state = DecodeState(model, prefill_chunk=prefill_chunk, slide_shift=slide_shift)
        ids = truncate_prompt(ids, state.window, warn)
        if max_new_tokens == 0:
            return
        logits = state.prefill(ids)
        for i in range(max_new_tokens):
            token = sample_token(logits, params, generator)
            if token in stops:
                return
            yield token
            if i + 1 < max_new_tokens:
                logits = state.feed(token)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# Streaming text
# ---------------------------------------------------------------------------------------
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

    def _pending(self) -> str:
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset :])
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
        """Whatever is still held back at the end (an incomplete character decodes lossily)."""
        piece = self._pending() if self.read_offset < len(self.tokens) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        return piece


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


# ---------------------------------------------------------------------------------------
# Loading and the Python API
# ---------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable device is a UserError."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("--device mps: MPS is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device: unknown device {device!r} (auto, cpu, cuda, mps)") from exc


@dataclass
class LoadedModel:
    """A model ready to generate: weights, their config, the tokenizer, the device."""

    model: torch.nn.Module
    config: Any  # ModelConfig
    tokenizer: Tokenizer
    device: torch.device
    path: Path | None = None

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        return generate(self, prompt, **kwargs)

    def chat(self, **kwargs: Any) -> ChatSession:
        return ChatSession(self, **kwargs)


def load(path: str | Path, device: str | torch.device = "auto") -> LoadedModel:
    """Load a checkpoint folder (or a run folder: its latest checkpoint) for generation."""
    from .train.checkpoint import load_model

    dev = resolve_device(device)
    p = Path(path)
    if not p.exists():
        raise UserError(f"--checkpoint: {path} does not exist")
    try:
        model, cfg, tokenizer = load_model(p, device=str(dev))
    except UserError:
        raise
    except Exception as exc:  # a file the loader did not anticipate: still one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--checkpoint: cannot load {path}: {first}") from exc
    if tokenizer is None:
        raise UserError(f"--checkpoint: {path} has no tokenizer.json; cannot encode prompts")
    model.eval()
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, device=dev, path=p)


def stop_ids_for(tokenizer: Tokenizer, extra: Sequence[str] = ()) -> list[int]:
    """End-of-text plus any of `extra` that is a single token of this vocabulary."""
    ids = [int(tokenizer.eot_id)] if tokenizer.eot_id is not None else []
    for tok in extra:
        tid = tokenizer.token_to_id(tok)
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


def generate(
    model_or_loaded: LoadedModel | torch.nn.Module,
    prompt: str | Sequence[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    stream: Callable[[str], Any] | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    stop: Sequence[str] = (),
    warn: Callable[[str], None] | None = None,
) -> str:
    """Continue `prompt` and return the new text (without the prompt, without end-of-text).

    `model_or_loaded` is what :func:`load` returns, or a bare model plus ``tokenizer=``.
    `stream`, when given, is called with each new piece of text as soon as it is complete;
    the pieces concatenate to the returned string. Generation stops at the tokenizer's
    end-of-text token, at any string in `stop` (e.g. ``"</s>"``: a token of the vocabulary,
    or text matched in the decoded output, which is cut before it), or after
    `max_new_tokens`.
    """
    if isinstance(model_or_loaded, LoadedModel):
        model = model_or_loaded.model
        tokenizer = tokenizer or model_or_loaded.tokenizer
    else:
        model = model_or_loaded
    if tokenizer is None:
        raise UserError("generate: a bare model needs tokenizer=...")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("--prompt: empty prompt")
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = [int(t) for t in prompt]
    if not prompt_ids:
        raise UserError("--prompt: the prompt encodes to no tokens")
    token_ids = stop_ids_for(tokenizer, stop)
    text_stops = [t for t in stop if tokenizer.token_to_id(t) is None]
    tokens = generate_ids(
        model, prompt_ids, max_new_tokens, params, seed=seed, stop_ids=token_ids, warn=warn
    )
    text, _ = stream_text(tokenizer, prompt_ids, tokens, stop=text_stops, emit=stream)
    return text


# ---------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------
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

"""Text generation from any archlab model: load a checkpoint, generate, chat.

The Python API (``archlab.generate`` / ``archlab.load``) lives here; its parts are one module
each: ``sampling`` (how the next token is picked), ``decoding`` (the cached decoding loop and
its context-window policy), ``text`` (streaming detokenisation and stop strings) and ``chat``
(a conversation kept within the model's window).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .chat import ChatFormat, ChatSession, normalise_words
from .decoding import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    ContextWindowWarning,
    DecodeState,
    generate_ids,
    truncate_prompt,
)
from .sampling import SamplingParams, sample_token, top_k_filter, top_p_filter
from .text import StopFilter, TextStream, Tokenizer, detokenize_words, stop_ids_for, stream_text

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_PREFILL_CHUNK",
    "ChatFormat",
    "ChatSession",
    "ContextWindowWarning",
    "DecodeState",
    "LoadedModel",
    "SamplingParams",
    "StopFilter",
    "TextStream",
    "Tokenizer",
    "detokenize_words",
    "generate",
    "generate_ids",
    "load",
    "normalise_words",
    "resolve_device",
    "sample_token",
    "stop_ids_for",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
    "truncate_prompt",
]


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
    from ..train.checkpoint import load_model

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

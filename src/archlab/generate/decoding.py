"""Cached decoding: prefill once, then one token at a time, under a context-window policy.

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

import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .sampling import SamplingParams, sample_token

DEFAULT_PREFILL_CHUNK = 512
DEFAULT_MAX_NEW_TOKENS = 128


class ContextWindowWarning(UserWarning):
    """The prompt did not fit the model's context window and was truncated from the left."""


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

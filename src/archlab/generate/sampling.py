"""Sampling: how the next token is picked from the logits (greedy, temperature, top-k, top-p).

Sampling runs on the CPU whatever the model's device, so a seed gives the same draw on every
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError


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

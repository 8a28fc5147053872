"""AdamW with decoupled weight decay on weight matrices only, and the learning-rate schedule.

Which parameters decay (a decision, applied to every architecture alike):

- decayed: weight tensors with two or more dimensions that multiply activations (linear and
  convolution weights, the untied output head, MoE expert and router matrices);
- never decayed: norms and biases (one dimension), token and position embeddings (the
  rows of rare tokens would be pulled to zero at a rate that depends on token frequency, as
  OLMo 2 and others note), and any parameter a block marks with ``_no_weight_decay = True``
  (Mamba's ``A_log`` and ``D`` in the reference implementation). A tied output head is the
  embedding table and therefore follows the embedding rule.

The schedule is a pure function of the step, so resuming needs only the step to restore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``, each parameter exactly once."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():  # named_parameters() drops tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if (
            p.ndim >= 2
            and id(p) not in embedding_params
            and not getattr(p, "_no_weight_decay", False)
        ):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW; the fused kernel where this torch has one for the device (same math, fewer passes)."""
    groups = parameter_groups(model, weight_decay)
    fused = device_type in ("cuda", "cpu", "mps")
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8, fused=fused)
    except (RuntimeError, ValueError):  # fused not available for this device/dtype
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8)


# Default warmup when none is given: a fraction of the run, capped. A fixed 100 steps (the
# old default) left a 30- or 100-step run with its learning rate still rising at the end.
DEFAULT_WARMUP_FRACTION = 0.05
DEFAULT_WARMUP_CAP = 100


def default_warmup_steps(total_steps: int) -> int:
    """5% of the run, at least 1 step (runs of 2+ steps), at most 100: 100 steps -> 5."""
    if total_steps <= 1:
        return 0
    return min(DEFAULT_WARMUP_CAP, max(1, round(DEFAULT_WARMUP_FRACTION * total_steps)))


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """One line when warmup covers more than half of the run (the rate barely peaks)."""
    if total_steps > 0 and warmup_steps > total_steps / 2:
        return (
            f"warning: --warmup-steps {warmup_steps} covers more than half of the run's "
            f"{total_steps} steps: the learning rate is still rising for most of it"
        )
    return None


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Linear warmup from lr/warmup to lr, then cosine decay to lr * min_lr_ratio.

    ``lr_at(step)`` is the rate of optimizer step ``step`` (0-based); the last step of the run
    (``total_steps - 1``) reaches the floor exactly.
    """

    learning_rate: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        floor = self.learning_rate * self.min_lr_ratio
        decay_steps = self.total_steps - self.warmup_steps - 1
        if decay_steps <= 0:
            return self.learning_rate
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return floor + 0.5 * (self.learning_rate - floor) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }

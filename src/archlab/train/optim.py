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
Two shapes (``--schedule``): ``cosine`` (warmup, then cosine to the floor at the last step)
and ``wsd`` (warmup-stable-decay: warmup, a constant rate, then a linear decay to the floor
over the last ``--decay-fraction`` of the run; MiniCPM, Hu et al. 2024; Hägele et al. 2024).
Only WSD can be extended honestly: its rate before the decay does not depend on the budget,
so a run resumed from a checkpoint taken before the decay with a larger budget is exactly the
run that had the larger budget from the start. A cosine's every step depends on the total, so
a resume with another budget re-stretches it (``resume_note`` says so, with the numbers).
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


class _Schedule:
    """What every schedule shares: set step ``step``'s rate on every parameter group."""

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


@dataclass(frozen=True)
class WarmupCosineSchedule(_Schedule):
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

    def state_dict(self) -> dict:
        return {
            "name": "cosine",
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }


SCHEDULES = ("cosine", "wsd")
DEFAULT_DECAY_FRACTION = 0.2  # WSD's decay: the last 20% of the run (Hägele et al. 2024)


@dataclass(frozen=True)
class WarmupStableDecaySchedule(_Schedule):
    """Linear warmup to lr, constant lr, then linear decay to lr * min_lr_ratio over the last
    ``round(decay_fraction * total_steps)`` steps (at least 1); the last step reaches the floor.

    The rate of a step before ``decay_start`` depends on the learning rate and the warmup only,
    never on ``total_steps``: the property that lets a resume move the decay to a new end.
    """

    learning_rate: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    decay_fraction: float = DEFAULT_DECAY_FRACTION

    @property
    def decay_start(self) -> int:
        """The first (0-based) step whose rate is below the stable rate."""
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        return max(self.warmup_steps, self.total_steps - decay_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        start = self.decay_start
        if step < start:
            return self.learning_rate
        floor = self.learning_rate * self.min_lr_ratio
        progress = min(1.0, (step - start + 1) / (self.total_steps - start))
        return self.learning_rate - (self.learning_rate - floor) * progress

    def state_dict(self) -> dict:
        return {
            "name": "wsd",
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "decay_fraction": self.decay_fraction,
        }


Schedule = WarmupCosineSchedule | WarmupStableDecaySchedule


def make_schedule(
    name: str,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = DEFAULT_DECAY_FRACTION,
) -> Schedule:
    if name == "wsd":
        return WarmupStableDecaySchedule(
            learning_rate, warmup_steps, total_steps, min_lr_ratio, decay_fraction
        )
    return WarmupCosineSchedule(learning_rate, warmup_steps, total_steps, min_lr_ratio)


def schedule_from_state(state: dict) -> Schedule:
    """A checkpoint's schedule (``state_dict``); checkpoints before WSD existed hold a cosine."""
    return make_schedule(
        state.get("name", "cosine"),
        state["learning_rate"],
        state["warmup_steps"],
        state["total_steps"],
        state.get("min_lr_ratio", 0.1),
        state.get("decay_fraction", DEFAULT_DECAY_FRACTION),
    )


def resume_note(saved: dict | None, schedule: Schedule, step: int) -> str | None:
    """One line when a resume changes the budget: whether the steps already taken had the
    rates the new budget gives them (then the run is the uninterrupted run of the new budget)
    and what the rate does next. None when the budget is unchanged (the resume is exact)."""
    if not saved or saved["total_steps"] == schedule.total_steps or step <= 0:
        return None
    old = schedule_from_state(saved)
    a, b = old.total_steps, schedule.total_steps
    head = f"note: the budget changed from {a:,} to {b:,} steps at step {step:,}"
    was, now = old.lr_at(step), schedule.lr_at(step)
    if all(old.lr_at(s) == schedule.lr_at(s) for s in range(step)):
        tail = (
            f"; the {step:,} steps so far had the rates the new budget gives them, so this "
            f"run continues as an uninterrupted {b:,}-step run would"
        )
        if isinstance(schedule, WarmupStableDecaySchedule):
            tail += f" (wsd: decay from step {schedule.decay_start + 1:,} to {b:,})"
        return head + tail
    if isinstance(schedule, WarmupStableDecaySchedule):
        return head + (
            f"; the checkpoint is inside the {a:,}-step run's decay (from step "
            f"{old.decay_start + 1:,}), so the rate goes back from {was:.3g} to {now:.3g} and "
            f"decays from step {schedule.decay_start + 1:,} to {b:,}: not the same as an "
            f"uninterrupted {b:,}-step run (resume from a checkpoint before step "
            f"{old.decay_start + 1:,} for that)"
        )
    return head + (
        f"; the cosine is re-stretched over the new total: the next rate is {now:.3g} where "
        f"the {a:,}-step run would have used {was:.3g}, and the steps so far had the old "
        f"curve, so this is not the same as an uninterrupted {b:,}-step run "
        f"(--schedule wsd can be extended exactly)"
    )

"""One optimizer step: gradient accumulation, autocast/GradScaler, clipping, the non-finite guard.

Loss normalisation. The loss of a step is the mean cross-entropy over every token that
counts (label != -100) in the whole global batch, whatever the accumulation and the number
of ranks: each micro-batch backpropagates sum(CE) x W / N_global (DDP averages gradients
over the W ranks), so the caller passes N_global for the step.

A step is two calls so that the loop can gather the next batches on the host while the
device works: ``backward`` queues the forward/backward passes, the gradient norm and the
one cross-rank reduction; ``update`` makes the step's single host sync (loss, gradient
norm and the ranks' stop votes come back together) and applies the optimizer update
unless the loss or gradient norm is not finite. With fp16 a finite loss with overflowing
gradients is the GradScaler's business (it skips and lowers its scale), not a NaN step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from . import checkpoint as ckpt_mod
from .device import autocast, to_device
from .distributed import DistInfo, all_reduce_sum

IGNORE_INDEX = -100


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the run stops without writing bad weights."""

    @classmethod
    def at(cls, step: int, streak: int, max_nan_steps: int) -> TrainingDiverged:
        return cls(
            f"stopping at step {step}: {streak} non-finite steps in a row "
            f"(--max-nan-steps {max_nan_steps}); no checkpoint written with bad weights. "
            "Try a lower --learning-rate, --grad-clip or disabling --use-amp"
        )


@dataclass
class PendingStep:
    """A step whose device work is queued but not yet read back."""

    stats: Tensor  # (3,): global sum CE, summed stop votes, this rank's grad norm
    n_tokens: int  # the step's global count of loss tokens
    aux_loss: Tensor | None  # MoE load-balancing loss, mean over micro-batches (device)
    expert_counts: Tensor | None  # (L_moe, E) tokens per expert, summed (device)


@dataclass
class StepResult:
    """What one optimizer step did, on the host."""

    loss: float  # mean CE per counted token of the global batch
    grad_norm: float  # before clipping
    finite: bool  # loss and gradient norm both finite
    applied: bool  # the optimizer (or the fp16 scaler) took the step; False: a NaN step
    stop_votes: float  # sum over ranks of StopRequest.vote()
    aux_loss: Tensor | None
    expert_counts: Tensor | None


class StepRunner:
    """Owns the optimizer, the gradient scaler and the guard's counters of one run.

    ``model`` is the plain module (its parameters are clipped); ``train_model`` is what the
    forward pass calls (the model, its DDP wrapper, or a compiled one); ``ddp`` is the DDP
    wrapper when data parallel, whose ``no_sync`` skips the all-reduce of all micro-batches
    but the last. ``poison_steps``: 1-based steps whose loss a test turns into NaN.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        train_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        dist: DistInfo,
        grad_clip: float,
        autocast_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        ddp: Any = None,
        poison_steps: Collection[int] = frozenset(),
    ) -> None:
        self.model = model
        self.train_model = train_model
        self.optimizer = optimizer
        self.device = device
        self.dist = dist
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        self.ddp = ddp
        self.poison_steps = frozenset(poison_steps)
        self.nan_count = 0  # non-finite steps skipped, whole run
        self.nan_streak = 0  # ... in a row, up to the last step
        self.scaler_skips = 0  # fp16 overflows the scaler skipped

    # ---- the two halves of a step ---------------------------------------------------------
    def backward(
        self, batches: list[tuple[Tensor, Tensor]], n_tokens: int, step: int, stop_vote: float
    ) -> PendingStep:
        """Accumulate gradients over the micro-batches; queue the norm and the reduction.

        This rank's stop vote rides on the loss reduction (no extra collective): every rank
        reads the same sum, so all stop after the same step.
        """
        ce, aux_loss, counts = self.forward_backward(batches, n_tokens, step)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        gnorm = self.grad_norm()
        stats = torch.stack(
            [ce.float(), torch.full((), stop_vote, device=ce.device), gnorm.float().reshape(())]
        )
        if self.dist.enabled:
            stats[0:2] = all_reduce_sum(stats[0:2].clone(), self.dist)
        return PendingStep(stats, n_tokens, aux_loss, counts)

    def update(self, pending: PendingStep) -> StepResult:
        """The step's one host sync, then the guarded optimizer update and zero_grad."""
        ce_sum, votes, gnorm = pending.stats.tolist()
        loss = ce_sum / max(pending.n_tokens, 1)
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        # fp16 only: finite loss, overflowing gradients -> the scaler skips and rescales
        overflow = self.scaler is not None and math.isfinite(loss) and not finite
        applied = finite or overflow
        if applied:
            if self.scaler is not None:
                scale_before = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.scaler.get_scale() < scale_before:
                    self.scaler_skips += 1  # fp16 overflow: the scaler skipped the update
            else:
                self.optimizer.step()
            self.nan_streak = 0
        else:
            self.nan_count += 1
            self.nan_streak += 1
            if self.scaler is not None:
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            loss, gnorm, finite, applied, votes, pending.aux_loss, pending.expert_counts
        )

    def skip_message(self, step: int, result: StepResult) -> str:
        """The warning for a step whose update the guard skipped."""
        return (
            f"step {step}: non-finite loss or gradient norm (loss {result.loss}, grad norm "
            f"{result.grad_norm}); update skipped ({self.nan_streak} in a row, "
            f"{self.nan_count} total)"
        )

    # ---- the parts ------------------------------------------------------------------------
    def forward_backward(
        self, batches: list[tuple[Tensor, Tensor]], n_tokens: int, step: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Accumulate gradients over the micro-batches; returns (sum CE, aux mean, expert counts)."""
        scale = self.dist.world_size / max(n_tokens, 1)
        n_micro = len(batches)
        ce_total = torch.zeros((), device=self.device)
        aux_total: Tensor | None = None
        counts_total: Tensor | None = None
        poison = step + 1 in self.poison_steps
        for i, (x, y) in enumerate(batches):
            x, y = to_device(x, self.device), to_device(y, self.device)  # (B, T) each
            last_micro = i == n_micro - 1
            sync_ctx = (
                self.ddp.no_sync()
                if self.ddp is not None and not last_micro
                else contextlib.nullcontext()
            )
            with sync_ctx:
                with autocast(self.device, self.autocast_dtype):
                    logits, aux = self.train_model(x, return_aux=True)  # (B, T, V)
                    ce = F.cross_entropy(
                        logits.reshape(-1, logits.size(-1)),
                        y.reshape(-1),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                    loss = ce * scale
                    aux_loss = aux.get("aux_loss") if aux else None
                    if aux_loss is not None:
                        loss = loss + aux_loss / n_micro
                if poison:
                    loss = loss * float("nan")
                    ce = ce * float("nan")
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            ce_total += ce.detach().float()
            if aux_loss is not None:
                a = aux_loss.detach().float()
                aux_total = a if aux_total is None else aux_total + a
            if aux and "expert_counts" in aux:
                c = aux["expert_counts"].detach().float()
                counts_total = c if counts_total is None else counts_total + c
        if aux_total is not None:
            aux_total = aux_total / n_micro
        return ce_total, aux_total, counts_total

    def grad_norm(self) -> Tensor:
        """Global gradient norm (clipped to ``grad_clip`` when > 0), still on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if self.grad_clip > 0:
            return nn.utils.clip_grad_norm_(params, self.grad_clip)
        norms = torch._foreach_norm([p.grad for p in params])  # type: ignore[misc]
        return torch.linalg.vector_norm(torch.stack(norms))

    # ---- run state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The step's share of trainer_state.pt (top-level keys of the checkpoint format)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "nan_count": self.nan_count,
            "nan_streak": self.nan_streak,
            "scaler_skips": self.scaler_skips,
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore from a trainer_state.pt dict; ``where`` names the checkpoint in errors."""
        self.nan_count = int(state.get("nan_count", 0))
        self.nan_streak = int(state.get("nan_streak", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt_mod.CheckpointError(
                f"checkpoint {where}: optimizer state does not fit this model ({exc})"
            ) from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

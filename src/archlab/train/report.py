"""Where a run's numbers go: train/eval records, progress lines, summary.json.

- ``LogInterval``: what a train record averages over since the previous one (loss, grad
  norm, MoE aux loss and expert load, tokens/s); a checkpoint saves it (``pending_log``) so
  a resumed run logs exactly what an uninterrupted one would have.
- ``StepTimes``: this process's step times, for the summary's tokens/s (first step apart).
- ``RunLog``: metrics.jsonl (+ TensorBoard/W&B) and the progress sink; rank 0 writes.
- ``run_summary`` / ``failure_summary`` / ``print_summary``: summary.json and its printout,
  which ``archlab compare`` and sweeps read (a failed run says so there too).
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import Interrupted
from .config import TrainConfig
from .flops import flops_per_token, mfu
from .metrics import MetricsWriter, format_bytes, memory_kind, peak_memory_bytes
from .peak import peak, peak_record
from .progress import TrainProgress
from .run_state import RunClock
from .step import StepResult


def _to(t: Any, device: torch.device) -> Tensor | None:
    return t.to(device) if isinstance(t, Tensor) else None


# ---- accumulators ------------------------------------------------------------------------------
@dataclass
class LogInterval:
    """Accumulators of the current log interval (host floats; MoE statistics stay on device)."""

    loss_sum: float = 0.0  # over the steps whose update was applied
    loss_n: int = 0
    gnorm_last: float = math.nan  # the last applied step's grad norm (kept across intervals)
    aux_sum: Tensor | None = None  # MoE aux loss, summed over finite steps
    aux_n: int = 0
    counts: Tensor | None = None  # (L_moe, E) tokens per expert, summed
    seconds: float = 0.0  # step time of the interval (not saved: a resume restarts it)
    tokens: int = 0

    def add(self, result: StepResult, seconds: float, tokens: int) -> None:
        if result.applied:
            self.loss_sum += result.loss
            self.loss_n += 1
            self.gnorm_last = result.grad_norm
        if result.aux_loss is not None and result.finite:
            self.aux_sum = (
                result.aux_loss if self.aux_sum is None else self.aux_sum + result.aux_loss
            )
            self.aux_n += 1
        if result.expert_counts is not None:
            c = result.expert_counts
            self.counts = c if self.counts is None else self.counts + c
        self.seconds += seconds
        self.tokens += tokens

    def reset(self) -> None:
        """Start the next interval (the last grad norm carries over)."""
        self.loss_sum, self.loss_n = 0.0, 0
        self.aux_sum, self.aux_n, self.counts = None, 0, None
        self.seconds, self.tokens = 0.0, 0

    def pending(self) -> dict[str, Any]:
        """The checkpoint's ``pending_log`` (tensors on the host)."""
        d: dict[str, Any] = {
            "loss_sum": self.loss_sum,
            "loss_n": self.loss_n,
            "gnorm_last": self.gnorm_last,
            "aux_n": self.aux_n,
        }
        if self.aux_sum is not None:
            d["aux_sum"] = self.aux_sum.detach().float().cpu()
        if self.counts is not None:
            d["counts"] = self.counts.detach().float().cpu()
        return d

    @classmethod
    def from_pending(cls, d: dict[str, Any] | None, device: torch.device) -> LogInterval:
        """The interval a checkpoint was written in ({} or None: a fresh one)."""
        d = d or {}
        return cls(
            loss_sum=float(d.get("loss_sum", 0.0)),
            loss_n=int(d.get("loss_n", 0)),
            gnorm_last=float(d.get("gnorm_last", math.nan)),
            aux_sum=_to(d.get("aux_sum"), device),
            aux_n=int(d.get("aux_n", 0)),
            counts=_to(d.get("counts"), device),
        )


@dataclass
class StepTimes:
    """Pure step time of this process (no eval/checkpoint); the first step holds compilation
    and warm-up, so tokens/s leaves it out when there are others."""

    first_s: float | None = None
    rest_s: float = 0.0
    steps: int = 0  # steps this process ran

    def add(self, seconds: float) -> None:
        self.steps += 1
        if self.first_s is None:
            self.first_s = seconds
        else:
            self.rest_s += seconds

    def tokens_per_s(self, tokens_per_step: int) -> float:
        steps_run = self.steps
        timed_steps = steps_run - 1 if steps_run > 1 else steps_run
        timed = self.rest_s if steps_run > 1 else (self.first_s or 0.0)
        return timed_steps * tokens_per_step / timed if timed > 0 else 0.0


# ---- the sink ----------------------------------------------------------------------------------
class RunLog:
    """Train/eval records into metrics.jsonl and the progress sink; ``writer`` is None off rank 0
    (whose progress is "off"), so other ranks log nothing but also need no checks."""

    def __init__(
        self,
        *,
        writer: MetricsWriter | None,
        progress: TrainProgress,
        device: torch.device,
        tokens_per_step: int,
    ) -> None:
        self.writer = writer
        self.progress = progress
        self.device = device
        self.tokens_per_step = tokens_per_step

    @classmethod
    def open(
        cls,
        *,
        run_dir: Path,
        train_cfg: TrainConfig,
        model_cfg: ModelConfig,
        device: torch.device,
        first_step: int,
        total_steps: int,
        tokens_per_step: int,
        resumed: bool,
        is_main: bool,
        progress: bool | str,
    ) -> RunLog:
        """metrics.jsonl (rank 0; a resumed run continues after ``first_step``) and the
        progress sink; ``progress``: True, False (quiet) or a mode of archlab.progress."""
        writer = None
        if is_main:
            writer = MetricsWriter(
                run_dir,
                tensorboard=train_cfg.tensorboard,
                wandb=train_cfg.wandb,
                run_name=run_dir.name,
                config={"train": train_cfg.to_dict(), "model": model_cfg.to_dict()},
                resume_step=first_step if resumed else None,
            )
        mode = progress if isinstance(progress, str) else None
        sink = TrainProgress(
            total_steps=total_steps,
            initial_step=first_step,
            tokens_per_step=tokens_per_step,
            desc=f"train {model_cfg.architecture}",
            log_interval=train_cfg.log_interval,
            mode=("off" if not (is_main and progress) else mode),
        )
        return cls(writer=writer, progress=sink, device=device, tokens_per_step=tokens_per_step)

    def start(self, model_summary: str, run_dir: Path | None, note: str) -> None:
        """The banner before the first step (model summary, run folder, budget)."""
        self.progress.start(model_summary, run_dir, note)

    def step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.progress.step(step, loss, lr, seconds)

    def note(self, text: str) -> None:
        """An informational line (silenced by --quiet); rank 0 only."""
        if self.writer is not None:
            self.progress.message(text, progress=True)

    def warn(self, text: str) -> None:
        """A warning line (printed also with --quiet); rank 0 only."""
        if self.writer is not None:
            self.progress.message(text)

    def train(
        self,
        step: int,
        lr: float,
        interval: LogInterval,
        *,
        grad_norm: float,
        nan_count: int,
        scaler_skips: int | None,
        elapsed_s: float,
        show: bool = True,
    ) -> None:
        """One train record from the interval; ``show``: also the progress line."""
        if self.writer is None:
            return
        rec: dict[str, Any] = {
            "kind": "train",
            "step": step,
            "tokens": step * self.tokens_per_step,
            "loss": interval.loss_sum / interval.loss_n if interval.loss_n else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": interval.tokens / interval.seconds if interval.seconds > 0 else 0.0,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "elapsed_s": elapsed_s,
            "nan_count": nan_count,
        }
        if scaler_skips is not None:
            rec["scaler_skips"] = scaler_skips
        if interval.aux_sum is not None and interval.aux_n:
            rec["aux_loss"] = float(interval.aux_sum.item()) / interval.aux_n
        if interval.counts is not None:
            counts = interval.counts
            load = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)  # (L_moe, E)
            rec["expert_load"] = [[round(v, 5) for v in row] for row in load.tolist()]
        self.writer.log(rec)
        if show:
            self.progress.log(step, rec, lr)

    def eval(self, step: int, val_loss: float, elapsed_s: float) -> None:
        if self.writer is None:
            return
        self.writer.log(
            {
                "kind": "eval",
                "step": step,
                "tokens": step * self.tokens_per_step,
                "val_loss": val_loss,
                "elapsed_s": elapsed_s,
            }
        )
        self.progress.eval(step, val_loss)

    def end_progress(self) -> None:
        """The bar ends before the summary prints."""
        self.progress.close()

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            with contextlib.suppress(OSError):  # a full disk was reported already
                self.writer.close()


# ---- summary.json ------------------------------------------------------------------------------
def run_summary(
    *,
    model: nn.Module,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    steps: int,
    tokens_per_step: int,
    seq_len: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    peak_mem: int,
    mem_before_model: int | None,
    clock: RunClock,
    times: StepTimes,
    val_loss: float | None,
    nan_count: int,
    scaler_skips: int,
    entropy_floor: float | None,
    stopped_by: int | None,
    checkpoint: Path | None,
    data_dir: Path,
    resumed_from: Path | None,
) -> dict[str, Any]:
    """summary.json of a run that ended normally or on a stop signal ("interrupted")."""
    tokens_per_s = times.tokens_per_s(tokens_per_step)
    fpt = flops_per_token(model, seq_len)
    dev_peak = peak(device, autocast_dtype or torch.float32)
    return {
        "architecture": model_cfg.architecture,
        "total_params": model.num_parameters(),
        "active_params": model.num_active_parameters(),
        "steps": steps,
        "tokens_seen": steps * tokens_per_step,
        "train_time_s": clock.this_process(),
        "tokens_per_s": tokens_per_s,
        "peak_mem_bytes": peak_mem,
        "mem_before_model_bytes": mem_before_model,
        "model_mem_bytes": max(0, peak_mem - mem_before_model)
        if mem_before_model is not None
        else None,
        "memory_kind": memory_kind(device),
        "final_val_loss": val_loss,
        "nan_count": nan_count,
        "mfu": mfu(fpt, tokens_per_s, dev_peak.flops, world_size),
        "entropy_floor": entropy_floor,
        "status": "ok" if stopped_by is None else "interrupted",
        "error": None,
        "interrupted_by": signal.Signals(stopped_by).name if stopped_by else None,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "model_config": model_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        # extra context for reports
        "seq_len": seq_len,
        "world_size": world_size,
        "device": str(device),
        "amp_dtype": str(autocast_dtype).replace("torch.", "") if autocast_dtype else None,
        "flops_per_token": fpt,
        **peak_record(dev_peak),
        "first_step_s": times.first_s,
        "steps_this_process": times.steps,
        "elapsed_s": clock.elapsed(),
        "scaler_skips": scaler_skips,
        "data_dir": str(data_dir),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "init_from": train_cfg.init_from,
    }


def run_context(meta: dict[str, Any], recipe: str | None, val_loss: float | None) -> dict[str, Any]:
    """What a final loss is read against: the data's unigram and bigram entropies (meta.json)
    and whether the run learned (LEARNED_MARGIN below the unigram), and the model's recipe."""
    from ..data.baselines import learned

    def finite(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    unigram, bigram = finite(meta.get("unigram_entropy")), finite(meta.get("bigram_entropy"))
    return {
        "recipe": recipe,
        "unigram_entropy": unigram,
        "bigram_entropy": bigram,
        "learned": learned(val_loss, unigram),
    }


def failure_summary(
    exc: BaseException,
    *,
    model_cfg: ModelConfig | None,
    model: nn.Module | None,
    steps: int,
    tokens_per_step: int,
    train_time_s: float,
    peak_mem_bytes: int,
    nan_count: int,
    entropy_floor: float | None,
    train_cfg: TrainConfig,
) -> dict[str, Any]:
    """summary.json with status "failed" (or "interrupted") so a sweep reports the run honestly;
    whatever setup had not reached yet is None."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        msg = str(exc) if isinstance(exc, Interrupted) else "interrupted"
    return {
        "architecture": model_cfg.architecture if model_cfg else None,
        "total_params": model.num_parameters() if model is not None else None,
        "active_params": model.num_active_parameters() if model is not None else None,
        "steps": steps,
        "tokens_seen": steps * tokens_per_step,
        "train_time_s": train_time_s,
        "tokens_per_s": None,
        "peak_mem_bytes": peak_mem_bytes,
        "final_val_loss": None,
        "nan_count": nan_count,
        "mfu": None,
        "entropy_floor": entropy_floor,
        "status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
        "error": f"{type(exc).__name__}: {msg}",
        "model_config": model_cfg.to_dict() if model_cfg else None,
        "train_config": train_cfg.to_dict(),
    }


def _baseline_lines(s: dict[str, Any]) -> list[str]:
    """The baselines beside the final loss, and "did not learn" when it is not below them."""
    from ..data.baselines import LEARNED_MARGIN

    uni, bi = s.get("unigram_entropy"), s.get("bigram_entropy")
    lines = []
    if uni is not None:
        lines.append(
            f"Baselines: unigram entropy {uni:.4f}"
            + (f", bigram entropy {bi:.4f}" if bi is not None else "")
            + " nats/token"
        )
    if s.get("learned") is False:
        lines.append(
            f"Did not learn: the final val loss is not {LEARNED_MARGIN:g} nats below the "
            "unigram entropy (raise the budget or the learning rate)"
        )
    cfg = s.get("train_config") or {}
    if cfg.get("learning_rate") is not None:
        lines.append(
            f"Learning rate: {cfg['learning_rate']:g} ({cfg.get('learning_rate_source') or 'given'})"
        )
    if s.get("recipe"):
        lines.append(f"Recipe: {s['recipe']}")
    return lines


def print_summary(s: dict[str, Any], run_dir: Path | None) -> None:
    """The human summary on stdout (the seed documents' "Training Summary" block)."""
    floor = s["entropy_floor"]
    active = s["active_params"]
    lines = [
        "=== Training Summary ===",
        f"Architecture: {s['architecture']} ({s['total_params']:,} parameters"
        + (f", {active:,} active" if active != s["total_params"] else "")
        + ")",
        f"Steps: {s['steps']} ({s['tokens_seen']:,} tokens)",
        f"Training time: {s['train_time_s']:.1f} s",
        f"Peak memory: {format_bytes(s['peak_mem_bytes'])}"
        + (
            f" ({format_bytes(s['model_mem_bytes'])} over the process before the model)"
            if s.get("model_mem_bytes") is not None
            else ""
        ),
        f"Final validation loss: {s['final_val_loss']:.4f}"
        + (f" (entropy floor {floor:.4f})" if isinstance(floor, (int, float)) else ""),
        *_baseline_lines(s),
        f"Tokens/s: {s['tokens_per_s']:,.0f}",
        f"NaN/Inf steps skipped: {s['nan_count']}",
        f"MFU: {100 * s['mfu']:.2f}% (of {s['peak_flops'] / 1e9:,.1f} GFLOP/s per device, "
        f"{s['peak_flops_source']}: {s['peak_flops_how']})",
        f"Run folder: {run_dir}",
        "========================",
    ]
    print("\n".join(lines))

"""The end of a run: the last evaluation and checkpoint where the loop left none, and
summary.json (also on failure, so a sweep reports the run honestly). Functions of the
Trainer, kept apart so trainer.py stays the order of setup and the loop."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import checkpoint as ckpt_mod
from .distributed import all_reduce_max
from .estimate import Estimate
from .metrics import peak_memory_bytes, write_json_atomic
from .report import LogInterval, StepTimes, failure_summary, print_summary, run_context, run_summary

if TYPE_CHECKING:
    from .step import StepRunner
    from .trainer import Trainer


def finish_run(
    t: Trainer,
    *,
    run_estimate: Estimate | None,
    val_loss: float,
    evaluated: bool,
    saved: bool,
    data_rng: Tensor,
    interval: LogInterval,
    times: StepTimes,
) -> dict[str, Any]:
    """Final evaluation and checkpoint if the loop's last step had none; summary.json."""
    stopped = t.stopped_by is not None
    if not evaluated and not stopped:  # resumed a finished run
        val_loss, evaluated = t.evaluator.evaluate(), True
    checkpoint = None
    if not saved and t.step > 0:
        checkpoint = t._save(data_rng, interval.pending() if stopped else None)
    elif t.dist.is_main and t.step > 0:
        checkpoint = ckpt_mod.latest_checkpoint(t.run_dir)  # type: ignore[arg-type]
    peak_mem = peak_memory_bytes(t.device)
    if t.dist.enabled:  # the largest process's peak
        box = torch.tensor([float(peak_mem)], device=t.device)
        peak_mem = int(all_reduce_max(box, t.dist).item())
    summary = run_summary(
        model=t.model,
        model_cfg=t.model_cfg,  # type: ignore[arg-type]
        train_cfg=t.cfg,
        steps=t.step,
        tokens_per_step=t.tokens_per_step,
        seq_len=t.seq_len,
        world_size=t.dist.world_size,
        device=t.device,
        autocast_dtype=t.autocast_dtype,
        peak_mem=peak_mem,
        mem_before_model=t.mem_before_model,
        clock=t.clock,
        times=times,
        val_loss=val_loss if evaluated else None,
        nan_count=t.stepper.nan_count,
        scaler_skips=t.stepper.scaler_skips,
        entropy_floor=t.meta.get("entropy_floor"),
        stopped_by=t.stopped_by,
        checkpoint=checkpoint,
        data_dir=t.data_dir,
        resumed_from=t.resume_ckpt,
    )
    summary.update(run_context(t.meta, t.recipe, val_loss if evaluated else None))
    if run_estimate is not None:  # the warm-up (compilation) is outside train_time_s
        summary["warmup_s"] = run_estimate.warmup_s
        summary["estimated_s"] = run_estimate.seconds
    if t.dist.is_main:
        write_json_atomic(t.run_dir / "summary.json", summary)  # type: ignore[operator]
        t.summary_written = True
        if t.report and not stopped:
            print_summary(summary, t.run_dir)
    return summary


def write_failure(t: Trainer, exc: BaseException) -> None:
    """summary.json with status "failed" so a sweep can report the run honestly."""
    if t.summary_written or not t.owns_run_dir or not t.dist.is_main:
        return
    if t.run_dir is None or not t.run_dir.exists():
        return
    stepper: StepRunner | None = getattr(t, "stepper", None)  # None: setup failed first
    summary = failure_summary(
        exc,
        model_cfg=t.model_cfg,
        model=t.model,
        steps=t.step,
        tokens_per_step=t.tokens_per_step,
        train_time_s=t.clock.this_process(),
        peak_mem_bytes=peak_memory_bytes(t.device),
        nan_count=stepper.nan_count if stepper is not None else 0,
        entropy_floor=t.meta.get("entropy_floor"),
        train_cfg=t.cfg,
    )
    summary.update(run_context(t.meta, t.recipe, None))
    with contextlib.suppress(OSError):
        write_json_atomic(t.run_dir / "summary.json", summary)
        t.summary_written = True

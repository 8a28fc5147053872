"""The training loop: one run from a TrainConfig and a model spec to a run folder.

``run_training`` resolves the data, builds (or restores) the model, and trains it with
AdamW under a warmup + cosine schedule, gradient accumulation, clipping, optional AMP,
torch.compile and gradient checkpointing, data parallelism under torchrun, a non-finite
guard, periodic evaluation on a fixed validation set, atomic checkpoints and exact resume.

This file is the order of setup and the loop; the parts live beside it: ``setup.py`` (the
setup steps), ``step.py`` (``StepRunner``: accumulation, AMP, clipping, the NaN guard),
``evaluate.py``, ``run_state.py`` (checkpoint content, resume, RNG, data position),
``report.py`` (log interval, metrics/progress sink, summary.json), ``finish.py`` (the last
evaluation and checkpoint, summary.json at the end or on failure), ``stop.py``, ``hooks.py``.

Batches and ranks. Each optimizer step consumes ``gradient_accumulation_steps`` global
micro-batches of ``batch_size x world_size`` windows drawn from one shared torch.Generator
(seeded identically on every rank); rank r trains on rows [r*B, (r+1)*B) of each. So every
rank sees different data, and a run on W processes trains on exactly the samples a single
process would with ``--batch-size`` W times larger: the two are comparable step by step.
Without a loss mask the step's count of loss tokens is known in advance; with one (chat) it
is summed from the labels on the host before the forward pass, so no extra device sync.

Host syncs. One per optimizer step: the step's loss and gradient norm come back together
(needed for the non-finite guard); everything else (MoE statistics, timing) is read at log
intervals. The next step's batches are gathered from the memmap while the device works.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..recipes import recipe_label
from . import checkpoint as ckpt_mod
from .config import TrainConfig
from .device import amp_dtype, device_type, pick_device
from .distributed import all_reduce_sum, init_distributed, shutdown
from .estimate import Estimate, estimate, warm_up
from .evaluate import Evaluator, eval_batches
from .finish import finish_run, write_failure
from .flops import flops_per_token
from .hooks import DebugHooks
from .lr_table import rate_for_model
from .metrics import (
    check_logging_backends,
    reset_peak_memory,
)
from .model_spec import ModelSpec, as_spec, requested_architecture, requested_preset
from .optim import resume_note, warmup_warning
from .report import (
    LogInterval,
    RunLog,
    StepTimes,
)
from .run_state import (
    GlobalBatchSampler,
    RunCheckpointer,
    RunClock,
    check_resumed_budget,
    restore_run,
)
from .setup import (
    FolderClaims,
    build_optimization,
    build_run_model,
    check_seq_len_early,
    check_steps_left,
    checkpoint_model_config,
    claim_run_dir,
    fit_to_seq_len,
    open_datasets,
    prepare_data,
    resolve_budget,
    resolve_model_config,
    resolve_start,
    wrap_model,
)
from .step import IGNORE_INDEX, StepResult, StepRunner, TrainingDiverged
from .stop import StopRequest

__all__ = ["DebugHooks", "ModelSpec", "Trainer", "TrainingDiverged", "amp_dtype", "run_training"]


class Trainer:
    """Holds the state of one run; ``fit()`` trains to the step budget and writes summary.json."""

    def __init__(
        self,
        train_cfg: TrainConfig,
        model: ModelConfig | ModelSpec | dict[str, Any] | None = None,
        *,
        resume: str | bool | None = None,
        explicit: frozenset[str] | set[str] = frozenset(),
        hooks: DebugHooks | None = None,
        progress: bool | str = True,
        report: bool | None = None,
    ) -> None:
        self.hooks = hooks or DebugHooks()
        # progress: True (bar on a terminal, plain lines elsewhere), False (quiet) or a mode of
        # archlab.progress; report: print the final summary (default: when progress is on)
        self.progress = progress
        self.report = bool(progress) if report is None else report
        self.summary_written = False
        self.owns_run_dir = False
        self.stopped_by: int | None = None  # the signal that ended fit() early
        # What setup has reached so far; a failure's summary reports what exists.
        self.run_dir: Path | None = None
        self.model_cfg: ModelConfig | None = None
        self.recipe: str | None = None
        self.model: Any = None
        self.meta: dict[str, Any] = {}
        self.step = 0
        self.tokens_per_step = 0
        self.log: RunLog | None = None
        self.clock = RunClock()
        self.cfg = train_cfg.replace().validate()  # a copy: the run fills in out_dir etc.
        check_logging_backends(self.cfg.tensorboard, self.cfg.wandb)
        self.dist = init_distributed(device_type(self.cfg.device))
        self.device = pick_device(self.cfg.device, self.dist.local_rank)
        self.claims = FolderClaims(self.dist)
        self.stop = StopRequest(is_main=self.dist.is_main)
        try:
            self._setup(model, resume, frozenset(explicit))
        except BaseException as exc:
            self._write_failure(exc)
            self.release()
            raise

    def release(self) -> None:
        """Give the run folders' locks back (the OS does it anyway when the process ends)."""
        self.claims.release()

    # ---- setup ---------------------------------------------------------------------------
    def _setup(self, model_arg: Any, resume: str | bool | None, explicit: frozenset[str]) -> None:
        spec = as_spec(model_arg)
        # 1. Where we start from: a checkpoint to resume, one to initialise from, or nothing.
        self.start = start = resolve_start(self.cfg, resume, explicit, self.claims)
        self.cfg, self.resume_ckpt = start.cfg, start.resume_ckpt
        if self.cfg.num_threads is not None:  # after a resume merged the run's saved setting
            torch.set_num_threads(self.cfg.num_threads)
        # 2. Before any folder is made or data prepared: explicit model settings must fit a
        # checkpoint we continue from, a resume must have steps left, --seq-len must fit.
        ckpt_cfg = checkpoint_model_config(start, model_arg, spec)
        check_steps_left(start, self.dist.world_size)
        check_seq_len_early(self.cfg, model_arg, spec, ckpt_cfg)
        # 3. The run folder, locked. From here a failure is this run's own and is recorded in
        # its summary.json; a resumed run's folder only once its checkpoint is restored. Then
        # the data, tokenized with the source checkpoint's tokenizer.
        arch = requested_architecture(spec, model_arg)
        self.run_dir = claim_run_dir(self.cfg, start, arch, self.dist, self.claims)
        self.stop.run_dir = self.run_dir
        self.owns_run_dir = start.resume_ckpt is None
        preset = requested_preset(spec, model_arg, ckpt_cfg)
        verbose = bool(self.progress)
        self.data_dir, self.meta = prepare_data(self.cfg, start, preset, self.dist, verbose)
        # 4. The model configuration, the sequence length and the step budget; the datasets.
        vocab = int(self.meta["vocab_size"])
        self.model_cfg = resolve_model_config(model_arg, spec, ckpt_cfg, vocab, self.data_dir)
        budget = resolve_budget(self.cfg, self.model_cfg, self.dist.world_size, self.meta)
        self.seq_len, self.total_steps = budget.seq_len, budget.total_steps
        self.tokens_per_step = budget.tokens_per_step
        if start.state is not None:
            check_resumed_budget(
                self.cfg, start.state, self.total_steps, ckpt_mod.run_dir_of(start.resume_ckpt)
            )
        fresh = ckpt_cfg is None and not isinstance(model_arg, ModelConfig)
        self.model_cfg, window_warning = fit_to_seq_len(
            self.model_cfg, self.seq_len, frozenset(spec.overrides), fresh
        )
        recipe = spec.resolved_recipe
        if isinstance(model_arg, ModelConfig) or ckpt_cfg is not None:  # read off the model
            recipe = "modern" if recipe_label(self.model_cfg, "modern") == "modern" else recipe
        self.recipe = recipe_label(self.model_cfg, recipe)
        if self.cfg.learning_rate is None:  # the shipped table's rate for this model
            choice = rate_for_model(self.model_cfg, spec.model_size, recipe)
            self.cfg.learning_rate = choice.rate
            self.cfg.learning_rate_source = choice.source
        elif self.cfg.learning_rate_source is None:
            self.cfg.learning_rate_source = "given (--learning-rate)"
        warning = warmup_warning(self.cfg.warmup_steps, self.total_steps)  # type: ignore[arg-type]
        if warning and self.dist.is_main and self.progress:  # --quiet: errors only
            print(warning, file=sys.stderr)
        if window_warning and self.dist.is_main:
            print(window_warning, file=sys.stderr)
        self.train_ds, self.val_ds = open_datasets(self.data_dir, self.seq_len, self.dist)
        self.has_mask = bool(self.meta.get("has_mask"))
        self.sampler = GlobalBatchSampler(
            self.train_ds, self.cfg.batch_size, self.seq_len, self.cfg.seed
        )
        # 5. Model, optimizer, schedule, precision, wrappers; the step, evaluation, checkpoints.
        self._build_model(start.source)
        self._build_parts()
        # 6. On resume: optimizer, guard counters, RNGs and data position from the checkpoint.
        if start.state is not None:
            self.step, self.clock = restore_run(
                start.state,
                stepper=self.stepper,
                sampler=self.sampler,
                dist=self.dist,
                where=start.resume_ckpt,  # type: ignore[arg-type]
            )
            note = resume_note(start.state.get("schedule"), self.schedule, self.step)
            if note and self.dist.is_main and self.progress:
                print(note, file=sys.stderr)
        self.owns_run_dir = True

    def _build_model(self, source: Path | None) -> None:
        """The model (seeded; weights from ``source`` if any), optimizer, schedule, precision."""
        cfg = self.cfg
        self.model, self.mem_before_model = build_run_model(
            self.model_cfg, source, cfg, self.device, self.dist.rank
        )
        self.optimizer, self.schedule = build_optimization(
            self.model, cfg, self.total_steps, self.device
        )
        self.autocast_dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if cfg.use_amp:
            self.autocast_dtype, needs_scaler = amp_dtype(self.device)
            if needs_scaler:
                self.scaler = torch.amp.GradScaler(self.device.type)

    def _build_parts(self) -> None:
        """The wrappers (DDP/compile), then the step, the evaluator and the checkpointer."""
        cfg = self.cfg
        train_model, eval_model, ddp = wrap_model(
            self.model, cfg.use_compile, self.dist, self.device
        )
        self.stepper = StepRunner(
            model=self.model,
            train_model=train_model,
            optimizer=self.optimizer,
            device=self.device,
            dist=self.dist,
            grad_clip=cfg.grad_clip,
            autocast_dtype=self.autocast_dtype,
            scaler=self.scaler,
            ddp=ddp,
            poison_steps=self.hooks.nan_at_steps,
        )
        batches = eval_batches(
            self.val_ds, cfg.batch_size, self.seq_len, cfg.eval_steps, cfg.eval_seed, self.dist
        )
        self.evaluator = Evaluator(
            self.model, eval_model, batches, self.device, self.dist, self.autocast_dtype
        )
        self.checkpointer = RunCheckpointer(
            run_dir=self.run_dir,  # type: ignore[arg-type]
            model=self.model,
            model_cfg=self.model_cfg,  # type: ignore[arg-type]
            train_cfg=cfg,
            data_dir=self.data_dir,
            data_hash=self.meta.get("hash"),
            dist=self.dist,
            before_swap_delay_s=self.hooks.save_delay_s,
        )

    def _open_log(self) -> RunLog:
        """metrics.jsonl (rank 0) and the progress sink; opened by fit(), closed at its end."""
        return RunLog.open(
            run_dir=self.run_dir,  # type: ignore[arg-type]
            train_cfg=self.cfg,
            model_cfg=self.model_cfg,  # type: ignore[arg-type]
            device=self.device,
            first_step=self.step,
            total_steps=self.total_steps,
            tokens_per_step=self.tokens_per_step,
            resumed=self.resume_ckpt is not None,
            is_main=self.dist.is_main,
            progress=self.progress,
        )

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.stop.install()
        try:
            return self._fit()
        except BaseException as exc:
            self._write_failure(exc)
            raise
        finally:
            if self.log is not None:
                self.log.end_progress()
            self.stop.restore()
            if self.log is not None:
                self.log.close()
            shutdown(self.dist)
            self.release()

    def _fit(self) -> dict[str, Any]:
        cfg, stepper = self.cfg, self.stepper
        self.log = log = self._open_log()
        self.model.train()
        data_rng = self.sampler.position()  # the data position before the batches
        batches, n_tok = self._draw_step() if self.step < self.total_steps else ([], 0)
        # Kernels compile here, before the clock; the estimate comes from the warm pass.
        run_estimate = self._estimate(batches[0]) if batches else None
        reset_peak_memory(self.device)
        self.clock.start()
        log.start(self.model.summary(), self.run_dir, f"device {self.device}")
        if run_estimate is not None:
            log.note(run_estimate.line())
            for warning in run_estimate.warnings():
                log.warn(f"archlab train: {warning}")
        # A resumed run continues the log interval its checkpoint was written in.
        interval = LogInterval.from_pending(
            (self.start.state or {}).get("pending_log"), self.device
        )
        times = StepTimes()
        val_loss, last_eval_step = float("nan"), -1
        last_ckpt_step = self.step if self.resume_ckpt is not None else -1

        while self.step < self.total_steps:
            t0 = time.perf_counter()
            lr = self.schedule.apply(self.optimizer, self.step)
            pending = stepper.backward(batches, n_tok, self.step, self.stop.vote())
            # Draw the next step's batches on the host while the device finishes this one.
            next_rng = self.sampler.position()
            upcoming = self._draw_step() if self.step + 1 < self.total_steps else ([], 0)
            result = stepper.update(pending)  # the step's one host sync
            self.step += 1
            data_rng, (batches, n_tok) = next_rng, upcoming
            dt = time.perf_counter() - t0
            times.add(dt)
            interval.add(result, dt, self.tokens_per_step)
            log.step(self.step, result.loss, lr, dt)
            self._guard(result, lr, interval)

            last = self.step == self.total_steps
            if self.step % cfg.log_interval == 0 or last:
                self._log_train(lr, interval, interval.gnorm_last)
                interval.reset()
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                val_loss, last_eval_step = self.evaluator.evaluate(), self.step
                log.eval(self.step, val_loss, self.clock.elapsed())
            if (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or last:
                self._save(data_rng, interval.pending())
                last_ckpt_step = self.step
            self.hooks.after_step(self.step)
            # Every rank voted with its loss reduction; one process also sees a signal that
            # came during this step's evaluation or checkpoint.
            votes = result.stop_votes if self.dist.enabled else self.stop.vote()
            if votes > 0 and not last:  # a stop signal: this step was the last one
                self.stopped_by = StopRequest.signal_of(votes)
                break
        log.end_progress()
        return self._finish(
            run_estimate=run_estimate,
            val_loss=val_loss,
            evaluated=last_eval_step == self.step,
            saved=last_ckpt_step == self.step,
            data_rng=data_rng,
            interval=interval,
            times=times,
        )

    def _estimate(self, batch: tuple[Tensor, Tensor]) -> Estimate:
        """Warm-up passes on this rank's first micro-batch (train/estimate.py); the estimate."""
        x, y = batch
        cold, warm = warm_up(self.model, x, y, self.device, self.autocast_dtype)
        cfg, world = self.cfg, self.dist.world_size
        steps = self.total_steps - self.step
        evals = steps // cfg.eval_interval + 1 if cfg.eval_interval else 1
        fpt = flops_per_token(self.model, self.seq_len)
        given = self.hooks.flops_per_s
        return estimate(
            model=self.model,
            optimizer=self.optimizer,
            flops_per_token=fpt,
            micro_batch_tokens=x.numel() * world,
            warm_s=warm,
            cold_s=cold,
            steps=steps,
            tokens_per_step=self.tokens_per_step,
            eval_tokens=evals * cfg.eval_steps * cfg.batch_size * self.seq_len * world,
            device=self.device,
            run_dir=self.run_dir,  # type: ignore[arg-type]
            keep_checkpoints=cfg.keep_checkpoints,
            flops_per_s=given,
        )

    def _draw_step(self) -> tuple[list[tuple[Tensor, Tensor]], int]:
        """This rank's micro-batches for one step, and the step's global count of loss tokens."""
        batches = [self.sampler.next() for _ in range(self.cfg.gradient_accumulation_steps)]
        if not self.has_mask:
            return batches, self.tokens_per_step
        local = torch.tensor([float(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches))])
        if self.dist.enabled:
            local = all_reduce_sum(local.to(self.device), self.dist).cpu()
        return batches, int(local.item())

    def _guard(self, result: StepResult, lr: float, interval: LogInterval) -> None:
        """Report a skipped non-finite step; stop the run after ``max_nan_steps`` in a row."""
        if not result.applied:
            self.log.warn(self.stepper.skip_message(self.step, result))  # type: ignore[union-attr]
        if self.stepper.nan_streak >= self.cfg.max_nan_steps:
            self._log_train(lr, interval, result.grad_norm, show=False)
            raise TrainingDiverged.at(self.step, self.stepper.nan_streak, self.cfg.max_nan_steps)

    def _log_train(
        self, lr: float, interval: LogInterval, grad_norm: float, show: bool = True
    ) -> None:
        skips = self.stepper.scaler_skips if self.scaler is not None else None
        self.log.train(  # type: ignore[union-attr]
            self.step,
            lr,
            interval,
            grad_norm=grad_norm,
            nan_count=self.stepper.nan_count,
            scaler_skips=skips,
            elapsed_s=self.clock.elapsed(),
            show=show,
        )

    def _save(self, data_rng: Tensor, pending_log: dict[str, Any] | None) -> Path | None:
        """Checkpoint after ``self.step`` steps (all ranks call it; rank 0 gets the path)."""
        return self.checkpointer.save(
            step=self.step,
            tokens_per_step=self.tokens_per_step,
            stepper=self.stepper,
            schedule=self.schedule,
            data_rng=data_rng,
            elapsed_s=self.clock.elapsed(),
            pending_log=pending_log,
        )

    # ---- the end (finish.py) --------------------------------------------------------------
    def _finish(self, **kw: Any) -> dict[str, Any]:
        return finish_run(self, **kw)

    def _write_failure(self, exc: BaseException) -> None:
        write_failure(self, exc)


def run_training(
    train_cfg: TrainConfig,
    model: ModelConfig | ModelSpec | dict[str, Any] | None = None,
    *,
    resume: str | bool | None = None,
    explicit: frozenset[str] | set[str] = frozenset(),
    hooks: DebugHooks | None = None,
    progress: bool | str = True,
    report: bool | None = None,
) -> dict[str, Any]:
    """Train one run and return its summary (also written to RUN/summary.json).

    ``model`` is a ModelConfig, a ModelSpec, or a dict of ``preset_config`` arguments
    (``architecture``, ``model_size``, ``preset`` and ModelConfig fields); the vocabulary
    comes from the data unless ``vocab_size`` is given. ``resume`` is a run or checkpoint
    folder, or True for ``train_cfg.out_dir``. ``explicit`` names the TrainConfig fields the
    caller set on purpose (checked against a resumed run's saved configuration).
    ``progress``: live bar / plain lines on stderr (False: quiet); ``report``: print the
    final summary on stdout (default: when ``progress``).
    """
    kw = {"resume": resume, "explicit": explicit, "hooks": hooks, "report": report}
    return Trainer(train_cfg, model, progress=progress, **kw).fit()

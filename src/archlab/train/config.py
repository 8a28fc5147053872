"""Training configuration: the protocol knobs of one run (the model's live in ModelConfig).

Precedence when the CLI builds one: dataclass defaults < ``--config FILE`` < explicit flags.
``TrainConfig`` is stored in every checkpoint (``trainer_state.pt``) and in ``summary.json``,
so it holds only JSON-able primitives.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

STAGES = ("language", "code", "chat")
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    """Everything about how a model is trained, independent of its architecture."""

    stage: str = "language"
    data: str | None = (
        None  # prepared dir, built-in source name or local files; None: stage default
    )
    out_dir: str | None = None  # None: runs/<architecture>-<stage>-<timestamp>
    seed: int = 0
    device: str = "auto"
    # batch and budget
    batch_size: int = 8  # sequences per micro-batch per process
    gradient_accumulation_steps: int = 1
    seq_len: int | None = None  # None: the model's max_seq_len
    num_epochs: int = 1
    steps_per_epoch: int = 1000
    max_tokens: int | None = None  # a token budget; overrides num_epochs * steps_per_epoch
    # optimiser and schedule
    # None: the shipped table's rate for the model (train/lr_table.py), chosen at setup
    learning_rate: float | None = None
    learning_rate_source: str | None = None  # where the rate came from (summary, reports)
    min_lr_ratio: float = 0.1  # the schedule decays to learning_rate * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay; extendable on resume)
    decay_fraction: float = 0.2  # wsd: the decay takes the last 20% of the run
    warmup_steps: int | None = None  # None: 5% of the run, at most 100 (optim.default_warmup_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    max_nan_steps: int = 10  # stop after this many non-finite steps in a row
    # speed
    use_amp: bool = False
    use_compile: bool = False
    use_gradient_checkpointing: bool = False
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_steps: int = 20
    eval_seed: int = 0  # the fixed validation batches; the same for every run and seed
    log_interval: int = 10
    checkpoint_interval: int = 1000  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    tensorboard: bool = False
    wandb: bool = False
    # staged training
    init_from: str | None = None  # checkpoint or run folder whose weights start this run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the offending flag; return self for chaining."""
        if self.stage not in STAGES:
            raise ConfigError(
                f"--stage: unknown stage {self.stage!r} (allowed: {', '.join(STAGES)})"
            )
        if self.device not in DEVICES:
            raise ConfigError(
                f"--device: unknown device {self.device!r} (allowed: {', '.join(DEVICES)})"
            )
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
            ("--num-epochs", self.num_epochs),
            ("--steps-per-epoch", self.steps_per_epoch),
            ("--eval-steps", self.eval_steps),
            ("--log-interval", self.log_interval),
            ("--keep-checkpoints", self.keep_checkpoints),
            ("--max-nan-steps", self.max_nan_steps),
        ):
            if value < 1:
                raise ConfigError(f"{flag}: must be >= 1 (got {value})")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"--seq-len: must be >= 1 (got {self.seq_len})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens: must be >= 1 (got {self.max_tokens})")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"--num-threads: must be >= 1 (got {self.num_threads})")
        if self.learning_rate is not None and not (
            self.learning_rate > 0 and math.isfinite(self.learning_rate)
        ):
            raise ConfigError(
                f"--learning-rate: must be a positive number (got {self.learning_rate})"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"--schedule: unknown schedule {self.schedule!r} (allowed: {', '.join(SCHEDULES)})"
            )
        if not (0.0 < self.decay_fraction <= 1.0):
            raise ConfigError(f"--decay-fraction: must be in (0, 1] (got {self.decay_fraction})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1] (got {self.min_lr_ratio})")
        for flag, value in (
            ("--warmup-steps", 0 if self.warmup_steps is None else self.warmup_steps),
            ("--eval-interval", self.eval_interval),
            ("--checkpoint-interval", self.checkpoint_interval),
        ):
            if value < 0:
                raise ConfigError(f"{flag}: must be >= 0 (got {value}; 0 disables)")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay: must be >= 0 (got {self.weight_decay})")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip: must be >= 0 (got {self.grad_clip}; 0 disables)")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"AdamW betas must be in [0, 1) (got {self.beta1}, {self.beta2})")
        return self

    # ---- derived values ---------------------------------------------------------------
    def tokens_per_step(self, seq_len: int, world_size: int = 1) -> int:
        """Tokens in one optimizer step over all processes (the effective batch)."""
        return self.batch_size * self.gradient_accumulation_steps * seq_len * world_size

    def total_steps(self, seq_len: int, world_size: int = 1) -> int:
        """--max-tokens wins: ceil(budget / tokens per step); else epochs x steps per epoch."""
        if self.max_tokens is not None:
            return math.ceil(self.max_tokens / self.tokens_per_step(seq_len, world_size))
        return self.num_epochs * self.steps_per_epoch

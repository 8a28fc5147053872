"""The run state: what a checkpoint holds besides the weights, and how a run resumes from it.

- which settings a resumed run may change (``RESUME_MUTABLE``, ``merge_resumed_config``);
- RNG states of every rank and the data position (the shared batch generator);
- the run clock (elapsed time carried over resumes);
- ``RunCheckpointer``: trainer_state.pt's content, written through ``checkpoint.py``;
- ``restore_run``: the same state back into a fresh run.

Everything in trainer_state.pt is tensors and primitives, so it loads with
``weights_only=True``. Its keys are the checkpoint format; old checkpoints must keep loading.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import NothingToDo, UserError
from . import checkpoint as ckpt_mod
from .config import TrainConfig
from .distributed import DistInfo, barrier

if TYPE_CHECKING:
    from .optim import Schedule
    from .step import StepRunner

# Train-config keys a resumed run may change; any other explicit change is refused, because
# the resumed run would no longer continue the same run.
RESUME_MUTABLE = frozenset(
    {
        "out_dir",
        "device",
        "num_epochs",
        "steps_per_epoch",
        "max_tokens",
        "eval_interval",
        "eval_steps",
        "log_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "max_nan_steps",
        "tensorboard",
        "wandb",
        "num_threads",
        "use_compile",
    }
)


# ---- resuming ------------------------------------------------------------------------------
def resume_paths(resume: str | bool, out_dir: str | None) -> tuple[Path, Path]:
    """(what --resume names, the run folder to lock before reading it) for ``--resume``."""
    target = out_dir if resume is True else str(resume)
    if target is None:
        raise UserError("--resume: give the run folder (--resume RUN) or --out-dir RUN")
    run_path = Path(target)
    if not run_path.exists():
        raise UserError(f"--resume: {run_path} does not exist")
    if not run_path.is_dir():
        raise UserError(f"--resume: {run_path} is a file, not a run or checkpoint folder")
    is_ckpt = (run_path / "model.safetensors").exists() or (run_path / "config.json").exists()
    return run_path, ckpt_mod.run_dir_of(run_path) if is_ckpt else run_path


def merge_resumed_config(
    cfg: TrainConfig, state: dict[str, Any], explicit: frozenset[str], resume_ckpt: Path
) -> TrainConfig:
    """The resumed run's saved config, with the explicit changes a resume allows."""
    saved = TrainConfig.from_dict(state["train_config"])
    for key in sorted(explicit):
        new, old = getattr(cfg, key), getattr(saved, key)
        if key in RESUME_MUTABLE:
            setattr(saved, key, new)
        elif new != old:
            flag = "--" + key.replace("_", "-")
            was = "not given" if old is None else old
            raise UserError(
                f"{flag} {new} differs from the run being resumed ({flag}: {was}); drop it or "
                "start a new run"
            )
    if "out_dir" not in explicit or saved.out_dir is None:
        saved.out_dir = str(ckpt_mod.run_dir_of(resume_ckpt))
    return saved.validate()


def check_resumed_budget(
    cfg: TrainConfig, state: dict[str, Any], total_steps: int, run_dir: Path
) -> None:
    """A resume must have steps left: refuse a budget below what was trained, and leave a
    finished run (its summary.json says so) untouched when the budget is not larger."""
    done = int(state["step"])
    if total_steps > done:
        return
    budget = (
        f"--max-tokens {cfg.max_tokens}"
        if cfg.max_tokens is not None
        else f"--num-epochs {cfg.num_epochs} x --steps-per-epoch {cfg.steps_per_epoch}"
    )
    if total_steps < done:
        raise UserError(
            f"{budget} is {total_steps} steps, fewer than the {done} this run already trained "
            f"({int(state.get('tokens_seen', 0))} tokens); give a larger budget to continue"
        )
    if _finished_at(run_dir) == done:
        raise NothingToDo(
            f"{run_dir} already finished at step {done}; give a larger --max-tokens to continue"
        )


def _finished_at(run_dir: Path) -> int | None:
    """The step count of a run whose summary.json says it finished, else None."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return int(summary["steps"]) if summary.get("status") == "ok" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resumed_total_steps(cfg: TrainConfig, state: dict[str, Any], world_size: int) -> int | None:
    """The resumed run's step budget from its saved tokens per step (None: not known yet)."""
    if cfg.max_tokens is None:
        return cfg.num_epochs * cfg.steps_per_epoch
    step, seen, saved_ws = (
        int(state["step"]),
        int(state.get("tokens_seen", 0)),
        state.get("world_size"),
    )
    if step <= 0 or seen <= 0 or not saved_ws:
        return None
    per_step = seen // step // int(saved_ws) * world_size
    return -(-cfg.max_tokens // per_step)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors and primitives (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: all ranks call it)."""
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out


# ---- batches ---------------------------------------------------------------------------------
class GlobalBatchSampler:
    """One shared generator (same seed on every rank) drawing each step's global micro-batches.

    The dataset (built with this rank and the world size) draws ``batch_size * world_size``
    window starts from the generator and gathers only this rank's slice of them.
    """

    def __init__(self, dataset, batch_size: int, seq_len: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def position(self) -> Tensor:
        """The data position: the generator's state (saved as ``data_rng``)."""
        return self.generator.get_state()

    def seek(self, position: Tensor) -> None:
        self.generator.set_state(position)

    def next(self) -> tuple[Tensor, Tensor]:
        """(x, y) of this rank: (B, T) LongTensors on the host."""
        return self.dataset.get_batch(self.batch_size, self.seq_len, self.generator)


# ---- the clock -------------------------------------------------------------------------------
@dataclass
class RunClock:
    """Wall time of the run: this process's share plus what runs before a resume spent."""

    elapsed_before: float = 0.0  # seconds of the runs this one resumes
    t_start: float | None = None  # when this process started training; None: not yet

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def this_process(self) -> float:
        return 0.0 if self.t_start is None else time.perf_counter() - self.t_start

    def elapsed(self) -> float:
        return self.elapsed_before + self.this_process()


# ---- saving and restoring ----------------------------------------------------------------------
class RunCheckpointer:
    """Writes the run's checkpoints: rank 0 writes, every rank joins the RNG gather and barrier.

    ``before_swap_delay_s`` (tests only) sleeps inside each write, so that a test can abort
    a checkpoint half-way and check the previous one survives.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        model: nn.Module,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        data_dir: Path,
        data_hash: str | None,
        dist: DistInfo,
        before_swap_delay_s: float = 0.0,
    ) -> None:
        self.run_dir = run_dir
        self.model = model
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.data_dir = data_dir
        self.data_hash = data_hash
        self.dist = dist
        self.delay = before_swap_delay_s

    def save(
        self,
        *,
        step: int,
        tokens_per_step: int,
        stepper: StepRunner,
        schedule: Schedule,
        data_rng: Tensor,
        elapsed_s: float,
        pending_log: dict[str, Any] | None = None,
    ) -> Path | None:
        """Checkpoint the state after ``step`` steps; the checkpoint's path on rank 0.

        ``data_rng``: the batch generator's state before the next step's batches were drawn.
        ``pending_log``: the log interval's accumulators so far, so that a run resumed from a
        checkpoint between two log steps logs exactly what the uninterrupted run logged.
        """
        rng = gather_rng(self.dist)
        path = None
        if self.dist.is_main:
            step_state = stepper.state_dict()
            state = {
                "step": step,
                "tokens_seen": step * tokens_per_step,
                "optimizer": step_state["optimizer"],
                "scaler": step_state["scaler"],
                "schedule": schedule.state_dict(),
                "data_rng": data_rng,
                "rng_per_rank": rng,
                "nan_count": step_state["nan_count"],
                "nan_streak": step_state["nan_streak"],
                "scaler_skips": step_state["scaler_skips"],
                "elapsed_s": elapsed_s,
                "train_config": self.train_cfg.to_dict(),
                "data_dir": str(self.data_dir),
                "data_hash": self.data_hash,
                "world_size": self.dist.world_size,
                "pending_log": pending_log or {},
            }
            delay = self.delay
            before_swap: Callable[[], None] | None = (lambda: time.sleep(delay)) if delay else None
            path = ckpt_mod.save_checkpoint(
                self.run_dir,
                step,
                self.model,
                self.model_cfg,
                self.data_dir / "tokenizer.json",
                state,
                keep=self.train_cfg.keep_checkpoints,
                before_swap=before_swap,
            )
        barrier(self.dist)
        return path


def restore_run(
    state: dict[str, Any],
    *,
    stepper: StepRunner,
    sampler: GlobalBatchSampler,
    dist: DistInfo,
    where: Path,
) -> tuple[int, RunClock]:
    """Put a checkpoint's state back: optimizer and guard counters, RNGs, data position.

    Returns the step to continue from and the clock with the time already spent. A run
    resumed on another number of ranks keeps its fresh RNG states (only the data position,
    which is shared by all ranks, is exact then).
    """
    step = int(state["step"])
    clock = RunClock(elapsed_before=float(state.get("elapsed_s", 0.0)))
    stepper.load_state_dict(state, str(where))
    ranks = state.get("rng_per_rank") or []
    if len(ranks) == dist.world_size:
        set_rng_state(ranks[dist.rank])
    sampler.seek(state["data_rng"])
    return step, clock

"""The training loop: one run from a TrainConfig and a model spec to a run folder.

Parts that live beside it: ``model_spec.py`` (what the user asked for), ``device.py``
(device, AMP dtype), ``run_state.py`` (RNG states, the shared batch generator),
``stop.py`` (SIGINT/SIGTERM), ``checkpoint.py``, ``optim.py``, ``metrics.py``, ``progress.py``.

``run_training`` resolves the data, builds (or restores) the model, and trains it with
AdamW under a warmup + cosine schedule, gradient accumulation, clipping, optional AMP,
torch.compile and gradient checkpointing, data parallelism under torchrun, a non-finite
guard, periodic evaluation on a fixed validation set, atomic checkpoints and exact resume.

Batches and ranks. Each optimizer step consumes ``gradient_accumulation_steps`` global
micro-batches of ``batch_size x world_size`` windows drawn from one shared torch.Generator
(seeded identically on every rank); rank r trains on rows [r*B, (r+1)*B) of each. So every
rank sees different data, and a run on W processes trains on exactly the samples a single
process would with ``--batch-size`` W times larger: the two are comparable step by step.

Loss normalisation. The loss of a step is the mean cross-entropy over every token that
counts (label != -100) in the whole global batch, whatever the accumulation and the number
of ranks: each micro-batch backpropagates sum(CE) x W / N_global (DDP averages gradients
over the W ranks). Without a loss mask N_global is known in advance; with one (chat) it is
summed from the labels on the host before the forward pass, so no extra device sync.

Host syncs. One per optimizer step: the step's loss and gradient norm come back together
(needed for the non-finite guard); everything else (MoE statistics, timing) is read at log
intervals. The next step's batches are gathered from the memmap while the device works.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (
    ConfigError,
    ModelConfig,
    canonical_architecture,
)
from ..errors import FileSystemError, FolderBusy, Interrupted, UserError
from ..fsutil import FolderLock, ensure_writable_dir, lock_folder
from . import checkpoint as ckpt_mod
from .config import TrainConfig
from .device import amp_dtype, pick_device
from .distributed import (
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
)
from .flops import flops_per_token, measured_peak_flops, mfu
from .metrics import (
    MetricsWriter,
    check_logging_backends,
    current_memory_bytes,
    format_bytes,
    memory_kind,
    peak_memory_bytes,
    reset_peak_memory,
    write_json_atomic,
)
from .model_spec import ModelSpec
from .optim import (
    WarmupCosineSchedule,
    build_optimizer,
    default_warmup_steps,
    warmup_warning,
)
from .progress import TrainProgress
from .run_state import GlobalBatchSampler, _rng_state, _set_rng_state
from .stop import StopRequest

IGNORE_INDEX = -100

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


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the run stops without writing bad weights."""


@dataclass
class DebugHooks:
    """Test-only fault injection (hidden CLI flags): poison steps, kill the process."""

    nan_at_steps: frozenset[int] = frozenset()  # 1-based optimizer steps whose loss becomes NaN
    sigkill_at_step: int | None = None  # SIGKILL self right after this step (and its checkpoint)
    step_delay_s: float = 0.0  # sleep after every step (lets a test signal a run mid-way)
    save_delay_s: float = 0.0  # sleep inside every checkpoint write (a test aborts a save)


# ---- the run -------------------------------------------------------------------------------
def _default_run_dir(architecture: str, stage: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{architecture}-{stage}-{stamp}")


def _same_tokenizer(a: Path, b: Path) -> bool:
    try:
        return json.loads(a.read_text()) == json.loads(b.read_text())
    except (OSError, ValueError):
        return False


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
        self.sink: TrainProgress | None = None
        self.summary_written = False
        self.owns_run_dir = False
        self.run_dir: Path | None = None
        self._locks: list[FolderLock] = []
        self.stop = StopRequest(self)
        self.stopped_by: int | None = None  # the signal that ended fit() early
        self.cfg = train_cfg.replace().validate()  # a copy: the run fills in out_dir etc.
        check_logging_backends(self.cfg.tensorboard, self.cfg.wandb)
        self.dist = init_distributed(self._device_type(self.cfg.device))
        self.device = pick_device(self.cfg.device, self.dist.local_rank)
        try:
            self._setup(model, resume, frozenset(explicit))
        except BaseException as exc:
            self._write_failure(exc)
            self.release()
            raise

    @staticmethod
    def _device_type(name: str) -> str:
        if name == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return name

    # ---- setup ---------------------------------------------------------------------------
    def _setup(self, model_arg: Any, resume: str | bool | None, explicit: frozenset[str]) -> None:
        from ..data import resolve_data
        from ..data.loader import TokenDataset

        cfg = self.cfg
        spec = self._as_spec(model_arg)
        # 1. Where we start from: a checkpoint to resume, one to initialise from, or nothing.
        self.resume_ckpt: Path | None = None
        self.state: dict[str, Any] | None = None
        if resume:
            target = cfg.out_dir if resume is True else str(resume)
            if target is None:
                raise UserError("--resume: give the run folder (--resume RUN) or --out-dir RUN")
            run_path = Path(target)
            if not run_path.exists():
                raise UserError(f"--resume: {run_path} does not exist")
            is_ckpt = (run_path / "model.safetensors").exists() or (
                run_path / "config.json"
            ).exists()
            # Lock before reading: a live run could be writing (or pruning) its checkpoints.
            source = ckpt_mod.run_dir_of(run_path) if is_ckpt else run_path
            self._claim(source, "--resume", writable=False)
            self.resume_ckpt = ckpt_mod.resolve_checkpoint(run_path)
            ckpt_mod.verify_checkpoint(self.resume_ckpt)
            self.state = ckpt_mod.load_trainer_state(self.resume_ckpt)
            self.cfg = cfg = self._merge_resumed_config(cfg, explicit, run_path)
        init_ckpt = None
        if self.resume_ckpt is None and cfg.init_from:
            init_ckpt = ckpt_mod.resolve_checkpoint(cfg.init_from)
            ckpt_mod.verify_checkpoint(init_ckpt)
        source_ckpt = self.resume_ckpt or init_ckpt
        if cfg.num_threads is not None:  # after a resume merged the run's saved setting
            torch.set_num_threads(cfg.num_threads)

        # 2. The run folder (decided on rank 0: default names carry a timestamp).
        if self.resume_ckpt is not None and cfg.out_dir is None:
            cfg.out_dir = str(ckpt_mod.run_dir_of(self.resume_ckpt))
        if cfg.out_dir is None:
            arch = (
                ckpt_mod.read_model_config(source_ckpt).architecture
                if source_ckpt is not None
                else canonical_architecture(self._spec_architecture(spec, model_arg))
            )
            cfg.out_dir = broadcast_object(_default_run_dir(arch, cfg.stage), self.dist)
        self.run_dir = Path(cfg.out_dir)
        self._claim(self.run_dir, "--out-dir")  # before looking inside: it may be in use
        if self.resume_ckpt is None and ckpt_mod.list_checkpoints(self.run_dir):
            raise UserError(
                f"--out-dir {self.run_dir} already holds checkpoints; pass --resume to continue "
                "that run or choose another --out-dir"
            )
        # From here a failure is this run's own and is recorded in its summary.json; a resumed
        # run's folder is only claimed once its checkpoint has been restored (below).
        self.owns_run_dir = self.resume_ckpt is None

        # 3. Explicit model settings must fit a checkpoint we continue from (checked before
        # any data is prepared), then the data, tokenized with that checkpoint's tokenizer.
        if source_ckpt is not None:
            ckpt_cfg = ckpt_mod.read_model_config(source_ckpt)
            where = f"checkpoint {source_ckpt}"
            if isinstance(model_arg, ModelConfig):
                if model_arg != ckpt_cfg:
                    raise ConfigError(f"the model config does not fit {where}")
            else:
                spec.check_fits(ckpt_cfg, where)
        tokenizer_arg = str(source_ckpt / "tokenizer.json") if source_ckpt is not None else None
        preset = self._spec_preset(spec, model_arg, source_ckpt)
        self.data_dir = self._resolve_data(resolve_data, cfg, preset, tokenizer_arg)
        self.meta = json.loads((self.data_dir / "meta.json").read_text())
        if cfg.stage == "chat" and not self.meta.get("has_mask"):
            raise UserError(
                f"--stage chat: {self.data_dir} has no assistant-token mask (prepare a chat "
                "source such as rustgpt-chat)"
            )
        if source_ckpt is not None and not _same_tokenizer(
            source_ckpt / "tokenizer.json", self.data_dir / "tokenizer.json"
        ):
            raise UserError(
                f"{self.data_dir} was tokenized with a different tokenizer than {source_ckpt}; "
                f"prepare it with --tokenizer {source_ckpt / 'tokenizer.json'}"
            )
        data_vocab = int(self.meta["vocab_size"])

        # 4. The model configuration and the sequence length.
        if source_ckpt is not None:
            self.model_cfg = ckpt_cfg
        elif isinstance(model_arg, ModelConfig):
            self.model_cfg = model_arg.validate()
        else:
            self.model_cfg = spec.build(data_vocab)
        if self.model_cfg.vocab_size < data_vocab:
            raise ConfigError(
                f"the model's vocabulary ({self.model_cfg.vocab_size}) is smaller than the data's "
                f"({data_vocab}, {self.data_dir})"
            )
        self.seq_len = cfg.seq_len or self.model_cfg.max_seq_len
        if self.model_cfg.uses_learned_positions and self.seq_len > self.model_cfg.max_seq_len:
            raise ConfigError(
                f"--seq-len {self.seq_len} exceeds the model's max_seq_len "
                f"{self.model_cfg.max_seq_len} (learned positions): lower --seq-len or raise --max-seq-len"
            )
        self.total_steps = cfg.total_steps(self.seq_len, self.dist.world_size)
        self.tokens_per_step = cfg.tokens_per_step(self.seq_len, self.dist.world_size)
        if cfg.warmup_steps is None:  # resolved once and stored, so a resume keeps it
            cfg.warmup_steps = default_warmup_steps(self.total_steps)
        warning = warmup_warning(cfg.warmup_steps, self.total_steps)
        if warning and self.dist.is_main and self.progress:  # --quiet: errors only
            print(warning, file=sys.stderr)

        # 5. Datasets and samplers.
        self.train_ds = TokenDataset(self.data_dir, "train", self.dist.rank, self.dist.world_size)
        self.val_ds = TokenDataset(self.data_dir, "val")
        for split, ds in (("train", self.train_ds), ("val", self.val_ds)):
            if ds.num_tokens <= self.seq_len + 1:
                raise UserError(
                    f"{self.data_dir}: the {split} split has {ds.num_tokens} tokens, too few "
                    f"for --seq-len {self.seq_len}"
                )
        self.has_mask = bool(self.meta.get("has_mask"))
        self.sampler = GlobalBatchSampler(self.train_ds, cfg.batch_size, self.seq_len, cfg.seed)

        # 6. Model, optimizer, schedule, precision.
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        from ..models import build_model

        # The process's memory before the model exists (interpreter, torch, data maps): the
        # report subtracts it so the memory column is the model's own (CPU RSS is mostly torch).
        self.mem_before_model = current_memory_bytes(self.device)
        self.model = build_model(self.model_cfg)
        if source_ckpt is not None:
            ckpt_mod.load_weights(self.model, source_ckpt)
        self.model.to(self.device)
        self.model.gradient_checkpointing = cfg.use_gradient_checkpointing
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for float32 runs
        self.optimizer = build_optimizer(
            self.model,
            cfg.learning_rate,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
            self.device.type,
        )
        self.schedule = WarmupCosineSchedule(
            cfg.learning_rate, cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio
        )
        self.autocast_dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if cfg.use_amp:
            self.autocast_dtype, needs_scaler = amp_dtype(self.device)
            if needs_scaler:
                self.scaler = torch.amp.GradScaler(self.device.type)

        # 7. Counters; restored from the checkpoint on resume.
        self.step = 0
        self.nan_count = 0
        self.nan_streak = 0
        self.scaler_skips = 0
        self.elapsed_before = 0.0
        if self.state is not None:
            self._restore(self.state)

        # 8. Wrappers. One process: compile the model, train and evaluate the compiled one.
        # Data parallel: DDP first, then compile the wrapper (PyTorch's recommended order: the
        # compiler splits graphs at gradient buckets so communication overlaps the backward);
        # evaluation then runs the plain model, as DDP is only needed for gradients.
        self.eval_model: nn.Module = self.model  # what evaluate() calls
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
            self.train_model = torch.compile(self.ddp) if cfg.use_compile else self.ddp
        elif cfg.use_compile:
            self.eval_model = self.train_model = torch.compile(self.model)

        self.eval_data = self._eval_batches()
        self.owns_run_dir = True

    def _claim(self, folder: Path, flag: str, writable: bool = True) -> None:
        """Lock a run folder for this run's life (rank 0), then drop a killed run's temporaries.

        All ranks call this: rank 0's outcome is broadcast so that every rank fails together
        instead of the others waiting forever in the next collective. ``writable=False`` (the
        run a --resume reads from): a folder nobody can write, such as one on a read-only
        file system, is read without a lock, since no process can be changing it.
        """
        folder = Path(folder)
        if any(lk.path.parent.resolve() == folder.resolve() for lk in self._locks):
            return
        failure: tuple[int, str] | None = None
        if self.dist.is_main:
            try:
                if writable:
                    ensure_writable_dir(folder, flag)
                    self._locks.append(lock_folder(folder, "run folder"))
                    ckpt_mod.clean_temporary(folder)
                elif os.access(folder, os.W_OK):
                    self._locks.append(lock_folder(folder, "run folder"))
                    with contextlib.suppress(OSError):
                        ckpt_mod.clean_temporary(folder)
            except UserError as exc:
                failure = (exc.exit_code, str(exc))
                if not self.dist.enabled:
                    raise
        failure = broadcast_object(failure, self.dist)
        if failure is not None:
            cls = {1: FileSystemError}.get(failure[0], FolderBusy)
            raise cls(failure[1])

    def release(self) -> None:
        """Give the run folder's lock back (the OS does it anyway when the process ends)."""
        while self._locks:
            self._locks.pop().release()

    def _as_spec(self, model_arg: Any) -> ModelSpec:
        if isinstance(model_arg, ModelSpec):
            return model_arg
        if isinstance(model_arg, dict):
            d = dict(model_arg)
            return ModelSpec(
                architecture=d.pop("architecture", None),
                model_size=d.pop("model_size", None),
                preset=d.pop("preset", None),
                overrides=d,
            )
        return ModelSpec()

    @staticmethod
    def _spec_architecture(spec: ModelSpec, model_arg: Any) -> str:
        if isinstance(model_arg, ModelConfig):
            return model_arg.architecture
        return spec.architecture or "dense"

    @staticmethod
    def _spec_preset(spec: ModelSpec, model_arg: Any, ckpt: Path | None) -> str | None:
        if ckpt is not None:
            return ckpt_mod.read_model_config(ckpt).preset
        if isinstance(model_arg, ModelConfig):
            return model_arg.preset
        return spec.preset

    def _resolve_data(self, resolve_data, cfg: TrainConfig, preset, tokenizer) -> Path:
        saved = self.state.get("data_dir") if self.state else None
        if saved and (Path(saved) / "meta.json").is_file():
            meta = json.loads((Path(saved) / "meta.json").read_text())
            if meta.get("hash") == self.state.get("data_hash"):
                return Path(saved)
        # Rank 0 prepares (and caches) first; the others then find the folder up to date.
        path = None
        if self.dist.is_main:
            path = resolve_data(
                cfg.data, cfg.stage, preset, tokenizer=tokenizer, verbose=bool(self.progress)
            )
        barrier(self.dist)
        if not self.dist.is_main:
            path = resolve_data(cfg.data, cfg.stage, preset, tokenizer=tokenizer, verbose=False)
        return Path(path).resolve()

    def _merge_resumed_config(
        self, cfg: TrainConfig, explicit: frozenset[str], run_path: Path
    ) -> TrainConfig:
        assert self.state is not None
        saved = TrainConfig.from_dict(self.state["train_config"])
        for key in sorted(explicit):
            new, old = getattr(cfg, key), getattr(saved, key)
            if key in RESUME_MUTABLE:
                setattr(saved, key, new)
            elif new != old:
                flag = "--" + key.replace("_", "-")
                raise UserError(
                    f"{flag} {new} differs from the run being resumed ({old}); drop it or start a new run"
                )
        if "out_dir" not in explicit or saved.out_dir is None:
            saved.out_dir = str(ckpt_mod.run_dir_of(self.resume_ckpt))  # type: ignore[arg-type]
        return saved.validate()

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nan_count = int(state.get("nan_count", 0))
        self.nan_streak = int(state.get("nan_streak", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt_mod.CheckpointError(
                f"checkpoint {self.resume_ckpt}: optimizer state does not fit this model ({exc})"
            ) from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_per_rank") or []
        if len(ranks) == self.dist.world_size:
            _set_rng_state(ranks[self.dist.rank])
        self.sampler.generator.set_state(state["data_rng"])

    def _eval_batches(self) -> list[tuple[Tensor, Tensor]]:
        """This rank's rows of the fixed validation set.

        ``eval_steps`` batches of ``batch_size x world_size`` windows (the global micro-batch),
        fixed by ``eval_seed``; rank r keeps rows [r*B, (r+1)*B) of each, as in training, so
        one process and W processes at the same global batch evaluate the same windows.
        """
        B, r = self.cfg.batch_size, self.dist.rank
        out = []
        for x, y in self.val_ds.eval_batches(
            B * self.dist.world_size, self.seq_len, self.cfg.eval_steps, self.cfg.eval_seed
        ):
            out.append((x[r * B : (r + 1) * B], y[r * B : (r + 1) * B]))
        return out

    # ---- the steps -----------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _draw_step(self) -> tuple[list[tuple[Tensor, Tensor]], int]:
        """This rank's micro-batches for one step, and the step's global count of loss tokens."""
        batches = [self.sampler.next() for _ in range(self.cfg.gradient_accumulation_steps)]
        if not self.has_mask:
            return batches, self.tokens_per_step
        local = torch.tensor([float(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches))])
        if self.dist.enabled:
            local = all_reduce_sum(local.to(self.device), self.dist).cpu()
        return batches, int(local.item())

    def _forward_backward(
        self, batches: list[tuple[Tensor, Tensor]], n_tokens: int, step: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Accumulate gradients over the micro-batches; returns (sum CE, aux sum, expert counts)."""
        scale = self.dist.world_size / max(n_tokens, 1)
        n_micro = len(batches)
        ce_total = torch.zeros((), device=self.device)
        aux_total: Tensor | None = None
        counts_total: Tensor | None = None
        poison = step + 1 in self.hooks.nan_at_steps
        for i, (x, y) in enumerate(batches):
            x, y = self._to_device(x), self._to_device(y)
            sync_ctx = (
                self.ddp.no_sync()
                if self.dist.enabled and i < n_micro - 1
                else contextlib.nullcontext()
            )
            with sync_ctx:
                with self._autocast():
                    logits, aux = self.train_model(x, return_aux=True)
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

    def _grad_norm(self) -> Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if self.cfg.grad_clip > 0:
            return nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        norms = torch._foreach_norm([p.grad for p in params])  # type: ignore[misc]
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy per counted token over the fixed validation batches (all ranks)."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in self.eval_data:
            x, y = self._to_device(x), self._to_device(y)
            with self._autocast():
                logits = self.eval_model(x, return_aux=True)[0]
                ce = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(),
                    y.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            totals[0] += ce.double()
            totals[1] += (y != IGNORE_INDEX).sum()
        all_reduce_sum(totals, self.dist)
        self.model.train()
        s, n = totals.tolist()
        return s / n if n > 0 else float("nan")

    # ---- checkpoints ----------------------------------------------------------------------
    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = _rng_state()
        if not self.dist.enabled:
            return [mine]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.dist.world_size
        tdist.all_gather_object(out, mine)
        return out

    def save(self, data_rng: Tensor, pending_log: dict[str, Any] | None = None) -> Path | None:
        """Checkpoint the state after ``self.step`` steps (rank 0 writes; all ranks join).

        ``pending_log``: the log interval's accumulators so far, so that a run resumed from
        a checkpoint between two log steps logs exactly what the uninterrupted run logged.
        """
        rng = self._gather_rng()
        path = None
        if self.dist.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.step * self.tokens_per_step,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "schedule": self.schedule.state_dict(),
                "data_rng": data_rng,
                "rng_per_rank": rng,
                "nan_count": self.nan_count,
                "nan_streak": self.nan_streak,
                "scaler_skips": self.scaler_skips,
                "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t_start),
                "train_config": self.cfg.to_dict(),
                "data_dir": str(self.data_dir),
                "data_hash": self.meta.get("hash"),
                "world_size": self.dist.world_size,
                "pending_log": pending_log or {},
            }
            delay = self.hooks.save_delay_s
            path = ckpt_mod.save_checkpoint(
                self.run_dir,  # type: ignore[arg-type]
                self.step,
                self.model,
                self.model_cfg,
                self.data_dir / "tokenizer.json",
                state,
                keep=self.cfg.keep_checkpoints,
                before_swap=(lambda: time.sleep(delay)) if delay else None,
            )
        barrier(self.dist)
        return path

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.stop.install()
        try:
            return self._fit()
        except BaseException as exc:
            self._write_failure(exc)
            raise
        finally:
            if self.sink is not None:
                self.sink.close()
            self.stop.restore()
            if getattr(self, "writer", None) is not None:
                with contextlib.suppress(OSError):  # a full disk was reported already
                    self.writer.close()
            shutdown(self.dist)
            self.release()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        main = self.dist.is_main
        self.writer = None
        if main:
            self.writer = MetricsWriter(
                self.run_dir,  # type: ignore[arg-type]
                tensorboard=cfg.tensorboard,
                wandb=cfg.wandb,
                run_name=self.run_dir.name,  # type: ignore[union-attr]
                config={"train": cfg.to_dict(), "model": self.model_cfg.to_dict()},
                resume_step=self.step if self.resume_ckpt is not None else None,
            )
        self.model.train()
        reset_peak_memory(self.device)
        self.t_start = time.perf_counter()
        first_step = self.step
        steps_left = self.total_steps - self.step
        mode = self.progress if isinstance(self.progress, str) else None
        sink = self.sink = TrainProgress(
            total_steps=self.total_steps,
            initial_step=self.step,
            tokens_per_step=self.tokens_per_step,
            desc=f"train {self.model_cfg.architecture}",
            log_interval=cfg.log_interval,
            mode=("off" if not (main and self.progress) else mode),
        )
        sink.start(self.model.summary(), self.run_dir, f"device {self.device}")
        # Interval accumulators (host floats; device tensors for MoE statistics); a resumed
        # run continues the interval its checkpoint was written in.
        pending = (self.state or {}).get("pending_log") or {}
        loss_sum, loss_n = float(pending.get("loss_sum", 0.0)), int(pending.get("loss_n", 0))
        gnorm_last = float(pending.get("gnorm_last", float("nan")))
        aux_acc: Tensor | None = _to(pending.get("aux_sum"), self.device)
        counts_acc: Tensor | None = _to(pending.get("counts"), self.device)
        aux_n = int(pending.get("aux_n", 0))

        def pending_log() -> dict[str, Any]:
            d: dict[str, Any] = {"loss_sum": loss_sum, "loss_n": loss_n, "gnorm_last": gnorm_last}
            d["aux_n"] = aux_n
            if aux_acc is not None:
                d["aux_sum"] = aux_acc.detach().float().cpu()
            if counts_acc is not None:
                d["counts"] = counts_acc.detach().float().cpu()
            return d

        step_time = 0.0  # pure training-step time (no eval/checkpoint), this process
        interval_time, interval_tokens = 0.0, 0
        first_step_s: float | None = None
        val_loss = float("nan")
        last_eval_step = -1
        last_ckpt_step = self.step if self.resume_ckpt is not None else -1

        data_rng = self.sampler.generator.get_state()
        batches, n_tok = self._draw_step() if steps_left > 0 else ([], 0)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            lr = self.schedule.apply(self.optimizer, self.step)
            ce, aux_loss, counts = self._forward_backward(batches, n_tok, self.step)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            gnorm = self._grad_norm()
            # This rank's stop vote rides on the loss reduction (no extra collective): every
            # rank reads the same sum, so all stop after the same step. SIGTERM votes 1024 and
            # SIGINT 1, so the sum also tells which one (exact in float32 up to 16k ranks).
            vote = {None: 0.0, signal.SIGINT: 1.0}.get(self.stop.signum, 1024.0)
            stats = torch.stack(
                [ce.float(), torch.full((), vote, device=ce.device), gnorm.float().reshape(())]
            )
            if self.dist.enabled:
                stats[0:2] = all_reduce_sum(stats[0:2].clone(), self.dist)
            # Draw the next step's batches on the host while the device finishes this one.
            next_rng = self.sampler.generator.get_state()
            next_batches, next_tok = (
                self._draw_step() if self.step + 1 < self.total_steps else ([], 0)
            )
            ce_sum, votes, gnorm_v = stats.tolist()  # the step's one host sync
            loss_v = ce_sum / max(n_tok, 1)
            finite = math.isfinite(loss_v) and math.isfinite(gnorm_v)
            # fp16 only: finite loss, overflowing gradients -> the scaler skips and rescales
            overflow = self.scaler is not None and math.isfinite(loss_v) and not finite
            if finite or overflow:
                if self.scaler is not None:
                    scale_before = self.scaler.get_scale()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    if self.scaler.get_scale() < scale_before:
                        self.scaler_skips += 1  # fp16 overflow: the scaler skipped the update
                else:
                    self.optimizer.step()
                self.nan_streak = 0
                loss_sum += loss_v
                loss_n += 1
                gnorm_last = gnorm_v
            else:
                self.nan_count += 1
                self.nan_streak += 1
                if self.scaler is not None:
                    self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if aux_loss is not None and finite:
                aux_acc = aux_loss if aux_acc is None else aux_acc + aux_loss
                aux_n += 1
            if counts is not None:
                counts_acc = counts if counts_acc is None else counts_acc + counts
            self.step += 1
            data_rng = next_rng
            batches, n_tok = next_batches, next_tok
            dt = time.perf_counter() - t0
            if first_step_s is None:
                first_step_s = dt  # holds compilation and warm-up; kept out of tokens/s
            else:
                step_time += dt
            interval_time += dt
            interval_tokens += self.tokens_per_step
            sink.step(self.step, loss_v, lr, dt)

            if not (finite or overflow) and main:
                sink.message(
                    f"step {self.step}: non-finite loss or gradient norm (loss {loss_v}, grad norm "
                    f"{gnorm_v}); update skipped ({self.nan_streak} in a row, {self.nan_count} total)"
                )
            if self.nan_streak >= cfg.max_nan_steps:
                if main:
                    self._log_train(
                        lr,
                        loss_sum,
                        loss_n,
                        gnorm_v,
                        interval_tokens,
                        interval_time,
                        aux_acc,
                        aux_n,
                        counts_acc,
                    )
                raise TrainingDiverged(
                    f"stopping at step {self.step}: {self.nan_streak} non-finite steps in a row "
                    f"(--max-nan-steps {cfg.max_nan_steps}); no checkpoint written with bad weights. "
                    "Try a lower --learning-rate, --grad-clip or disabling --use-amp"
                )

            last = self.step == self.total_steps
            if self.step % cfg.log_interval == 0 or last:
                if main:
                    rec = self._log_train(
                        lr,
                        loss_sum,
                        loss_n,
                        gnorm_last,
                        interval_tokens,
                        interval_time,
                        aux_acc,
                        aux_n,
                        counts_acc,
                    )
                    sink.log(self.step, rec, lr)
                loss_sum, loss_n, aux_acc, counts_acc, aux_n = 0.0, 0, None, None, 0
                interval_time, interval_tokens = 0.0, 0
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                val_loss = self.evaluate()
                last_eval_step = self.step
                if main:
                    self.writer.log(  # type: ignore[union-attr]
                        {
                            "kind": "eval",
                            "step": self.step,
                            "tokens": self.step * self.tokens_per_step,
                            "val_loss": val_loss,
                            "elapsed_s": self._elapsed(),
                        }
                    )
                    sink.eval(self.step, val_loss)
            if (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or last:
                self.save(data_rng, pending_log())
                last_ckpt_step = self.step
            if self.hooks.sigkill_at_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.hooks.step_delay_s:
                time.sleep(self.hooks.step_delay_s)
            if not self.dist.enabled:  # one process: also a signal during this step's eval/save
                votes = {None: 0.0, signal.SIGINT: 1.0}.get(self.stop.signum, 1024.0)
            if votes > 0 and not last:  # a stop signal: this step was the last one
                self.stopped_by = signal.SIGTERM if votes >= 1024 else signal.SIGINT
                break
        sink.close()
        stopped = self.stopped_by is not None
        if last_eval_step != self.step and not stopped:  # resumed a finished run
            val_loss = self.evaluate()
            last_eval_step = self.step
        checkpoint = None
        if last_ckpt_step != self.step and self.step > 0:
            checkpoint = self.save(data_rng, pending_log() if stopped else None)
        elif self.dist.is_main and self.step > 0:
            checkpoint = ckpt_mod.latest_checkpoint(self.run_dir)  # type: ignore[arg-type]
        steps_run = self.step - first_step
        timed_steps = steps_run - 1 if steps_run > 1 else steps_run
        timed = step_time if steps_run > 1 else (first_step_s or 0.0)
        tokens_per_s = timed_steps * self.tokens_per_step / timed if timed > 0 else 0.0
        if stopped:
            return self._finish(
                val_loss if last_eval_step == self.step else None,
                tokens_per_s,
                first_step_s,
                steps_run,
                checkpoint=checkpoint,
            )
        return self._finish(val_loss, tokens_per_s, first_step_s, steps_run, checkpoint=checkpoint)

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t_start)

    def _log_train(self, lr, loss_sum, loss_n, gnorm, tokens, seconds, aux_acc, aux_n, counts_acc):
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "loss": loss_sum / loss_n if loss_n else float("nan"),
            "lr": lr,
            "grad_norm": gnorm,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "elapsed_s": self._elapsed(),
            "nan_count": self.nan_count,
        }
        if self.scaler is not None:
            rec["scaler_skips"] = self.scaler_skips
        if aux_acc is not None and aux_n:
            rec["aux_loss"] = float(aux_acc.item()) / aux_n
        if counts_acc is not None:
            load = counts_acc / counts_acc.sum(dim=-1, keepdim=True).clamp_min(1)  # (L_moe, E)
            rec["expert_load"] = [[round(v, 5) for v in row] for row in load.tolist()]
        self.writer.log(rec)  # type: ignore[union-attr]
        return rec

    def _finish(
        self,
        val_loss: float | None,
        tokens_per_s: float,
        first_step_s,
        steps_run,
        checkpoint: Path | None = None,
    ) -> dict:
        cfg = self.cfg
        train_time = time.perf_counter() - self.t_start
        peak_mem = peak_memory_bytes(self.device)
        if self.dist.enabled:  # the largest process's peak
            box = torch.tensor([float(peak_mem)], device=self.device)
            peak_mem = int(all_reduce_max(box, self.dist).item())
        fpt = flops_per_token(self.model, self.seq_len)
        peak_dtype = self.autocast_dtype or torch.float32
        peak = measured_peak_flops(str(self.device), peak_dtype)
        run_mfu = mfu(fpt, tokens_per_s, peak, self.dist.world_size)
        summary = {
            "architecture": self.model_cfg.architecture,
            "total_params": self.model.num_parameters(),
            "active_params": self.model.num_active_parameters(),
            "steps": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "train_time_s": train_time,
            "tokens_per_s": tokens_per_s,
            "peak_mem_bytes": peak_mem,
            "mem_before_model_bytes": self.mem_before_model,
            "model_mem_bytes": max(0, peak_mem - self.mem_before_model)
            if self.mem_before_model is not None
            else None,
            "memory_kind": memory_kind(self.device),
            "final_val_loss": val_loss,
            "nan_count": self.nan_count,
            "mfu": run_mfu,
            "entropy_floor": self.meta.get("entropy_floor"),
            "status": "ok" if self.stopped_by is None else "interrupted",
            "error": None,
            "interrupted_by": signal.Signals(self.stopped_by).name if self.stopped_by else None,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "model_config": self.model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            # extra context for reports
            "seq_len": self.seq_len,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "amp_dtype": str(self.autocast_dtype).replace("torch.", "")
            if self.autocast_dtype
            else None,
            "flops_per_token": fpt,
            "peak_flops": peak,
            "first_step_s": first_step_s,
            "steps_this_process": steps_run,
            "elapsed_s": self._elapsed(),
            "scaler_skips": self.scaler_skips,
            "data_dir": str(self.data_dir),
            "resumed_from": str(self.resume_ckpt) if self.resume_ckpt else None,
            "init_from": cfg.init_from,
        }
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "summary.json", summary)  # type: ignore[operator]
            self.summary_written = True
            if self.report and self.stopped_by is None:
                self._print_summary(summary)
        return summary

    def _print_summary(self, s: dict[str, Any]) -> None:
        floor = s["entropy_floor"]
        lines = [
            "=== Training Summary ===",
            f"Architecture: {s['architecture']} ({s['total_params']:,} parameters"
            + (
                f", {s['active_params']:,} active"
                if s["active_params"] != s["total_params"]
                else ""
            )
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
            f"Tokens/s: {s['tokens_per_s']:,.0f}",
            f"NaN/Inf steps skipped: {s['nan_count']}",
            f"MFU: {100 * s['mfu']:.2f}% (of a measured {s['peak_flops'] / 1e9:.1f} GFLOP/s "
            f"matmul peak per device)",
            f"Run folder: {self.run_dir}",
            "========================",
        ]
        print("\n".join(lines))

    def _write_failure(self, exc: BaseException) -> None:
        """summary.json with status "failed" so a sweep can report the run honestly."""
        if self.summary_written or not self.owns_run_dir or not self.dist.is_main:
            return
        assert self.run_dir is not None
        if not self.run_dir.exists():
            return
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            msg = str(exc) if isinstance(exc, Interrupted) else "interrupted"
        model_cfg = getattr(self, "model_cfg", None)
        model = getattr(self, "model", None)
        summary = {
            "architecture": model_cfg.architecture if model_cfg else None,
            "total_params": model.num_parameters() if model is not None else None,
            "active_params": model.num_active_parameters() if model is not None else None,
            "steps": getattr(self, "step", 0),
            "tokens_seen": getattr(self, "step", 0) * getattr(self, "tokens_per_step", 0),
            "train_time_s": time.perf_counter() - self.t_start if hasattr(self, "t_start") else 0.0,
            "tokens_per_s": None,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "final_val_loss": None,
            "nan_count": getattr(self, "nan_count", 0),
            "mfu": None,
            "entropy_floor": getattr(self, "meta", {}).get("entropy_floor"),
            "status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
            "error": f"{type(exc).__name__}: {msg}",
            "model_config": model_cfg.to_dict() if model_cfg else None,
            "train_config": self.cfg.to_dict(),
        }
        with contextlib.suppress(OSError):
            write_json_atomic(self.run_dir / "summary.json", summary)
            self.summary_written = True


def _to(t: Any, device: torch.device) -> Tensor | None:
    return t.to(device) if isinstance(t, Tensor) else None


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
    trainer = Trainer(
        train_cfg,
        model,
        resume=resume,
        explicit=explicit,
        hooks=hooks,
        progress=progress,
        report=report,
    )
    return trainer.fit()

"""Setting up one run, in the order the trainer takes the steps: where it starts from, its
folder, its data, the model's configuration and budget, the model's wrappers.

Each function takes what it needs and returns what it found, so ``Trainer._setup`` reads as
the list of steps; the checks that a user can fail (a folder in use, a checkpoint that does
not fit, data too short) raise one-line errors from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, ModelConfig, canonical_architecture
from ..data.generated import FIXED_LENGTH_TASKS
from ..errors import FileSystemError, FolderBusy, UserError
from ..fsutil import FolderLock, ensure_writable_dir, lock_folder
from . import checkpoint as ckpt_mod
from .config import TrainConfig
from .distributed import DistInfo, barrier, broadcast_object
from .metrics import current_memory_bytes, reset_cpu_peak
from .model_spec import ModelSpec
from .optim import Schedule, build_optimizer, default_warmup_steps, make_schedule
from .run_state import (
    check_resumed_budget,
    merge_resumed_config,
    resume_paths,
    resumed_total_steps,
)


# ---- run folders -------------------------------------------------------------------------------
class FolderClaims:
    """The run folders this process holds locked (rank 0 locks; all ranks agree on failure)."""

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist
        self._locks: list[FolderLock] = []

    def claim(self, folder: Path, flag: str, writable: bool = True) -> None:
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
        """Give the locks back (the OS does it anyway when the process ends)."""
        while self._locks:
            self._locks.pop().release()


# ---- 1. where the run starts from ------------------------------------------------------------
@dataclass
class Start:
    """A checkpoint to resume, one to initialise from (--init-from), or neither."""

    cfg: TrainConfig  # on resume: the saved config with the changes a resume allows
    resume_ckpt: Path | None = None
    state: dict[str, Any] | None = None  # trainer_state.pt of resume_ckpt
    init_ckpt: Path | None = None

    @property
    def source(self) -> Path | None:
        """The checkpoint whose weights, config and tokenizer the run takes."""
        return self.resume_ckpt or self.init_ckpt


def resolve_start(
    cfg: TrainConfig, resume: str | bool | None, explicit: frozenset[str], claims: FolderClaims
) -> Start:
    if not resume:
        init_ckpt = None
        if cfg.init_from:
            init_ckpt = ckpt_mod.resolve_checkpoint(cfg.init_from)
            ckpt_mod.verify_checkpoint(init_ckpt)
        return Start(cfg, init_ckpt=init_ckpt)
    run_path, lock_dir = resume_paths(resume, cfg.out_dir)
    # Lock before reading: a live run could be writing (or pruning) its checkpoints.
    claims.claim(lock_dir, "--resume", writable=False)
    resume_ckpt = ckpt_mod.resolve_checkpoint(run_path)
    ckpt_mod.verify_checkpoint(resume_ckpt)
    state = ckpt_mod.load_trainer_state(resume_ckpt)
    return Start(merge_resumed_config(cfg, state, explicit, resume_ckpt), resume_ckpt, state)


def check_steps_left(start: Start, world_size: int) -> None:
    """Before any data is prepared: a finished run resumed without a larger budget is left
    exactly as it is (checked again once the data fixes the sequence length)."""
    if start.state is None or start.resume_ckpt is None:
        return
    total = resumed_total_steps(start.cfg, start.state, world_size)
    if total is not None:
        check_resumed_budget(start.cfg, start.state, total, ckpt_mod.run_dir_of(start.resume_ckpt))


# ---- 2. the run folder -------------------------------------------------------------------------
def claim_run_dir(
    cfg: TrainConfig, start: Start, architecture: str, dist: DistInfo, claims: FolderClaims
) -> Path:
    """Decide the run folder (filling ``cfg.out_dir``) and lock it before looking inside (it
    may be in use); refuse one that holds another run's checkpoints."""
    if start.resume_ckpt is not None and cfg.out_dir is None:
        cfg.out_dir = str(ckpt_mod.run_dir_of(start.resume_ckpt))
    if cfg.out_dir is None:  # runs/ARCH-STAGE-TIME, named on rank 0
        if start.source is not None:
            architecture = ckpt_mod.read_model_config(start.source).architecture
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{canonical_architecture(architecture)}-{cfg.stage}-{stamp}"
        cfg.out_dir = broadcast_object(os.path.join("runs", name), dist)
    run_dir = Path(cfg.out_dir)  # type: ignore[arg-type]
    claims.claim(run_dir, "--out-dir")
    if start.resume_ckpt is None and ckpt_mod.list_checkpoints(run_dir):
        raise UserError(
            f"--out-dir {run_dir} already holds checkpoints; pass --resume to continue "
            "that run or choose another --out-dir"
        )
    return run_dir


# ---- 3. the data -------------------------------------------------------------------------------
def checkpoint_model_config(start: Start, model_arg: Any, spec: ModelSpec) -> ModelConfig | None:
    """The source checkpoint's model config, after checking explicit model settings fit it."""
    if start.source is None:
        return None
    ckpt_cfg = ckpt_mod.read_model_config(start.source)
    where = f"checkpoint {start.source}"
    if isinstance(model_arg, ModelConfig):
        if model_arg != ckpt_cfg:
            raise ConfigError(f"the model config does not fit {where}")
    else:
        spec.check_fits(ckpt_cfg, where)
    return ckpt_cfg


def _same_tokenizer(a: Path, b: Path) -> bool:
    try:
        return json.loads(a.read_text()) == json.loads(b.read_text())
    except (OSError, ValueError):
        return False


def prepare_data(
    cfg: TrainConfig, start: Start, preset: str | None, dist: DistInfo, verbose: bool
) -> tuple[Path, dict[str, Any]]:
    """The prepared data folder and its meta.json, tokenized like the source checkpoint.

    A resumed run reuses its saved folder while its content hash is unchanged. Otherwise
    rank 0 prepares (and caches) first; the others then find the folder up to date.
    """
    from ..data import resolve_data

    src = start.source
    tokenizer = str(src / "tokenizer.json") if src is not None else None
    saved = start.state.get("data_dir") if start.state else None
    data_dir: Path | None = None
    if saved and (Path(saved) / "meta.json").is_file():
        meta = json.loads((Path(saved) / "meta.json").read_text())
        if meta.get("hash") == start.state.get("data_hash"):  # type: ignore[union-attr]
            data_dir = Path(saved)
    if data_dir is None:
        path = None
        if dist.is_main:
            path = resolve_data(cfg.data, cfg.stage, preset, tokenizer=tokenizer, verbose=verbose)
        barrier(dist)
        if not dist.is_main:
            path = resolve_data(cfg.data, cfg.stage, preset, tokenizer=tokenizer, verbose=False)
        data_dir = Path(path).resolve()
    meta = json.loads((data_dir / "meta.json").read_text())
    if cfg.stage == "chat" and not meta.get("has_mask"):
        raise UserError(
            f"--stage chat: {data_dir} has no assistant-token mask (prepare a chat "
            "source such as rustgpt-chat)"
        )
    if src is not None and not _same_tokenizer(src / "tokenizer.json", data_dir / "tokenizer.json"):
        raise UserError(
            f"{data_dir} was tokenized with a different tokenizer than {src}; "
            f"prepare it with --tokenizer {src / 'tokenizer.json'}"
        )
    return data_dir, meta


def check_seq_len_early(
    cfg: TrainConfig, model_arg: Any, spec: ModelSpec, ckpt_cfg: ModelConfig | None
) -> None:
    """--seq-len above a learned-position model's window: refused before any data is
    prepared (the vocabulary, which the data fixes, does not change the window)."""
    if cfg.seq_len is None:
        return
    if ckpt_cfg is not None:
        model_cfg = ckpt_cfg
    elif isinstance(model_arg, ModelConfig):
        model_cfg = model_arg
    else:
        try:
            model_cfg = spec.build(1)
        except ConfigError:
            return  # reported with the data's vocabulary, once it is known
    if model_cfg.uses_learned_positions and cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len "
            f"{model_cfg.max_seq_len} (learned positions): lower --seq-len or raise --max-seq-len"
        )


# ---- 4. the model's configuration and the budget -----------------------------------------------
def resolve_model_config(
    model_arg: Any, spec: ModelSpec, ckpt_cfg: ModelConfig | None, data_vocab: int, data_dir: Path
) -> ModelConfig:
    """The checkpoint's config, the given ModelConfig, or the spec built for the data's vocab."""
    if ckpt_cfg is not None:
        model_cfg = ckpt_cfg
    elif isinstance(model_arg, ModelConfig):
        model_cfg = model_arg.validate()
    else:
        model_cfg = spec.build(data_vocab)
    if model_cfg.vocab_size < data_vocab:
        raise ConfigError(
            f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the data's "
            f"({data_vocab}, {data_dir})"
        )
    return model_cfg


def fit_to_seq_len(
    model_cfg: ModelConfig, seq_len: int, explicit: frozenset[str], fresh: bool
) -> tuple[ModelConfig, str | None]:
    """The architecture's defaults that depend on the training length (the hybrid's window:
    at most half of it) for the fields the user left unset, in a fresh run only; and its
    warning for an explicit setting that does not fit the length."""
    from ..models import registry

    fit = registry.get(model_cfg.architecture).fit_seq_len
    if fit is None:
        return model_cfg, None
    changes, warning = fit(model_cfg, seq_len, explicit)
    if changes and fresh:
        model_cfg = model_cfg.replace(**changes).validate()
    return model_cfg, warning


@dataclass(frozen=True)
class Budget:
    seq_len: int
    total_steps: int
    tokens_per_step: int  # global: batch x accumulation x seq_len x world size


def resolve_budget(
    cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, meta: dict[str, Any] | None = None
) -> Budget:
    """Sequence length and step budget; fills ``cfg.warmup_steps`` once (stored, so a resume
    keeps it). Data of whole fixed-length examples (mqar, selective-copy) fixes the length
    when --seq-len is not given."""
    fixed = int(meta["seq_len"]) if meta and meta.get("task") in FIXED_LENGTH_TASKS else None
    seq_len = cfg.seq_len or fixed or model_cfg.max_seq_len
    if model_cfg.uses_learned_positions and seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"--seq-len {seq_len} exceeds the model's max_seq_len "
            f"{model_cfg.max_seq_len} (learned positions): lower --seq-len or raise --max-seq-len"
        )
    total_steps = cfg.total_steps(seq_len, world_size)
    if cfg.warmup_steps is None:
        cfg.warmup_steps = default_warmup_steps(total_steps)
    return Budget(seq_len, total_steps, cfg.tokens_per_step(seq_len, world_size))


def open_datasets(data_dir: Path, seq_len: int, dist: DistInfo) -> tuple[Any, Any]:
    """(train, val) TokenDatasets; the train one gathers this rank's rows."""
    from ..data.loader import TokenDataset

    train_ds = TokenDataset(data_dir, "train", dist.rank, dist.world_size)
    val_ds = TokenDataset(data_dir, "val")
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if ds.num_tokens <= seq_len + 1:
            raise UserError(
                f"{data_dir}: the {split} split has {ds.num_tokens} tokens, too few "
                f"for --seq-len {seq_len}"
            )
    return train_ds, val_ds


# ---- 5. the model -------------------------------------------------------------------------------
def build_run_model(
    model_cfg: ModelConfig, source: Path | None, cfg: TrainConfig, device: torch.device, rank: int
) -> tuple[nn.Module, int | None]:
    """The seeded model (weights from ``source`` if any) on ``device``, and the process's
    memory before it existed (interpreter, torch, data maps): the report subtracts that so
    the memory column is the model's own (CPU RSS is mostly torch)."""
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    from ..models import build_model

    if device.type == "cpu":
        reset_cpu_peak()  # the peak from here on is this run's, not the process's lifetime's
    mem_before_model = current_memory_bytes(device)
    model = build_model(model_cfg)
    if source is not None:
        ckpt_mod.load_weights(model, source)
    model.to(device)
    model.gradient_checkpointing = cfg.use_gradient_checkpointing
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for float32 runs
    return model, mem_before_model


def build_optimization(
    model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, Schedule]:
    """AdamW (decay groups, fused where the device has it) and the schedule (--schedule)."""
    betas = (cfg.beta1, cfg.beta2)
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, betas, device.type)
    schedule = make_schedule(
        cfg.schedule,
        cfg.learning_rate,
        cfg.warmup_steps,  # type: ignore[arg-type]
        total_steps,
        cfg.min_lr_ratio,
        cfg.decay_fraction,
    )
    return optimizer, schedule


# ---- 6. wrappers -------------------------------------------------------------------------------
def wrap_model(
    model: nn.Module, use_compile: bool, dist: DistInfo, device: torch.device
) -> tuple[nn.Module, nn.Module, Any]:
    """(what training calls, what evaluation calls, the DDP wrapper or None).

    One process: compile the model, train and evaluate the compiled one. Data parallel: DDP
    first, then compile the wrapper (PyTorch's recommended order: the compiler splits graphs
    at gradient buckets so communication overlaps the backward); evaluation then runs the
    plain model, as DDP is only needed for gradients.
    """
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids)
        return (torch.compile(ddp) if use_compile else ddp), model, ddp
    if use_compile:
        compiled = torch.compile(model)
        return compiled, compiled, None
    return model, model, None

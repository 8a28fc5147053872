"""Generated fixed-length tasks (mqar, selective-copy) as prepared data folders.

Both are synthetic probes whose examples are whole rows of ``seq_len + 1`` tokens with a loss
mask on the answer tokens; the loader and `archlab eval` read them aligned, so ``--seq-len``
must equal the data's. Each task is described once (``TASKS``: its prepare options, its
config, its folder name, the meta.json keys it adds) and prepared by one shared path,
``prepare_generated``, that writes what every prepared folder has: token files and masks,
the task's tokenizer, and a meta.json with the settings hash and the data baselines.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import UserError
from .folder import (
    FORMAT_VERSION,
    add_missing_baselines,
    atomic_build,
    baselines_meta,
    check_replaceable,
    locked,
    log,
    settings_digest,
    up_to_date,
    write_meta,
)

# Tasks whose examples are whole, fixed-length rows (the loader and eval read them aligned).
FIXED_LENGTH_TASKS = ("mqar", "selective-copy")
_VAL_SEED_OFFSET = 1_000_003  # val examples come from seed + this: never the train stream


@dataclass(frozen=True)
class GeneratedTask:
    """How `archlab prepare` knows one generated task.

    ``module`` generates it: ``Config`` (a dataclass with ``validate``, ``to_dict``,
    ``vocab_size``, ``seq_len``, ``num_train``, ``num_val``), ``generate(cfg, n, seed)`` ->
    (tokens, mask) of shape (n, seq_len + 1), and ``tokenizer(vocab_size)``.
    """

    name: str  # the source name, meta.json's "task" and the default folder's stem
    config_key: str  # the config's key in the settings hash and in meta.json
    flag_prefix: str  # the task's own flags: --mqar-..., --sc-...
    options: dict[str, str]  # prepare option -> config field
    load: Callable[[], ModuleType]  # the generator module (imported on use)
    config_class: str  # its config dataclass
    folder_name: Callable[[Any], str]  # a non-default config -> folder name
    extra_meta: Callable[[Any], dict[str, Any]]  # meta.json keys of this task only
    summary: Callable[[dict[str, Any]], str]  # meta.json -> its clause in `prepare`'s summary


def _mqar() -> ModuleType:
    from . import mqar

    return mqar


def _selective_copy() -> ModuleType:
    from . import selective_copy

    return selective_copy


TASKS: dict[str, GeneratedTask] = {
    "mqar": GeneratedTask(
        name="mqar",
        config_key="mqar",
        flag_prefix="mqar",
        options={
            "mqar_vocab_size": "vocab_size",
            "mqar_pairs": "num_kv_pairs",
            "mqar_seq_len": "seq_len",
            "mqar_train_examples": "num_train",
            "mqar_val_examples": "num_val",
            "mqar_power_a": "power_a",
        },
        load=_mqar,
        config_class="MQARConfig",
        folder_name=lambda c: f"mqar-v{c.vocab_size}-kv{c.num_kv_pairs}-len{c.seq_len}",
        extra_meta=lambda c: {"num_kv_pairs": c.num_kv_pairs, "mqar": c.to_dict()},
        summary=lambda m: (
            f"MQAR: {m['num_kv_pairs']} pairs, sequences of {m['seq_len']} tokens, metric accuracy"
        ),
    ),
    "selective-copy": GeneratedTask(
        name="selective-copy",
        config_key="selective_copy",
        flag_prefix="sc",
        options={
            "sc_vocab_size": "vocab_size",
            "sc_tokens": "num_tokens",
            "sc_seq_len": "seq_len",
            "sc_train_examples": "num_train",
            "sc_val_examples": "num_val",
        },
        load=_selective_copy,
        config_class="SelectiveCopyConfig",
        folder_name=lambda c: f"selective-copy-v{c.vocab_size}-k{c.num_tokens}-len{c.seq_len}",
        extra_meta=lambda c: {"num_tokens_to_copy": c.num_tokens, "selective_copy": c.to_dict()},
        summary=lambda m: (
            f"selective copying: {m['num_tokens_to_copy']} tokens to copy, sequences of "
            f"{m['seq_len']} tokens, metric accuracy"
        ),
    ),
}


def pop_task_options(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Take every task's own options out of ``options``: {task: {option: value}}."""
    return {
        name: {k: options.pop(k) for k in list(options) if k in task.options}
        for name, task in TASKS.items()
    }


def check_task_options(source: str, task_opts: dict[str, dict[str, Any]]) -> None:
    """A task's own flag given for another source is a user error."""
    for name, opts in task_opts.items():
        given = [k for k, v in opts.items() if v is not None]
        if given and name != source:
            raise UserError(f"--{given[0].replace('_', '-')} applies to the {name} source only")


def prepare_generated(
    source: str,
    out_dir: str | os.PathLike | None,
    *,
    tokenizer: str | None,
    vocab_size: int | None,
    seed: int,
    val_fraction: float | None,
    max_tokens: int | None,
    force: bool,
    verbose: bool,
    wait_for_lock: bool,
    task_options: dict[str, Any],
    source_options: dict[str, Any],
) -> Path:
    """Generate ``source`` (a name in TASKS) into ``out_dir``; reuse it when up to date.

    The text-corpus flags (tokenizer, vocabulary, val fraction, token budget, source options)
    do not apply: a generated task has its own vocabulary and example counts."""
    task = TASKS[source]
    p = task.flag_prefix
    for flag, value in (
        ("--tokenizer", tokenizer),
        (f"--vocab-size (use --{p}-vocab-size)", vocab_size),
        (f"--val-fraction (use --{p}-val-examples)", val_fraction),
        (f"--max-tokens (use --{p}-train-examples)", max_tokens),
    ):
        if value is not None:
            raise UserError(f"{flag} does not apply to the {task.name} source")
    for k, v in source_options.items():
        if v is not None:
            raise UserError(f"--{k.replace('_', '-')} does not apply to the {task.name} source")
    module = task.load()
    config_class = getattr(module, task.config_class)
    kw = {task.options[k]: v for k, v in task_options.items() if v is not None}
    cfg = config_class(**kw).validate()
    settings = {
        "format_version": FORMAT_VERSION,
        "source": task.name,
        task.config_key: cfg.to_dict(),
        "seed": seed,
    }
    digest = settings_digest(settings)
    name = task.name if cfg == config_class() else task.folder_name(cfg)
    out = Path(out_dir) if out_dir is not None else Path("data") / name
    with locked(out, wait_for_lock, verbose):
        if not force and up_to_date(out, digest):
            log(f"{out} is up to date (same settings); reusing it", verbose)
            add_missing_baselines(out, verbose)
            return out
        check_replaceable(out)
        log(f"preparing {task.name} -> {out}", verbose)
        t0 = time.time()

        def build(tmp: Path) -> None:
            tok = module.tokenizer(cfg.vocab_size)
            dtype = np.uint16 if cfg.vocab_size <= 2**16 else np.uint32
            counts = {}
            for split, n, s in (
                ("train", cfg.num_train, seed),
                ("val", cfg.num_val, seed + _VAL_SEED_OFFSET),
            ):
                tokens, mask = module.generate(cfg, n, s)  # (n, seq_len + 1) each
                tokens.astype(dtype).tofile(tmp / f"{split}.bin")
                mask.tofile(tmp / f"{split}_mask.bin")
                counts[split] = (tokens.size, n, int(mask.sum()))
            tok.save(tmp / "tokenizer.json")
            meta = {
                "task": task.name,
                "source": task.name,
                "source_spec": task.name,
                "name": name,
                "tokenizer": tok.kind,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "special_tokens": tok.special_tokens,
                "dtype": np.dtype(dtype).name,
                "seq_len": cfg.seq_len,
                "example_tokens": cfg.seq_len + 1,
                **task.extra_meta(cfg),
                "train_tokens": counts["train"][0],
                "val_tokens": counts["val"][0],
                "train_docs": counts["train"][1],
                "val_docs": counts["val"][1],
                "train_loss_tokens": counts["train"][2],
                "val_loss_tokens": counts["val"][2],
                "has_mask": True,
                "split": "generated",
                "entropy_floor": None,
                "metric": "accuracy",
                "hash": digest,
                "settings": settings,
                "seed": seed,
                "prepare_seconds": round(time.time() - t0, 3),
            }
            meta.update(baselines_meta(tmp, meta))
            write_meta(tmp, meta)

        atomic_build(out, build)
    return out

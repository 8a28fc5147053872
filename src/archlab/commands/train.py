"""archlab train: train one architecture on one stage (language, code, chat).

The seed's command lines run unchanged (``scripts/train.py`` is a shim onto this command)::

    python3 scripts/train.py --architecture mamba --stage language --model-size tiny \\
        --batch-size 8 --num-epochs 1 --steps-per-epoch 100 --use-amp

Precedence: TrainConfig defaults < ``--config FILE`` (YAML or JSON, same keys as the flags,
dashes or underscores) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from typing import Any

from ..errors import UserError, is_out_of_memory, out_of_memory_line
from ..train.allocator import keep_freed_memory
from .config_file import FILE_ONLY_KEYS, apply_config_file
from .model_args import MODEL_KEYS, add_model_args

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}

# Flags whose destinations are TrainConfig fields (every one defaults to None so that the
# command can tell an explicit flag from a default; TrainConfig holds the real defaults).
TRAIN_KEYS = (
    "stage",
    "data",
    "out_dir",
    "seed",
    "device",
    "batch_size",
    "gradient_accumulation_steps",
    "seq_len",
    "num_epochs",
    "steps_per_epoch",
    "max_tokens",
    "learning_rate",
    "warmup_steps",
    "schedule",
    "decay_fraction",
    "weight_decay",
    "grad_clip",
    "max_nan_steps",
    "use_amp",
    "use_compile",
    "use_gradient_checkpointing",
    "num_threads",
    "eval_interval",
    "eval_steps",
    "log_interval",
    "checkpoint_interval",
    "keep_checkpoints",
    "tensorboard",
    "wandb",
    "init_from",
)
# FILE_ONLY_KEYS (config_file.py): TrainConfig fields only --config sets.
SPEC_KEYS = ("architecture", "model_size", "preset", "vocab_size", *MODEL_KEYS)


def parse_count(text: str) -> int:
    """'2000000', '2_000_000', '2e6', '2M', '500k' -> int."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kmbgt]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 2000000, 2e6, 2M)")
    value = float(m.group(1)) * _SUFFIX.get(m.group(2), 1)
    return int(round(value))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (language, code or chat stage)",
        description="Train one architecture; writes metrics.jsonl, checkpoints and summary.json "
        "into the run folder (--out-dir).",
    )
    add_model_args(p)
    p.set_defaults(architecture=None)  # None: dense, or the checkpoint's architecture
    p.add_argument(
        "--recipe",
        default=None,
        metavar="{modern,classic}",
        help="model recipe: modern (RMSNorm, RoPE, SwiGLU, no biases) or classic (the seed's "
        "GPT-2-style defaults; the default here). Explicit model flags (--use-rope, --mlp, "
        "...) win over it and the run records them beside the recipe",
    )
    B = argparse.BooleanOptionalAction

    g = p.add_argument_group("run")
    g.add_argument(
        "--stage",
        choices=("language", "code", "chat"),
        default=None,
        help="training stage; picks the default data (language: stories, code: "
        "python, chat: rustgpt-chat) (default: language)",
    )
    g.add_argument(
        "--data",
        default=None,
        help="prepared data folder, built-in source (stories, python, rustgpt, "
        "rustgpt-chat, mqar, tinystories) or local file/folder/glob",
    )
    g.add_argument("--out-dir", default=None, help="run folder (default: runs/ARCH-STAGE-TIME)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "mps"),
        default=None,
        help="auto picks cuda, then mps, then cpu (default: auto)",
    )
    g.add_argument(
        "--init-from",
        default=None,
        help="checkpoint or run folder to start from (language -> code, "
        "pretraining -> chat); the data is tokenized with its tokenizer",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN",
        help="continue a run exactly from its latest checkpoint (RUN, a checkpoint "
        "folder, or --out-dir when given without a value)",
    )
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON file with the same keys as the flags; flags override it",
    )

    g = p.add_argument_group("batch and budget")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per micro-batch per process (default: 8)",
    )
    g.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=None,
        help="micro-batches per optimizer step (default: 1)",
    )
    g.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: the model's max sequence length)",
    )
    g.add_argument("--num-epochs", type=int, default=None, help="epochs (default: 1)")
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="optimizer steps per epoch (default: 1000)",
    )
    g.add_argument(
        "--max-tokens",
        type=parse_count,
        default=None,
        help="token budget (e.g. 2M); steps = ceil(N / (batch x accumulation x "
        "seq-len x processes)); overrides epochs",
    )

    g = p.add_argument_group("optimizer")
    g.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak AdamW rate "
        "(default: the shipped table's rate for the architecture, size and recipe)",
    )
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="linear warmup steps (5%% of the run, at most 100)",
    )
    g.add_argument(
        "--schedule",
        default=None,
        choices=("cosine", "wsd"),
        help="after warmup: cosine (decays over the whole run) or wsd (constant, then a "
        "linear decay over the last --decay-fraction; a resume with a larger budget moves the "
        "decay to the new end exactly) (cosine)",
    )
    g.add_argument(
        "--decay-fraction",
        type=float,
        default=None,
        help="wsd: the share of the run the final decay takes (0.2)",
    )
    g.add_argument(
        "--weight-decay", type=float, default=None, help="AdamW decay of weight matrices (0.1)"
    )
    g.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        help="clip the global gradient norm; 0 disables (1.0)",
    )
    g.add_argument(
        "--max-nan-steps",
        type=int,
        default=None,
        help="stop after this many non-finite steps in a row (10)",
    )

    g = p.add_argument_group("speed")
    g.add_argument(
        "--use-amp",
        action=B,
        default=None,
        help="mixed precision: bf16 autocast where supported, else fp16 + scaler",
    )
    g.add_argument("--use-compile", action=B, default=None, help="torch.compile the model")
    g.add_argument(
        "--use-gradient-checkpointing",
        action=B,
        default=None,
        help="recompute each block's activations in the backward pass",
    )
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="evaluate every N steps and at the end; 0: only at the end (200)",
    )
    g.add_argument(
        "--eval-steps", type=int, default=None, help="fixed validation batches per evaluation (20)"
    )
    g.add_argument("--log-interval", type=int, default=None, help="log every N steps (10)")
    g.add_argument(
        "--checkpoint-interval",
        type=int,
        default=None,
        help="checkpoint every N steps and at the end; 0: only at the end (1000)",
    )
    g.add_argument("--keep-checkpoints", type=int, default=None, help="keep the last K (3)")
    g.add_argument("--tensorboard", action=B, default=None, help="also log to TensorBoard")
    g.add_argument("--wandb", action=B, default=None, help="also log to Weights & Biases")
    g.add_argument(
        "--quiet",
        action="store_true",
        default=None,
        help="no progress output (model summary, bar or log lines); the final summary and "
        "warnings still print",
    )

    # Test-only fault injection, hidden from --help.
    p.add_argument(
        "--debug-nan-at-step", type=int, action="append", default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--debug-sigkill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-save-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-flops-per-s", type=float, default=None, help=argparse.SUPPRESS)


# ---- run -------------------------------------------------------------------------------------
def build_configs(args: argparse.Namespace):
    """(TrainConfig, ModelSpec, explicit train keys) from parsed (and config-merged) args."""
    from ..recipes import check_recipe
    from ..train.config import TrainConfig
    from ..train.trainer import ModelSpec

    train_kw = {k: getattr(args, k, None) for k in (*TRAIN_KEYS, *FILE_ONLY_KEYS)}
    explicit = {k for k, v in train_kw.items() if v is not None}
    train_kw = {k: v for k, v in train_kw.items() if v is not None}
    try:
        cfg = TrainConfig(**train_kw)
    except TypeError as exc:
        raise UserError(f"bad training configuration ({exc})") from None
    overrides = {k: getattr(args, k, None) for k in ("vocab_size", *MODEL_KEYS)}
    spec = ModelSpec(
        architecture=getattr(args, "architecture", None),
        model_size=getattr(args, "model_size", None),
        preset=getattr(args, "preset", None),
        overrides={k: v for k, v in overrides.items() if v is not None},
        recipe=check_recipe(args.recipe) if getattr(args, "recipe", None) is not None else None,
    )
    return cfg, spec, explicit


def run(args: argparse.Namespace) -> int:

    from .. import _started_as_command
    from ..train.trainer import DebugHooks, run_training

    if _started_as_command():  # a process that only trains (not a library or test caller):
        keep_freed_memory()  # its large tensors reuse freed memory (see train/allocator.py)
    if getattr(args, "config", None):
        apply_config_file(args, train_parser())
    cfg, spec, explicit = build_configs(args)
    if not args.resume and not cfg.init_from:  # refuse flags that would change nothing, early
        from ..config import check_fields_apply

        check_fields_apply(
            spec.architecture or "dense", spec.preset, list(spec.overrides), spec.model_size
        )
        if cfg.learning_rate is None:  # the table's rate: a bad table fails before any work
            from ..train.lr_table import check_rows

            recipe = spec.resolved_recipe if spec.preset is None else "classic"
            check_rows(spec.architecture or "dense", recipe)
    hooks = DebugHooks(
        nan_at_steps=frozenset(args.debug_nan_at_step or ()),
        sigkill_at_step=args.debug_sigkill_at_step,
        step_delay_s=args.debug_step_delay,
        save_delay_s=args.debug_save_delay,
        flops_per_s=args.debug_flops_per_s,
    )
    try:
        summary = run_training(
            cfg,
            spec,
            resume=args.resume,
            explicit=explicit,
            hooks=hooks,
            progress=not args.quiet,
            report=True,
        )
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if is_out_of_memory(exc):
            raise UserError(out_of_memory_line(exc, OOM_ADVICE)) from None
        raise
    if summary.get("status") == "interrupted":
        return _report_interrupt(summary)
    return 0 if summary.get("status") == "ok" else 1


def _report_interrupt(summary: dict[str, Any]) -> int:
    """One line: where the run stopped, its checkpoint and how to continue; exit 128 + signal."""
    import signal
    import sys

    name = summary.get("interrupted_by") or "SIGINT"
    signum = int(getattr(signal, name, signal.SIGINT))
    if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 128 + signum
    run_dir = summary["train_config"]["out_dir"]
    launch = " (under the same torchrun launch)" if summary.get("world_size", 1) > 1 else ""
    print(
        f"archlab train: {name}: stopped at step {summary['steps']}; checkpoint "
        f"{summary.get('checkpoint')} saved; resume with: archlab train --resume "
        f"{shlex.quote(str(run_dir))}{launch}",
        file=sys.stderr,
    )
    return 128 + signum


def train_parser() -> argparse.ArgumentParser:
    """The ``train`` subparser (to read its actions when applying --config), built as
    ``cli.build_parser`` builds it: the command's flags, the common ones, checked types."""
    from ..values import install_checks
    from .parser import ArgumentParser, add_common_flags

    parser = ArgumentParser(prog="archlab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    register(sub)
    add_common_flags(sub)
    install_checks(parser)
    return sub.choices["train"]


OOM_ADVICE = (
    "try a smaller --batch-size (with more --gradient-accumulation-steps to keep the "
    "effective batch), --seq-len, --use-gradient-checkpointing, --use-amp or a smaller model "
    "(--model-size, --d-model, --n-layers)"
)

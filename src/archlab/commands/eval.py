"""`archlab eval`: validation loss, perplexity and bits per byte of a checkpoint (MQAR: accuracy)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="validation loss, perplexity, bits per byte (MQAR: accuracy); lm-eval tasks",
        description="Cover the split with consecutive windows so every token is predicted "
        "once; report loss (nats/token), perplexity, bits per byte and, on MQAR data, "
        "answer accuracy. With --tasks, run EleutherAI lm-evaluation-harness tasks on the "
        "checkpoint's own model and tokenizer instead (any architecture; pip install "
        "'archlab[eval]').",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder or run folder (its latest checkpoint)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="prepared folder, built-in source or local files (tokenized with the "
        "checkpoint's tokenizer); default: the data the run trained on",
    )
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length (default: the run's training seq-len)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="evaluate only the first N target tokens (default: the whole split)",
    )
    h = p.add_argument_group("lm-evaluation-harness (with --tasks)")
    h.add_argument(
        "--tasks",
        default=None,
        metavar="T1,T2",
        help="comma-separated lm-eval task or group names (hub tasks need network access)",
    )
    h.add_argument(
        "--include-path",
        default=None,
        metavar="DIR",
        help="folder of local task YAMLs (e.g. dataset_path: json with local data_files)",
    )
    h.add_argument(
        "--limit",
        type=float,
        default=None,
        metavar="N",
        help="evaluate only the first N documents per task (a value < 1: that fraction)",
    )
    h.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    h.add_argument("--seed", type=int, default=None, help="seed of few-shot sampling (default 0)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output over the batches")


def run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_tasks(args)
    given = [
        flag
        for flag, value in (
            ("--include-path", args.include_path),
            ("--limit", args.limit),
            ("--num-fewshot", args.num_fewshot),
            ("--seed", args.seed),
        )
        if value is not None
    ]
    if given:
        from ..errors import UserError

        raise UserError(f"{', '.join(given)} apply only with --tasks (lm-evaluation-harness)")
    from ..bench.eval.evaluate import run_eval, to_json

    result = run_eval(
        args.checkpoint,
        args.data,
        split=args.split,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        device=args.device,
        quiet=args.quiet,
    )
    print(to_json(result) if args.json else "\n".join(result.lines()))
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """lm-eval tasks; --seq-len sets the scoring window (default: the model's max_seq_len)."""
    from ..bench.eval.lm_eval_tasks import run_harness
    from ..errors import UserError

    if args.data is not None or args.max_tokens is not None or args.split != "val":
        raise UserError("--data, --split and --max-tokens do not apply with --tasks")
    result = run_harness(
        args.checkpoint,
        args.tasks.split(","),
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        max_length=args.seq_len,
        seed=0 if args.seed is None else args.seed,
        quiet=args.quiet,
    )
    print(result.to_json() if args.json else result.table())
    return 0

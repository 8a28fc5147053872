"""`archlab eval`: validation loss, perplexity and bits per byte of a checkpoint (MQAR: accuracy)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="validation loss, perplexity, bits per byte (MQAR: accuracy) of a checkpoint",
        description="Cover the split with consecutive windows so every token is predicted "
        "once; report loss (nats/token), perplexity, bits per byte and, on MQAR data, "
        "answer accuracy.",
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
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output over the batches")


def run(args: argparse.Namespace) -> int:
    from ..bench.evaluate import run_eval, to_json

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

"""`archlab bench recall`: flags of the associative-recall / selective-copying probe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument(
        "--task",
        default=None,
        help="mqar (Zoology's multi-query associative recall, default) or selective-copy (MAD)",
    )
    r.add_argument(
        "--architectures", default=None, help="comma list (aliases ok; default: all five)"
    )
    r.add_argument("--d-models", default=None, help="comma list of widths (default 32,64)")
    r.add_argument(
        "--kv-pairs",
        default=None,
        help="comma list of key-value pairs per sequence (selective-copy: tokens to copy; "
        "default 2,4)",
    )
    r.add_argument("--seq-len", type=int, default=None, help="training length (default 32)")
    r.add_argument(
        "--learning-rates",
        default=None,
        help="comma list; each cell keeps the best by validation accuracy (default 3e-3)",
    )
    r.add_argument("--seeds", type=int, default=None, help="seeds per run (default 1)")
    r.add_argument("--seed", type=int, default=None, help="first seed; also the data's (0)")
    r.add_argument("--steps", type=int, default=None, help="optimizer steps per run (800)")
    r.add_argument("--batch-size", type=int, default=None, help="examples per step (32)")
    r.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary (mqar 32, selective-copy 16)"
    )
    r.add_argument("--n-heads", type=int, default=None, help="attention heads (default 4)")
    r.add_argument("--num-train", type=int, default=None, help="training examples (20000)")
    r.add_argument(
        "--num-val", type=int, default=None, help="validation examples, pick the rate (500)"
    )
    r.add_argument("--num-test", type=int, default=None, help="test examples, reported (1000)")
    r.add_argument(
        "--test-factor",
        type=int,
        default=None,
        help="also test at this many times the training length (default 2)",
    )
    r.add_argument("--power-a", type=float, default=None, help="mqar query-distance power law")
    r.add_argument("--weight-decay", type=float, default=None, help="AdamW decay (0.1)")
    r.add_argument(
        "--use-rope",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RoPE instead of learned absolute positions for dense/moe/hypermixer "
        "(default: each architecture's own; learned positions cannot extrapolate)",
    )
    r.add_argument("--threads", type=int, default=None, help="torch threads per run")
    r.add_argument(
        "--device",
        default=None,
        help="cpu (default), cuda, mps or auto (the full grid wants a GPU)",
    )
    r.add_argument(
        "--out-dir", default=None, help="output folder (default runs/bench-recall-<time>)"
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the grid in --out-dir: finished runs are kept, the rest run",
    )


def raw_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The user's explicit values (None = unset), keyed like RecallSettings."""
    from ..bench.common.options import parse_architectures, parse_int_list, parse_learning_rates

    raw: dict[str, Any] = {
        key: getattr(args, key)
        for key in (
            "task",
            "seq_len",
            "seeds",
            "seed",
            "steps",
            "batch_size",
            "vocab_size",
            "n_heads",
            "num_train",
            "num_val",
            "num_test",
            "test_factor",
            "power_a",
            "weight_decay",
            "use_rope",
            "threads",
            "device",
        )
    }
    if args.task is not None:
        from ..bench.recall.tasks import check_task

        check_task(args.task)
    raw["architectures"] = (
        parse_architectures(args.architectures) if args.architectures is not None else None
    )
    raw["d_models"] = parse_int_list(args.d_models, "--d-models") if args.d_models else None
    raw["kv_pairs"] = parse_int_list(args.kv_pairs, "--kv-pairs") if args.kv_pairs else None
    raw["learning_rates"] = (
        sorted(parse_learning_rates(args.learning_rates)) if args.learning_rates else None
    )
    return raw


def run(args: argparse.Namespace) -> int:
    from ..bench.common.options import timestamped_dir
    from ..bench.recall import loop as recall
    from ..bench.recall import settings as recall_settings
    from ..errors import UserError

    raw = raw_settings(args)
    if args.resume:
        if not args.out_dir:
            raise UserError("--resume needs --out-dir (the folder of the grid to continue)")
        out_dir = Path(args.out_dir)
        settings = recall_settings.load_saved_settings(out_dir)
        recall_settings.check_resume_flags(settings, raw)
    else:
        settings = recall_settings.settings_from_flags(raw)
        out_dir = Path(args.out_dir) if args.out_dir else timestamped_dir("bench-recall")
        if (out_dir / "recall.json").exists():
            raise UserError(
                f"--out-dir {out_dir} already holds a recall grid; pass --resume to continue it "
                "or choose another folder"
            )
    from ..fsutil import ensure_writable_dir, lock_folder

    ensure_writable_dir(out_dir, "--out-dir")  # fail now, not after the first run
    with lock_folder(out_dir, "recall grid"):  # a second process on this grid is refused
        outcome = recall.run_grid(settings, out_dir, resume=args.resume)
    print()
    from ..bench.recall.report import tables

    for pairs, table in tables(settings, outcome["cells"]).items():
        print(f"{pairs} pairs, length {settings.seq_len}:")
        print(table)
        print()
    print("wrote " + ", ".join(str(p) for p in outcome["paths"].values()))
    ok = any(r.get("ok") for r in outcome["results"])
    return 0 if ok else 1

"""`archlab compare`: train architectures under one protocol; table, winners, report, plots.

With no arguments: every registered architecture at nano size on the built-in stories, each
at its tuned rate under the modern recipe (wall time: see DEFAULT_BUDGET_NOTE). Exit code 0 when at least one run finished, 1 when all failed,
2 for a user error (unknown architecture, budget below one step, existing out-dir, ...).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from ..bench.compare.loop import DEFAULT_BUDGET_NOTE
    from ..models import registry

    p = subparsers.add_parser(
        "compare",
        help="train several architectures under the same protocol and report",
        description="Train each architecture in its own process on the same data, budget, "
        "batch, optimizer, schedule and seed; print a table and winners; write report.md, "
        "results.json/csv and loss plots. " + DEFAULT_BUDGET_NOTE + ".",
    )
    B = argparse.BooleanOptionalAction
    p.add_argument(
        "--architectures",
        default=None,
        help="comma list, aliases ok (default: every registered architecture, "
        + ",".join(registry.SPECS)
        + ")",
    )
    p.add_argument("--model-size", default=None, help="size preset for all (default: nano)")
    p.add_argument(
        "--data",
        default=None,
        help="prepared folder, built-in source or local files (default: stories, "
        "BPE 4096), prepared once for all runs",
    )
    g = p.add_argument_group("budget (one of)")
    from .train import parse_count

    g.add_argument(
        "--max-tokens",
        type=parse_count,
        default=None,
        help="training tokens per architecture (default: 160k)",
    )
    g.add_argument("--num-epochs", type=int, default=None)
    g.add_argument("--steps-per-epoch", type=int, default=None)
    g = p.add_argument_group("protocol (the same for every architecture)")
    g.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (128; mqar and selective-copy data: their own length)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (16)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=None, help="(1)")
    g.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak AdamW rate for every "
        "architecture (default: each architecture's rate from the shipped table, "
        "src/archlab/train/lr_table.json)",
    )
    g.add_argument(
        "--learning-rates",
        default=None,
        help="a sweep, e.g. 3e-4,1e-3,3e-3: every architecture trains at every rate (same "
        "seeds) and is reported at its best; the whole grid goes to results.json/csv and "
        "loss_vs_lr.png",
    )
    g.add_argument("--warmup-steps", type=int, default=None, help="(5%% of the steps, at most 100)")
    g.add_argument("--eval-interval", type=int, default=None, help="(an eighth of the steps)")
    g.add_argument("--eval-steps", type=int, default=None, help="validation batches (4)")
    g.add_argument("--log-interval", type=int, default=None, help="(a hundredth of the steps)")
    g.add_argument(
        "--checkpoint-interval",
        type=int,
        default=None,
        help="(a quarter of the steps; lets --resume continue a run midway)",
    )
    g.add_argument("--use-amp", action=B, default=None)
    g.add_argument("--use-compile", action=B, default=None)
    g.add_argument("--use-gradient-checkpointing", action=B, default=None)
    g.add_argument(
        "--recipe",
        default=None,
        metavar="{modern,classic}",
        help="the model recipe of every architecture: modern (RMSNorm everywhere, RoPE in "
        "every attention layer, SwiGLU in every MLP, no biases; the default) or classic (the "
        "seed's GPT-2-style defaults)",
    )
    g.add_argument(
        "--use-rmsnorm", action=B, default=None, help="(the recipe's; an explicit flag wins)"
    )
    g.add_argument(
        "--use-rope", action=B, default=None, help="(the recipe's; an explicit flag wins)"
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=None)
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per run")
    g.add_argument("--seed", type=int, default=None, help="first seed (0)")
    g.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds; cells show mean ± std over them (1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison in --out-dir: finished runs are skipped",
    )
    p.add_argument("--out-dir", default=None, help="(default: runs/compare-<time>)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (bars or progress lines); run results and the table still print",
    )


SETTING_KEYS = (
    "model_size",
    "max_tokens",
    "num_epochs",
    "steps_per_epoch",
    "seq_len",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "warmup_steps",
    "eval_interval",
    "eval_steps",
    "log_interval",
    "checkpoint_interval",
    "use_amp",
    "use_compile",
    "use_gradient_checkpointing",
    "use_rmsnorm",
    "use_rope",
    "device",
    "num_threads",
    "seed",
    "seeds",
    "recipe",
)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bench.common.options import (
        parse_architectures,
        parse_learning_rates,
        parse_sizes,
        timestamped_dir,
    )
    from ..bench.compare import loop as compare
    from ..errors import UserError
    from ..fsutil import ensure_writable_dir, lock_folder

    raw: dict[str, Any] = {k: getattr(args, k) for k in SETTING_KEYS}
    raw["learning_rates"] = parse_learning_rates(args.learning_rates)
    if args.architectures is not None:
        raw["architectures"] = parse_architectures(args.architectures)
    if args.model_size is not None:
        sizes = parse_sizes(args.model_size)
        if len(sizes) != 1:
            raise UserError(f"--model-size: one size per comparison (got {args.model_size!r})")
        raw["model_size"] = sizes[0]

    if getattr(args, "device", None) in ("cuda", "mps"):  # refused here, not by every run
        from ..train.device import pick_device

        pick_device(args.device)
    # The comparison folder is locked for the command's life: a second compare into it is
    # refused (exit 2, naming the holder's pid); the kernel frees it when this process dies.
    if args.resume:
        if args.out_dir is None:
            raise UserError("--resume: give the comparison folder with --out-dir")
        out_dir = Path(args.out_dir)
        if not out_dir.is_dir():
            raise UserError(f"--resume: {out_dir} does not exist")
    else:
        out_dir = Path(args.out_dir) if args.out_dir else timestamped_dir("compare")
        if out_dir.is_dir() and _has_content(out_dir):  # before creating anything
            raise UserError(
                f"--out-dir {out_dir} exists and is not empty; pass --resume to continue that "
                "comparison or choose another --out-dir"
            )
        raw.setdefault("architectures", parse_architectures(None))
        compare.settings_from_flags(raw)  # flag errors before any folder or data work
        ensure_writable_dir(out_dir, "--out-dir")
    with lock_folder(out_dir, "comparison folder"):
        return _run(args, out_dir, raw)


def _has_content(folder: Any) -> bool:
    from ..fsutil import LOCK_NAME

    return any(p.name != LOCK_NAME for p in folder.iterdir())


def _run(args: argparse.Namespace, out_dir: Any, raw: dict[str, Any]) -> int:
    import json
    import sys
    from pathlib import Path

    from ..bench.compare import loop as compare
    from ..errors import UserError

    if args.resume:
        settings = compare.load_saved_settings(out_dir)
        compare.check_resume_flags(settings, raw)
        if args.data is not None and Path(args.data).resolve() != Path(settings.data).resolve():
            raise UserError(
                f"--resume: this comparison trains on {settings.data} (compare.json); drop --data"
            )
        if compare.comparison_finished(settings, out_dir):
            print(
                f"archlab compare: {out_dir} is already finished "
                f"({len(compare.plan_runs(settings, out_dir))} runs ok, report.md written); "
                "nothing to do"
            )
            return 0
        data_dir = Path(settings.data)
        if not (data_dir / "meta.json").exists():
            raise UserError(f"--resume: the comparison's data folder {data_dir} is gone")
        meta = json.loads((data_dir / "meta.json").read_text())
    else:
        if _has_content(out_dir):  # a compare that took the folder just before us
            raise UserError(
                f"--out-dir {out_dir} exists and is not empty; pass --resume to continue that "
                "comparison or choose another --out-dir"
            )
        from ..data.prepare import resolve_data

        data_dir = Path(resolve_data(args.data, "language", None)).resolve()
        meta = json.loads((data_dir / "meta.json").read_text())
        settings = compare.settings_for_data(raw, data_dir, meta)

    outcome = compare.run_compare(
        settings, out_dir, resume=args.resume, meta=meta, quiet=args.quiet
    )
    print()
    print(outcome.header)
    print(_terminal_form(outcome))
    print()
    for w in outcome.winners:
        print(w.headline())
    print()
    files = ", ".join(f for f in compare.output_files(settings) if f != "report.md")
    per = "(architecture, learning rate)" if settings.sweep else "architecture"
    print(f"Report: {out_dir / 'report.md'} ({files}, one run folder per {per})")
    if outcome.exit_code:
        print("archlab compare: every run failed", file=sys.stderr)
    return outcome.exit_code


def _terminal_form(outcome: Any) -> str:
    """The table as report.md has it (a bench/compare/outputs.CompareOutcome's), narrowed when stdout
    is a terminal it would wrap in."""
    import shutil
    import sys

    if not sys.stdout.isatty():
        return outcome.table

    from ..bench.compare import report

    width = shutil.get_terminal_size().columns
    return report.terminal_table(outcome.archs, outcome.unigram, width)

"""`archlab bench lengths` and `archlab bench generate`: speed and memory sweeps.

`bench lengths` was `bench scaling` until the scaling-law study (`archlab scale`) took the
word; the old name is accepted, with a one-line note, until the next release
(``OLD_NAMES``). A run records the name it was given (its rerun command, its default folder),
so its outputs are what the old name wrote; the note is printed after a successful run, so an
error stays one line."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

OVERRIDE_FLAGS = ("d_model", "n_layers", "n_heads", "d_ff", "state_size", "local_window")
# old name -> new name, each accepted for one release after the rename
OLD_NAMES = {"scaling": "lengths"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--architectures", default=None, help="comma list (aliases ok; default: all five)"
    )
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or mps (default: cpu)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out-dir",
        default=None,
        help="where the table, JSON and plot go (default: runs/bench-<kind>-<time>)",
    )
    g = p.add_argument_group("model overrides (applied to every architecture)")
    g.add_argument("--d-model", type=int, default=None)
    g.add_argument("--n-layers", type=int, default=None)
    g.add_argument("--n-heads", type=int, default=None)
    g.add_argument("--d-ff", type=int, default=None)
    g.add_argument("--state-size", type=int, default=None)
    g.add_argument("--hybrid-local-window", dest="local_window", type=int, default=None)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="speed/memory sweeps (lengths, generate) and the recall probe (recall)"
    )
    sub = p.add_subparsers(
        dest="bench_command", metavar="BENCH", required=True, parser_class=type(p)
    )
    s = sub.add_parser(
        "lengths",
        aliases=["scaling"],
        help="forward and forward+backward time and memory against the sequence length T "
        "(formerly `bench scaling`, still accepted until the next release)",
    )
    _common(s)
    s.add_argument("--model-size", default="nano", help="size preset or comma list (nano)")
    s.add_argument(
        "--seq-lens", default="64,128,256,512,1024,2048", help="comma list of sequence lengths"
    )
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory, one fresh process per point (default: on)",
    )
    g = sub.add_parser("generate", help="per-token decoding latency and state against context")
    _common(g)
    g.add_argument("--model-size", default="nano", help="size preset (nano)")
    g.add_argument(
        "--contexts", default="16,64,256,1024,2048", help="comma list of context lengths"
    )
    g.add_argument("--new-tokens", type=int, default=16, help="timed decoding steps per point")
    g.add_argument("--warmup", type=int, default=3)
    from .bench_recall import add_arguments as add_recall_arguments

    r = sub.add_parser(
        "recall",
        help="associative recall (Zoology MQAR) or selective copying (MAD): accuracy per "
        "architecture x d_model x pairs, 2-layer models, best learning rate per cell",
    )
    add_recall_arguments(r)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in OVERRIDE_FLAGS if getattr(args, k) is not None}


def _positive(args: argparse.Namespace, *names: str) -> None:
    from ..errors import UserError

    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag}: must be >= 1 (got {value})")


def _rerun(kind: str, args: argparse.Namespace, lists: dict[str, str]) -> str:
    parts = ["archlab", "bench", kind]
    for key, value in lists.items():
        parts += [f"--{key}", value]
    for key in (
        "device",
        "threads",
        "batch_size",
        "vocab_size",
        "seed",
        "warmup",
        "repeats",
        "new_tokens",
        *OVERRIDE_FLAGS,
    ):
        value = getattr(args, key, None)
        if value is not None:
            flag = "hybrid-local-window" if key == "local_window" else key.replace("_", "-")
            parts += [f"--{flag}", str(value)]
    if kind in ("lengths", *OLD_NAMES) and not args.memory:
        parts.append("--no-memory")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "recall":
        from .bench_recall import run as run_recall

        return run_recall(args)
    from ..bench.common.options import (
        parse_architectures,
        parse_int_list,
        parse_sizes,
        timestamped_dir,
    )
    from ..fsutil import ensure_writable_dir

    _positive(args, "threads", "batch_size", "vocab_size", "repeats", "new_tokens", *OVERRIDE_FLAGS)
    if getattr(args, "warmup", 0) < 0:
        from ..errors import UserError

        raise UserError(f"--warmup: must be >= 0 (got {args.warmup})")
    archs = parse_architectures(args.architectures)
    out_dir = Path(args.out_dir) if args.out_dir else timestamped_dir(f"bench-{args.bench_command}")
    if args.bench_command in ("lengths", *OLD_NAMES):
        from ..bench.lengths import measure as scaling
        from ..bench.lengths import report as scaling_report

        sizes = parse_sizes(args.model_size)
        settings = scaling.ScalingSettings(
            architectures=archs,
            model_sizes=sizes,
            seq_lens=parse_int_list(args.seq_lens, "--seq-lens"),
            batch_size=args.batch_size,
            warmup=args.warmup,
            repeats=args.repeats,
            device=args.device,
            threads=args.threads,
            memory=args.memory,
            vocab_size=args.vocab_size,
            overrides=_overrides(args),
            seed=args.seed,
        )
        # build every config once up front so a bad flag fails before any timing
        for size in sizes:
            for arch in archs:
                scaling.bench_config(
                    arch, size, max(settings.seq_lens), args.vocab_size, settings.overrides
                )
        command = _rerun(
            args.bench_command,
            args,
            {
                "architectures": ",".join(archs),
                "model-size": ",".join(sizes),
                "seq-lens": ",".join(map(str, settings.seq_lens)),
                "out-dir": str(out_dir),
            },
        )
        ensure_writable_dir(out_dir, "--out-dir")  # fail now, not after measuring
        points = scaling.run_sweep(settings)
        paths = scaling_report.write_outputs(out_dir, settings, points, command)
        analysis = scaling_report.analyse(points)
        print()
        print(scaling_report.table(points))
        print()
        print(scaling_report.exponent_table(analysis))
        print()
        for c in analysis["crossovers"]:
            print(c.describe())
    else:
        from ..bench.decode import measure as decode_bench

        parse_sizes(args.model_size)
        settings = decode_bench.DecodeSettings(
            architectures=archs,
            model_size=args.model_size,
            contexts=parse_int_list(args.contexts, "--contexts"),
            new_tokens=args.new_tokens,
            warmup=args.warmup,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
            vocab_size=args.vocab_size,
            overrides=_overrides(args),
            seed=args.seed,
        )
        max_len = max(settings.contexts) + settings.warmup + settings.new_tokens
        for arch in archs:
            decode_bench.bench_config(
                arch, args.model_size, max_len, args.vocab_size, settings.overrides
            )
        command = _rerun(
            "generate",
            args,
            {
                "architectures": ",".join(archs),
                "model-size": args.model_size,
                "contexts": ",".join(map(str, settings.contexts)),
                "out-dir": str(out_dir),
            },
        )
        ensure_writable_dir(out_dir, "--out-dir")  # fail now, not after measuring
        points = decode_bench.run_decode_bench(settings)
        paths = decode_bench.write_outputs(out_dir, settings, points, command)
        print()
        print(decode_bench.table(points))
    print()
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.bench_command in OLD_NAMES:  # after the run: an error stays one line
        import sys

        old, new = args.bench_command, OLD_NAMES[args.bench_command]
        print(
            f"note: `archlab bench {old}` is now `archlab bench {new}` (`archlab scale` is the "
            f"scaling-law study); `{old}` is accepted until the next release",
            file=sys.stderr,
        )
    return 0

"""`archlab scale`: a size ladder per architecture, loss against compute, fitted scaling laws.

With no arguments: every registered architecture at depths 1-3 of one dial, 10 tokens per
active parameter, two seeds, on the stories corpus with a 1,024-token BPE (README, "Scaling
laws": about 30 minutes on 2 CPU cores, an estimate). Exit code 0 when at least one run
finished, 1 when all failed, 2 for a user error (a one-size ladder, a ratio <= 0, an unknown
architecture, a refused shape, ...).
"""

from __future__ import annotations

import argparse
from typing import Any

SETTING_KEYS = (
    "tokens_per_param",
    "width_per_depth",
    "head_dim",
    "seq_len",
    "batch_size",
    "learning_rate",
    "recipe",
    "eval_steps",
    "use_amp",
    "device",
    "num_threads",
    "seed",
    "seeds",
    "bootstrap",
    "compare_results",
)


def register(subparsers: Any) -> None:
    from ..bench.scaling_laws import settings as d

    p = subparsers.add_parser(
        "scale",
        help="train a size ladder per architecture and fit loss-vs-compute scaling laws",
        description="For each architecture, train a ladder of sizes from one dial (--depths: "
        "depth and width together), each for a token budget proportional to its parameters; "
        "fit L(C) = E + A C^-alpha with bootstrap intervals; report exponents, predictions at "
        "the seed sizes and crossovers. Writes scale.md, results.json/csv, loss_vs_flops.png "
        "and one run folder per (architecture, depth, seed).",
    )
    p.add_argument(
        "--architectures", default=None, help="comma list, aliases ok (default: all registered)"
    )
    p.add_argument(
        "--depths",
        default=None,
        help=f"the dial's values, e.g. 1,2,3 (default {','.join(map(str, d.DEFAULT_DEPTHS))})",
    )
    p.add_argument(
        "--tokens-per-param",
        type=float,
        default=None,
        help=f"training tokens per active parameter (default {d.DEFAULT_RATIO:g})",
    )
    p.add_argument(
        "--data",
        default=None,
        help=f"prepared folder, built-in source or local files (default: stories, BPE "
        f"{d.DEFAULT_VOCAB})",
    )
    g = p.add_argument_group("the dial and the protocol")
    g.add_argument("--width-per-depth", type=int, default=None, help="d_model = this x depth (16)")
    g.add_argument("--head-dim", type=int, default=None, help="attention head width (16)")
    g.add_argument("--seq-len", type=int, default=None, help=f"({d.DEFAULT_SEQ_LEN})")
    g.add_argument("--batch-size", type=int, default=None, help=f"({d.DEFAULT_BATCH_SIZE})")
    g.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="one peak rate for every run (default: the learning-rate table's rate per width)",
    )
    g.add_argument("--recipe", default=None, help=f"modern or classic ({d.DEFAULT_RECIPE})")
    g.add_argument("--eval-steps", type=int, default=None, help="validation batches (4)")
    g.add_argument(
        "--use-amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (off; pass it on GPUs)",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=None)
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per run")
    g.add_argument("--seed", type=int, default=None, help="first seed (0)")
    g.add_argument("--seeds", type=int, default=None, help=f"seeds per rung ({d.DEFAULT_SEEDS})")
    g.add_argument("--bootstrap", type=int, default=None, help="bootstrap draws per fit (1000)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in --out-dir: finished runs are skipped, settings must match",
    )
    p.add_argument(
        "--compare-results",
        default=None,
        metavar="PATH",
        help="an `archlab compare` folder or its results.json: the report says whether the "
        "ranking at the largest rung equals that comparison's ranking",
    )
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the ladder (shapes, parameters against dense's, budgets, rates) and each "
        "run's estimated time, then exit without training",
    )
    p.add_argument("--out-dir", default=None, help="(default: runs/scale-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _parse_depths(text: str | None) -> list[int] | None:
    from ..errors import UserError

    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--depths: expected comma-separated integers (got {text!r})") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bench.common.options import parse_architectures, timestamped_dir
    from ..bench.scaling_laws import ladder
    from ..bench.scaling_laws import settings as st
    from ..errors import UserError
    from ..fsutil import ensure_writable_dir, lock_folder
    from .compare import _has_content

    raw: dict[str, Any] = {k: getattr(args, k) for k in SETTING_KEYS}
    raw["depths"] = _parse_depths(args.depths)
    if args.architectures is not None:
        raw["architectures"] = parse_architectures(args.architectures)
    if args.estimate_only:
        if args.resume:
            raise UserError("--estimate-only: not with --resume (it trains nothing)")
        raw.setdefault("architectures", parse_architectures(None))
        settings = st.settings_from_flags(raw)
        ladder.check_shapes(settings)
        data_dir, meta = _prepare_data(args)
        settings.data = str(data_dir)
        from ..bench.scaling_laws import study

        print(study.preview(settings, meta))
        return 0
    if args.resume:
        if args.out_dir is None:
            raise UserError("--resume: give the study's folder with --out-dir")
        out_dir = Path(args.out_dir)
        if not out_dir.is_dir():
            raise UserError(f"--resume: {out_dir} does not exist")
    else:
        out_dir = Path(args.out_dir) if args.out_dir else timestamped_dir("scale")
        if out_dir.is_dir() and _has_content(out_dir):
            raise UserError(
                f"--out-dir {out_dir} exists and is not empty; pass --resume to continue that "
                "study or choose another --out-dir"
            )
        raw.setdefault("architectures", parse_architectures(None))
        ladder.check_shapes(st.settings_from_flags(raw))  # errors before any folder or data work
        ensure_writable_dir(out_dir, "--out-dir")
    # locked for the command's life: a second scale into it is refused (exit 2)
    with lock_folder(out_dir, "scale folder"):
        return _run(args, out_dir, raw)


def _run(args: argparse.Namespace, out_dir: Any, raw: dict[str, Any]) -> int:
    import json
    import sys
    from pathlib import Path

    from ..bench.scaling_laws import settings as st
    from ..bench.scaling_laws import study
    from ..errors import UserError
    from .compare import _has_content

    if args.resume:
        settings = st.load_saved_settings(out_dir)
        st.check_resume_flags(settings, raw)
        if args.compare_results is not None:  # a report setting: may change on --resume
            settings.compare_results = st.settings_from_flags(
                {"compare_results": args.compare_results, "architectures": []}
            ).compare_results
        if args.data is not None and Path(args.data).resolve() != Path(settings.data).resolve():
            raise UserError(
                f"--resume: this study trains on {settings.data} (scale.json); drop --data"
            )
        if study.study_finished(settings, out_dir):
            if args.compare_results is None:
                print(
                    f"archlab scale: {out_dir} is already finished (scale.md written); nothing "
                    "to do (--compare-results <compare folder> rewrites its report against a "
                    "comparison)"
                )
                return 0
            print(
                f"archlab scale: {out_dir} is already finished; rewriting its report against "
                f"{settings.compare_results}",
                file=sys.stderr,
            )
        data_dir = Path(settings.data)
        if not (data_dir / "meta.json").exists():
            raise UserError(f"--resume: the study's data folder {data_dir} is gone")
        meta = json.loads((data_dir / "meta.json").read_text())
    else:
        if _has_content(out_dir):
            raise UserError(f"--out-dir {out_dir} exists and is not empty; pass --resume")
        data_dir, meta = _prepare_data(args)
        settings = st.settings_from_flags(raw)
        settings.data = str(data_dir)
    outcome = study.run_study(settings, out_dir, resume=args.resume, meta=meta, quiet=args.quiet)
    print()
    print(outcome.table)
    print()
    for f in outcome.fits:
        if f.law is None:
            print(f"Fit, {f.architecture}: {f.note}")
            continue
        iv = f.interval("alpha")
        shown = f"[{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "(no interval)"
        print(f"Fit, {f.architecture}: alpha {f.law.alpha:.3f} {shown}, E {f.law.E:.3f}")
    for c in outcome.crossovers:
        print(f"Crossover, {c.first} vs {c.second}: {c.verdict}")
    print(f"Largest rung against compare's ranking: {outcome.versus_compare}")
    print()
    print(f"Report: {out_dir / 'scale.md'} (results.json, results.csv, loss_vs_flops.png)")
    if outcome.exit_code:
        print("archlab scale: every run failed", file=sys.stderr)
    return outcome.exit_code


def _prepare_data(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The study's prepared folder (default: the stories with a 1,024-token BPE) and its meta."""
    import json
    from pathlib import Path

    from ..bench.scaling_laws import settings as st
    from ..data.prepare import prepare_dataset, resolve_data

    if args.data is None:
        data_dir = prepare_dataset(
            "stories", tokenizer="bpe", vocab_size=st.DEFAULT_VOCAB, verbose=False
        )
    else:
        data_dir = resolve_data(args.data, "language", None)
    data_dir = Path(data_dir).resolve()
    return data_dir, json.loads((data_dir / "meta.json").read_text())

"""Check the learning-rate table's width rule at a size it derives (issue #24: micro, modern).

For each architecture the rule's rate at ``--model-size`` (derived from the swept nano entry,
inverse in width) is trained with one seed beside derived / F and derived x F (F = 3, the
nano grid's spacing) by ``archlab compare --learning-rates`` at the default compare budget
and protocol (DIR/<architecture>, --jobs of them at once). The derived rate passes when it is
the best of the three or ends within RULE_TOLERANCE (0.05) nats of the best. The script
prints the grid as a markdown table and records each check in the table's ``rule_checks``
(the derived rate's label then says how its check came out). Rerunning resumes; exit 1 when
any check missed or failed::

    python scripts/check_lr_rule.py --model-size micro --jobs 2 --num-threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sweep_learning_rates import collect_runs, run_one, update_table

from archlab.config import canonical_architecture
from archlab.errors import UserError
from archlab.train.lr_table import RULE_TOLERANCE, TABLE_PATH, RuleCheck, table_learning_rate

DEFAULT_ARCHITECTURES = "dense,hypermixer,mamba,moe,hybrid,mamba2,gdn"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--architectures", default=DEFAULT_ARCHITECTURES, help="comma list")
    p.add_argument("--recipe", default="modern", choices=("modern", "classic"))
    p.add_argument("--model-size", default="micro")
    p.add_argument("--factor", type=float, default=3.0, help="grid: derived / F, derived, x F")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="comparisons run at once (1)")
    p.add_argument("--out-dir", default="runs/lr-rule-check", help="DIR/<architecture>")
    p.add_argument("--collect-only", action="store_true", help="run nothing; read DIR")
    p.add_argument("--notes", default="", help="recorded with each check (machine, commit)")
    p.add_argument("--table", default=str(TABLE_PATH), help="table to update (the shipped one)")
    return p.parse_args(argv)


def grid_for(derived: float, factor: float) -> list[float]:
    return [float(f"{r:.6g}") for r in (derived / factor, derived, derived * factor)]


def compare_command(args: argparse.Namespace, arch: str, grid: list[float]) -> list[str]:
    out = Path(args.out_dir) / arch
    cmd = [sys.executable, "-m", "archlab", "compare", "--architectures", arch]
    cmd += ["--model-size", args.model_size, "--recipe", args.recipe]
    cmd += ["--learning-rates", ",".join(f"{r:g}" for r in grid), "--seed", str(args.seed)]
    cmd += ["--seeds", "1", "--out-dir", str(out), "--quiet"]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    if (out / "compare.json").exists():
        cmd.append("--resume")
    return cmd


def check_row(args: argparse.Namespace, arch: str, grid: list[float]) -> dict:
    """The table's ``rule_checks`` row from the runs in DIR/<arch>."""
    losses: dict[str, float | None] = {repr(r): None for r in grid}
    for run in collect_runs(Path(args.out_dir) / arch, arch):
        rate = float(run["learning_rate"])
        match = [r for r in grid if abs(r - rate) <= 1e-9 * r]
        ok = run["status"] == "ok" and run["final_val_loss"] is not None
        if match and int(run["seed"]) == args.seed:
            losses[repr(match[0])] = run["final_val_loss"] if ok else None
    script = (
        f"python scripts/check_lr_rule.py --architectures {arch} --recipe {args.recipe} "
        f"--model-size {args.model_size} --factor {args.factor:g} --seed {args.seed}"
    )
    row: dict[str, Any] = {
        "recipe": args.recipe,
        "architecture": arch,
        "size": args.model_size,
        "derived_rate": grid[1],  # the derived rate as run (6 significant digits)
        "seed": args.seed,
        "losses": losses,
        "command": script,
    }
    if args.notes:
        row["notes"] = args.notes
    return row


def main(argv: list[str] | None = None) -> int:
    try:
        return check(parse_args(argv))
    except UserError as exc:
        print(f"check_lr_rule: {exc}", file=sys.stderr)
        return 2


def check(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.factor) and args.factor > 1):
        raise UserError(f"--factor: must be a finite number above 1 (got {args.factor:g})")
    archs = [canonical_architecture(a) for a in args.architectures.split(",") if a.strip()]
    table = Path(args.table)
    plan = {}
    for arch in archs:
        choice = table_learning_rate(arch, args.model_size, args.recipe, table)
        if choice.kind != "derived":
            print(f"{arch}: the rate at {args.model_size} is {choice.kind}, not derived; skipped")
            continue
        plan[arch] = (choice.rate, grid_for(choice.rate, args.factor))
    if not args.collect_only:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)

        def job(arch: str) -> int:
            cmd = compare_command(args, arch, plan[arch][1])
            return run_one(cmd, Path(args.out_dir) / f"{arch}.log")

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(job, plan))
    rows = [check_row(args, arch, plan[arch][1]) for arch in plan]
    print(f"\n{args.recipe} recipe at {args.model_size}, seed {args.seed}: final val loss")
    print("| arch | derived | derived / F | derived | derived x F | gap to best | verdict |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for row in rows:
        check = RuleCheck.from_row(row)
        cells = [
            "failed" if v is None else f"{v:.4f}"
            for v in (check.losses[r] for r in sorted(check.losses))
        ]
        gap = check.gap()
        verdict = "best" if gap == 0 else ("within" if check.passed else "MISSED")
        bad += not check.passed
        gap_text = "n/a" if gap is None else f"{gap:.3f}"
        print(
            f"| {row['architecture']} | {check.derived_rate:g} | {' | '.join(cells)} | "
            f"{gap_text} | {verdict} (tolerance {RULE_TOLERANCE:g}) |"
        )
    complete = [r for r in rows if any(v is not None for v in r["losses"].values())]
    if complete:
        update_table(table, complete, section="rule_checks")
        print(f"\nwrote {len(complete)} rule checks into {table}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

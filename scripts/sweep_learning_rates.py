"""Sweep peak learning rates and write them into the shipped table (src/archlab/train/lr_table.json).

For each recipe and architecture this runs ``archlab compare --learning-rates GRID`` at the
given size (the default compare budget and protocol otherwise; --jobs of them at once): the
first seed at every rate (DIR/<recipe>/<arch>/seed0), then the other seeds at every rate or,
with --screen N, at the N best rates of the first seed (DIR/<recipe>/<arch>/rest). It writes
one table entry per architecture: the grid, the seeds, every (rate, seed) final val loss and
the chosen rate (lowest mean loss among the rates run with every seed where no seed failed).
A best rate at the edge of the grid is refused (exit 1): widen --grid and rerun. A recipe
that builds the same model as an earlier one (Mamba: always RMSNorm, no attention, no MLP)
reuses that recipe's runs. Adding rows for a new architecture::

    python scripts/sweep_learning_rates.py --architectures mamba2 --recipes modern,classic --screen 2

Rerunning resumes the comparisons; --collect-only writes the table from what is there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from archlab.config import canonical_architecture, size_fields
from archlab.train.lr_table import TABLE_PATH, SweepEntryError, entry_from_runs

DEFAULT_GRID = "3e-4,1e-3,3e-3,1e-2,3e-2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--architectures", required=True, help="comma list (aliases ok)")
    p.add_argument("--recipes", default="modern,classic", help="comma list (modern,classic)")
    p.add_argument("--model-size", default="nano")
    p.add_argument("--grid", default=DEFAULT_GRID, help=f"learning rates ({DEFAULT_GRID})")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument(
        "--screen",
        type=int,
        default=0,
        help="run the seeds after the first only at the N best rates of the first (0: all)",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="comparisons run at once (1)")
    p.add_argument("--out-dir", default="runs/lr-sweep", help="DIR/<recipe>/<architecture>")
    p.add_argument(
        "--collect-only",
        action="store_true",
        help="run nothing: write the table from the run folders already in --out-dir",
    )
    p.add_argument(
        "--known-losses",
        default=None,
        help="JSON list of earlier runs of the same protocol ({architecture, recipe, "
        "learning_rate, seed, final_val_loss, status}) counted beside the new ones; the "
        "entries they enter say so (--known-note)",
    )
    p.add_argument("--known-note", default="", help="where --known-losses came from")
    p.add_argument("--table", default=str(TABLE_PATH), help="table to update (the shipped one)")
    return p.parse_args(argv)


def compare_command(
    args: argparse.Namespace, arch: str, recipe: str, out: Path, grid: str, seed: int, seeds: int
) -> list[str]:
    cmd = [sys.executable, "-m", "archlab", "compare", "--architectures", arch]
    cmd += ["--model-size", args.model_size, "--recipe", recipe, "--learning-rates", grid]
    cmd += ["--seed", str(seed), "--seeds", str(seeds), "--out-dir", str(out), "--quiet"]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    if (out / "compare.json").exists():
        cmd.append("--resume")
    return cmd


def run_one(cmd: list[str], log: Path) -> int:
    print("+", shlex.join(cmd), flush=True)
    with log.open("a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def collect_runs(folder: Path, arch: str) -> list[dict[str, Any]]:
    """Every finished or failed run of ``arch`` under ``folder`` (its summary.json)."""
    runs = []
    for path in sorted(folder.glob("**/summary.json")):
        s = json.loads(path.read_text())
        cfg = s.get("train_config") or {}
        if (s.get("model_config") or {}).get("architecture", s.get("architecture")) != arch:
            continue
        if s.get("status") == "interrupted":  # stopped by a signal: not a result
            continue
        loss = s.get("final_val_loss")
        runs.append(
            {
                "learning_rate": cfg["learning_rate"],
                "seed": cfg["seed"],
                "status": s.get("status"),
                "final_val_loss": float(loss) if loss is not None else None,
            }
        )
    return runs


def sweep_one(args: argparse.Namespace, recipe: str, arch: str) -> None:
    """Seed 0 (``--seed`` of compare) at the whole grid, then the other seeds at every rate
    or, with --screen N, at the N best rates of the first seed."""
    root = Path(args.out_dir) / recipe / arch
    root.mkdir(parents=True, exist_ok=True)
    first = root / "seed0"
    run_one(compare_command(args, arch, recipe, first, args.grid, 0, 1), root / "seed0.log")
    if args.seeds < 2:
        return
    rates = [float(r) for r in args.grid.split(",")]
    if args.screen:
        done = [r for r in collect_runs(first, arch) if r["final_val_loss"] is not None]
        done.sort(key=lambda r: r["final_val_loss"])
        rates = sorted(float(r["learning_rate"]) for r in done[: args.screen])
    grid = ",".join(f"{r:g}" for r in rates)
    rest = root / "rest"
    run_one(compare_command(args, arch, recipe, rest, grid, 1, args.seeds - 1), root / "rest.log")


def same_model(arch: str, size: str, a: str, b: str) -> bool:
    """Whether recipes ``a`` and ``b`` build the same model for ``arch`` (same weights from
    the same seed, same output): then one sweep serves both (e.g. Mamba, whose norm is
    always RMSNorm and which has no attention or MLP)."""
    import torch

    from archlab import build_model, preset_config
    from archlab.recipes import apply_recipe

    models = []
    for recipe in (a, b):
        torch.manual_seed(0)
        cfg = preset_config(arch, size, vocab_size=97, **apply_recipe(recipe, arch, {}))
        models.append(build_model(cfg).eval())
    sa, sb = models[0].state_dict(), models[1].state_dict()
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ya, yb = models[0](x), models[1](x)
    ya = ya[0] if isinstance(ya, tuple) else ya
    yb = yb[0] if isinstance(yb, tuple) else yb
    return bool(torch.equal(ya, yb))


def update_table(table: Path, rows: list[dict[str, Any]], section: str = "entries") -> None:
    """Replace (or add) ``rows`` in the table's ``section`` by (recipe, architecture, size),
    kept sorted; written atomically (a temporary file, then a rename)."""
    doc = json.loads(table.read_text())

    def key(r: dict[str, Any]) -> tuple[str, str, str]:
        return (r["recipe"], r["architecture"], r["size"])

    new = {key(r) for r in rows}
    kept = [r for r in doc.get(section, []) if key(r) not in new]
    doc[section] = sorted(kept + rows, key=lambda r: (r["recipe"], r["size"], r["architecture"]))
    tmp = table.with_name(table.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = [canonical_architecture(a) for a in args.architectures.split(",") if a.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    # a recipe that builds the same model as an earlier one reuses its sweep
    shared = {
        (recipe, arch): first
        for arch in archs
        for i, recipe in enumerate(recipes)
        for first in recipes[:i]
        if same_model(arch, args.model_size, first, recipe)
    }
    jobs = [(r, a) for r in recipes for a in archs if (r, a) not in shared]
    known = json.loads(Path(args.known_losses).read_text()) if args.known_losses else []
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda job: sweep_one(args, *job), jobs))
    entries, failures = [], []
    for recipe in recipes:
        for arch in archs:
            source = shared.get((recipe, arch), recipe)
            folder = Path(args.out_dir) / source
            runs = [r for d in folder.glob(f"{arch}*") for r in collect_runs(d, arch)]
            runs = [r for r in runs if int(r["seed"]) < args.seeds]  # seeds beyond: unused
            have = {(float(r["learning_rate"]), int(r["seed"])) for r in runs}
            extra = [
                r
                for r in known
                if r["architecture"] == arch
                and r["recipe"] == source
                and (float(r["learning_rate"]), int(r["seed"])) not in have
            ]
            runs += extra
            screen = f" --screen {args.screen}" if args.screen else ""
            script = (
                f"python scripts/sweep_learning_rates.py --architectures {arch} --recipes "
                f"{source} --model-size {args.model_size} --grid {args.grid} "
                f"--seeds {args.seeds}{screen}"
            )
            notes = (
                f"the same model as under the {source} recipe: its sweep"
                if source != recipe
                else ""
            )
            if extra:
                rates = ", ".join(f"{float(r['learning_rate']):g} seed {r['seed']}" for r in extra)
                notes = "; ".join(n for n in (notes, f"{rates}: {args.known_note}") if n)
            d_model = int(size_fields(arch, args.model_size)["d_model"])
            try:
                entry = entry_from_runs(recipe, arch, args.model_size, d_model, runs, script, notes)
            except SweepEntryError as exc:
                failures.append(str(exc))
                continue
            entries.append(entry)
            print(f"{recipe} {arch} {args.model_size}: {entry['rate']:g}")
    if entries:
        update_table(Path(args.table), entries)
        print(f"wrote {len(entries)} entries into {args.table}")
    for line in failures:
        print(f"not written: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

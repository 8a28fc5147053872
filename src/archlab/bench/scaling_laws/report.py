"""What a finished study writes: scale.md, results.json, results.csv, loss_vs_flops.png.

The ladder table in scale.md and results.json's ``table`` are the same rows; the numbers come
from the run folders (compare's ``collect_run``), the fits from fit.py, the plot from
bench/plots.py's ``loss_vs_flops_figure`` (the one compare draws, with the fitted curves).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.results import RunResult, Stat
from ..compare.report import format_flops
from . import fit as fitting
from .ladder import Rung, recipes_available
from .laws import (  # re-exported: callers and tests read the fits through report
    SEED_SIZES,
    fit_all,
    fits_rows,
    fitted_curves,
    interval,
    predictions,
    top_rung_ranking,
    versus_compare,
)
from .plan import LadderRun
from .settings import ScaleSettings

OUTPUT_FILES = ("scale.md", "results.json", "results.csv", "loss_vs_flops.png")
TABLE_COLUMNS = (
    "Architecture",
    "Depth",
    "d_model x layers",
    "Params (active)",
    "Tokens",
    "FLOPs/token",
    "Train FLOPs",
    "LR",
    "Final val loss",
    "Time (s)",
    "Runs ok",
)
CSV_FIELDS = (
    "architecture", "depth", "seed", "d_model", "n_layers", "params", "tokens",
    "flops_per_token", "train_flops", "learning_rate", "status", "final_val_loss",
    "bits_per_byte", "train_time_s", "tokens_per_s", "run_dir", "error",
)  # fmt: skip


@dataclass
class StudyOutcome:
    """What `archlab scale` prints and exits with."""

    out_dir: Path
    table: str
    fits: list[fitting.Fit]
    crossovers: list[fitting.Crossover]
    n_ok: int
    n_runs: int
    versus_compare: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.n_ok else 1


def _cell(stat: Stat, fmt: str) -> str:
    if stat.mean is None:
        return "-"
    text = format(stat.mean, fmt)
    return text + (f" ± {stat.ci95 or 0.0:{fmt}}" if stat.n > 1 else "")


def table_rows(rungs: list[Rung], results: dict[str, list[RunResult]]) -> list[list[str]]:
    """One row per (architecture, depth): the rung and its runs' mean over seeds."""
    rows = []
    for r in rungs:
        mine = results.get(r.name, [])
        ok = [x for x in mine if x.ok]
        loss = Stat.of([x.final_val_loss for x in ok])
        secs = Stat.of([x.train_time_s for x in ok])
        flops = Stat.of([x.train_flops for x in ok])
        rows.append(
            [
                r.architecture,
                str(r.depth),
                f"{r.shape['d_model']} x {r.shape['n_layers']}",
                f"{r.params:,}",
                f"{r.tokens:,}",
                format_flops(r.flops_per_token),
                format_flops(flops.mean if flops.mean is not None else r.train_flops),
                f"{r.learning_rate:.3g}",
                _cell(loss, ".4f"),
                _cell(secs, ".1f"),
                f"{len(ok)}/{len(mine)}"
                + (" (did not learn)" if any(x.learned is False for x in ok) else ""),
            ]
        )
    return rows


def markdown(columns: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    grid = [list(columns)] + rows
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    lines = []
    for k, row in enumerate(grid):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_outputs(
    s: ScaleSettings,
    out_dir: Path,
    rungs: list[Rung],
    runs: list[LadderRun],
    results: list[RunResult],
    meta: dict[str, Any],
    hardware: dict[str, Any],
    command: str,
    wall_s: float | None,
    reference: Any = None,
    estimate: Any = None,
) -> StudyOutcome:
    from ..common import plots
    from ..common.hardware import hardware_lines
    from ..compare.outputs import data_summary, reference_lines

    by_rung: dict[str, list[RunResult]] = {}
    for run, res in zip(runs, results, strict=True):
        by_rung.setdefault(run.rung.name, []).append(res)
    rows = table_rows(rungs, by_rung)
    table = markdown(TABLE_COLUMNS, rows)
    fits = fit_all(s, results)
    pairs = [(f, g) for i, f in enumerate(fits) for g in fits[i + 1 :]]
    crossings = [fitting.crossover(f, g) for f, g in pairs]
    preds = predictions(s, fits)
    ranking, significance = top_rung_ranking(s, rungs, by_rung)
    versus = versus_compare(s, ranking)
    points = {
        a: [(r.train_flops, r.final_val_loss) for r in results if r.architecture == a and r.ok]
        for a in s.architectures
    }
    fig = plots.loss_vs_flops_figure(
        points,
        title=f"archlab scale: depths {','.join(map(str, s.depths))}, "
        f"{s.tokens_per_param:g} tokens/param\n(dashed: extrapolation; band: "
        f"{100 * fitting.LEVEL:.0f}% bootstrap interval; dotted: Pareto frontier of the runs)",
        fits=fitted_curves(fits),
        frontier=True,
        references=[] if reference is None else reference_lines(reference),
    )
    plots.save_figure(fig, out_dir / "loss_vs_flops.png")
    data_meta = data_summary(Path(s.data), meta)
    doc = {
        "command": command,
        "settings": s.to_dict(),
        "data": data_meta,
        "hardware": hardware,
        "wall_time_s": wall_s,
        "estimate": None if estimate is None else estimate.to_dict(),
        "table": {"columns": list(TABLE_COLUMNS), "rows": rows},
        "ladder": [r.to_dict() for r in rungs],
        "fits": [f.to_dict() for f in fits],
        "crossovers": [c.to_dict() for c in crossings],
        "predictions": preds,
        "top_rung_ranking": [{"architecture": a, "final_val_loss": v} for a, v in ranking],
        "top_rung_significance": significance,
        "top_rung_vs_compare": versus,
        "runs": [
            r.to_dict(curves=False) | {"depth": run.rung.depth, "rung": run.rung.name}
            for run, r in zip(runs, results, strict=True)
        ],
    }
    _atomic(out_dir / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
    _write_csv(out_dir / "results.csv", runs, results)
    timing = []
    if wall_s is not None:
        timing.append(f"Wall time of this process: {wall_s:.0f} s")
    if estimate is not None:
        timing.append(f"estimated before its runs: {estimate.total:.0f} s (an estimate)")
    md = scale_markdown(
        s, table, fits, crossings, preds, (ranking, significance, versus), data_meta, command,
        "; ".join(timing), hardware_lines(hardware), runs, results,
    )  # fmt: skip
    _atomic(out_dir / "scale.md", md)
    n_ok = sum(r.ok for r in results)
    return StudyOutcome(out_dir, table, fits, crossings, n_ok, len(results), versus["line"])


def _write_csv(path: Path, runs: list[LadderRun], results: list[RunResult]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for run, r in zip(runs, results, strict=True):
            d = r.to_dict(curves=False) | {
                "depth": run.rung.depth,
                "d_model": run.rung.shape["d_model"],
                "n_layers": run.rung.shape["n_layers"],
                "params": run.rung.params,
                "tokens": run.rung.tokens,
            }
            writer.writerow({k: "" if d.get(k) is None else d[k] for k in CSV_FIELDS})
    tmp.replace(path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _param_gap(rungs: list[Rung]) -> str:
    """The largest gap between an architecture's active parameters and dense's at its rung."""
    dense = {r.depth: r.params for r in rungs if r.architecture == "dense"}
    gaps = [(r.params / dense[r.depth] - 1, r.name) for r in rungs
            if r.depth in dense and r.architecture != "dense"]  # fmt: skip
    if not gaps:
        return ""
    gap, name = max(gaps, key=lambda g: abs(g[0]))
    return f"Largest gap to dense's active parameters at a rung: {name} {100 * gap:+.0f}%."


def protocol_notes(s: ScaleSettings, rungs: list[Rung]) -> list[str]:
    by_arch: dict[str, dict[int, float]] = {}  # architecture -> depth -> rate (seeds share it)
    for r in sorted(rungs, key=lambda r: r.depth):
        by_arch.setdefault(r.architecture, {})[r.depth] = r.learning_rate
    sources = [
        f"{arch} " + " / ".join(f"{rate:.3g}" for rate in rates.values())
        for arch, rates in by_arch.items()
    ]
    kinds = sorted({r.lr_source.split(" ")[0].rstrip(":") for r in rungs})  # derived, swept, given
    return [
        f"Ladder: one dial, depth D in {', '.join(map(str, s.depths))}: the dense shape is D "
        f"layers of width {s.width_per_depth} x D (heads of {s.head_dim}, MLP 4 x width), "
        "nanochat's --depth rule; every other architecture takes it through its size preset's "
        "rule (a state no wider than the model), then the layer count (the hybrid's in pairs) "
        "whose active parameters come nearest dense's (ladder.py). " + _param_gap(rungs),
        f"Budget: {s.tokens_per_param:g} training tokens per active parameter (rounded up to "
        f"whole steps of {s.tokens_per_step:,} tokens: batch {s.batch_size} x seq-len "
        f"{s.seq_len}); compute = FLOPs/token (train/flops.py) x tokens.",
        f"Learning rate per architecture at depths {' / '.join(map(str, s.depths))}: "
        + ("; ".join(sources) if sources else "-")
        + f" ({', '.join(kinds)}; each run's source is listed under Runs; the learning-rate "
        "table's rule is inverse in width from the swept rate, capped below the swept width at "
        "the largest rate its sweep ran). Warmup and cosine schedule as compare's (5% warmup, at "
        "most 100 steps).",
        (
            f"Recipe {s.recipe}"
            if recipes_available()
            else "The trainer's model defaults (this checkout has no --recipe)"
        )
        + f"; seeds {', '.join(map(str, s.seed_list))}; every run in its own "
        "process (compare's runner); final val loss on the same fixed validation batches.",
        "Fit: L(C) = E + A C^-alpha per architecture over every finished run that learned "
        "(final val loss below the unigram baseline; 'did not learn' runs are shown, not "
        "fitted) (scipy; E, A >= 0); "
        f"{100 * fitting.LEVEL:.0f}% intervals from a residual bootstrap over seeds and points "
        f"({s.bootstrap} draws). A crossover is called only when >= "
        f"{100 * fitting.CALL_FRACTION:.0f}% of paired draws cross and its interval spans < "
        f"{fitting.CALL_DECADES:g} decades; otherwise it is reported as too wide to call.",
        "Predictions at the seed sizes: the compute of a tiny/medium/large run (its preset, "
        "32k vocabulary, its context) at this study's tokens per parameter, in this study's "
        "loss units (its data and tokenizer): an extrapolation over the decades shown.",
    ]


def scale_markdown(
    s,
    table,
    fits,
    crossings,
    preds,
    ranking,
    data_meta,
    command,
    timing,
    machine,
    runs,
    results,
) -> str:  # noqa: ANN001 (all built above)
    lines = ["# archlab scale: loss against compute", ""]
    if timing:
        lines += [timing + ".", ""]
    lines += ["## Ladder", "", table, "", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    lines += ["## Fits: L(C) = E + A * C^-alpha (C in FLOPs)", ""]
    lines.append(
        markdown(["Architecture", "alpha [90%]", "E [90%]", "A", "Points", "Note"], fits_rows(fits))
    )
    lines += ["", "### Predicted loss at the seed sizes' compute (90% interval)", ""]
    head = ["Architecture"] + [f"{size}" for size in SEED_SIZES]
    prow = []
    for arch, by_size in preds.items():
        cells = [arch]
        for size in SEED_SIZES:
            p = by_size[size]
            iv = tuple(p["interval"]) if p["interval"] else None
            cells.append(
                f"{p['loss']:.3f} {interval(iv, '.3f')} at {format_flops(p['compute'])} "
                f"(+{p['decades_beyond_measured']:.1f} decades)"
            )
        prow.append(cells)
    lines += [markdown(head, prow) if prow else "(no fit)", ""]
    lines += ["### Crossovers", ""]
    for c in crossings:
        at = "-" if c.compute is None else format_flops(c.compute)
        lines.append(
            f"- {c.first} vs {c.second}: cross at {at} FLOPs, interval "
            f"{interval(c.interval, '.2e')}; {c.verdict}"
        )
    if not crossings:
        lines.append("- (one architecture: no pairs)")
    ranking, significance, versus = ranking
    lines += ["", "### Ranking at the largest rung (final val loss, lowest first)", ""]
    lines.append((", ".join(f"{a} {v:.4f}" for a, v in ranking) or "-") + f" ({significance})")
    lines += ["", f"Against compare's ranking: {versus['line']}."]
    lines += ["", "## Protocol", ""]
    lines += [f"- {n}" for n in protocol_notes(s, [r.rung for r in runs])]
    lines += ["", "### Settings", ""]
    lines += [f"- `{k}`: {v}" for k, v in s.to_dict().items()]
    lines += ["", "### Data", ""]
    lines += [f"- `{k}`: {v}" for k, v in data_meta.items()]
    lines += ["", "## Rerun", "", "```", command, "```", "", "## Machine", ""]
    lines += machine
    lines += ["", "## Runs", ""]
    for run, r in zip(runs, results, strict=True):
        state = "ok" if r.ok else f"failed: {r.error}"
        lines.append(f"- [{run.name}]({run.name}/) ({run.rung.lr_source}): {state}")
    return "\n".join(lines) + "\n"

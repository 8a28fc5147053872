"""What a finished study writes: scale.md, results.json, results.csv, loss_vs_flops.png.

The ladder table in scale.md and results.json's ``table`` are the same rows; the numbers come
from the run folders (compare's ``collect_run``), the fits from fit.py, the plot from
bench/plots.py's ``loss_vs_flops_figure`` (the one compare draws, with the fitted curves).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..common.results import RunResult, Stat
from ..compare.report import format_flops
from . import fit as fitting
from .ladder import Rung, recipes_available
from .plan import LadderRun
from .settings import ScaleSettings

SEED_SIZES = ("tiny", "medium", "large")
EXTRAPOLATE = 100.0  # the plot's dashed curves reach 100x the largest measured compute
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


def fit_all(s: ScaleSettings, runs: list[RunResult]) -> list[fitting.Fit]:
    """One law per architecture over its finished runs that learned: a run whose final val
    loss is not below the data's unigram baseline (compare's "did not learn") is left out of
    the fit, as it wins nothing in compare, and the fit's note names how many."""
    out = []
    for arch in s.architectures:
        ok = [r for r in runs if r.architecture == arch and r.ok and r.train_flops]
        learned = [r for r in ok if r.learned is not False]
        f = fitting.fit_power_law(
            [r.train_flops for r in learned],
            [r.final_val_loss for r in learned],
            arch,
            draws=s.bootstrap,
            seed=s.seed,
        )
        if len(learned) < len(ok):
            left = f"{len(ok) - len(learned)} run(s) that did not learn left out"
            f.note = left + (f"; {f.note}" if f.note else "")
        out.append(f)
    return out


def seed_size_compute(s: ScaleSettings, arch: str) -> dict[str, float]:
    """The compute of a run at each seed size (its preset, 32k vocabulary, its context) at the
    study's tokens per parameter: where the fitted laws are asked to predict."""
    return {
        size: flops * s.tokens_per_param * params
        for size, (flops, params) in _seed_size_costs(arch).items()
    }


@lru_cache(maxsize=64)
def _seed_size_costs(arch: str) -> dict[str, tuple[float, int]]:
    """Size -> (training FLOPs per token, active parameters); built once per process (a
    meta-device build of `large` takes a second or two)."""
    from ...config import preset_config
    from ...models import build_model
    from ...train.flops import flops_per_token

    out = {}
    for size in SEED_SIZES:
        cfg = preset_config(arch, model_size=size)
        model = build_model(cfg, device="meta")
        out[size] = (flops_per_token(model, cfg.max_seq_len), int(model.num_active_parameters()))
    return out


def _interval(iv: tuple[float, float] | None, fmt: str) -> str:
    return "no interval (too wide to call)" if iv is None else f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def fits_rows(fits: list[fitting.Fit]) -> list[list[str]]:
    rows = []
    for f in fits:
        if f.law is None:
            rows.append([f.architecture, "-", "-", "-", str(f.n_points), f.note])
            continue
        a_iv, e_iv = f.interval("alpha"), f.interval("E")
        width = (a_iv[1] - a_iv[0]) if a_iv else math.inf
        note = f.note or ("too wide to call" if width > f.law.alpha else "")
        rows.append(
            [
                f.architecture,
                f"{f.law.alpha:.3f} {_interval(a_iv, '.3f')}",
                f"{f.law.E:.3f} {_interval(e_iv, '.3f')}",
                f"{f.law.A:.3g}",
                str(f.n_points),
                note,
            ]
        )
    return rows


def predictions(s: ScaleSettings, fits: list[fitting.Fit]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in fits:
        if f.law is None:
            continue
        out[f.architecture] = {}
        for size, c in seed_size_compute(s, f.architecture).items():
            value, iv = f.predict(c)
            out[f.architecture][size] = {
                "compute": c,
                "loss": value,
                "interval": None if iv is None else list(iv),
                "decades_beyond_measured": math.log10(c / f.c_max),
            }
    return out


def fitted_curves(fits: list[fitting.Fit]) -> dict[str, Any]:
    from ..common.plots import FittedCurve

    out = {}
    for f in fits:
        if f.law is None:
            continue
        xs = np.geomspace(min(f.compute) / 2, f.c_max * EXTRAPOLATE, 80)
        xs = np.unique(np.append(xs, f.c_max))
        ys = f.law(xs)
        if f.draws is not None:
            d = f.draws
            band = d[:, :1] + d[:, 1:2] * np.power(xs[None], -d[:, 2:3])
            lo, hi = np.quantile(band, [(1 - fitting.LEVEL) / 2, (1 + fitting.LEVEL) / 2], 0)
        else:
            lo = hi = ys
        out[f.architecture] = FittedCurve(
            list(xs), list(ys), list(lo), list(hi), f.c_max, f.architecture
        )
    return out


def top_rung_ranking(
    s: ScaleSettings, rungs: list[Rung], results: dict[str, list[RunResult]]
) -> tuple[list[tuple[str, float]], str]:
    """Architectures by mean final val loss at the largest depth (lowest first), and the
    leader's significance over seeds (compare's Welch test, bench/stats.py)."""
    from ..common import stats

    top = max(s.depths)
    losses = {
        r.architecture: [x.final_val_loss for x in results.get(r.name, []) if x.ok]
        for r in rungs
        if r.depth == top
    }
    scored = sorted((Stat.of(v).mean, a) for a, v in losses.items() if Stat.of(v).mean is not None)
    decision = stats.decide({a: v for a, v in losses.items() if v}, lower_is_better=True)
    return [(a, loss) for loss, a in scored], stats.describe(decision)


def versus_compare(s: ScaleSettings, ranking: list[tuple[str, float]]) -> dict[str, Any]:
    """Whether the largest rung ranks the architectures as an `archlab compare` run did (over
    the architectures both have); without --compare-results, says how to ask."""
    from .settings import compare_ranking

    if not s.compare_results:
        return {
            "same_order": None,
            "line": "not compared with a compare ranking (pass --compare-results "
            "<compare folder>, e.g. the default `archlab compare`'s)",
        }
    other = compare_ranking(s.compare_results)
    mine = [a for a, _ in ranking]
    theirs = [a for a, _ in other["ranking"]]
    common = [a for a in mine if a in theirs]
    mine_c, theirs_c = common, [a for a in theirs if a in common]
    same = len(common) >= 2 and mine_c == theirs_c
    where = (
        f"compare {other['path']} (model size {other['model_size']}, {other['max_tokens']} tokens)"
    )
    if len(common) < 2:
        line = f"fewer than two architectures in common with {where}: nothing to compare"
    elif same:
        line = f"same order as {where} over {len(common)} architectures: {' < '.join(mine_c)}"
    else:
        line = f"differs from {where}: here {' < '.join(mine_c)}; there {' < '.join(theirs_c)}"
    return {
        "same_order": same if len(common) >= 2 else None,
        "line": line,
        "compare_results": other["path"],
        "compare_ranking": [{"architecture": a, "final_val_loss": v} for a, v in other["ranking"]],
        "common": common,
    }


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
    rates = sorted({(r.architecture, r.learning_rate, r.lr_source) for r in rungs})
    sources = sorted({src for _, _, src in rates})
    return [
        f"Ladder: one dial, depth D in {', '.join(map(str, s.depths))}: the dense shape is D "
        f"layers of width {s.width_per_depth} x D (heads of {s.head_dim}, MLP 4 x width), "
        "nanochat's --depth rule; every other architecture takes it through its size preset's "
        "rule (a state no wider than the model), then the layer count (the hybrid's in pairs) "
        "whose active parameters come nearest dense's (ladder.py). " + _param_gap(rungs),
        f"Budget: {s.tokens_per_param:g} training tokens per active parameter (rounded up to "
        f"whole steps of {s.tokens_per_step:,} tokens: batch {s.batch_size} x seq-len "
        f"{s.seq_len}); compute = FLOPs/token (train/flops.py) x tokens.",
        "Learning rate per (architecture, width): "
        + ("; ".join(sources) if sources else "-")
        + ". Warmup and cosine schedule as compare's (5% warmup, at most 100 steps).",
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
                f"{p['loss']:.3f} {_interval(iv, '.3f')} at {format_flops(p['compute'])} "
                f"(+{p['decades_beyond_measured']:.1f} decades)"
            )
        prow.append(cells)
    lines += [markdown(head, prow) if prow else "(no fit)", ""]
    lines += ["### Crossovers", ""]
    for c in crossings:
        at = "-" if c.compute is None else format_flops(c.compute)
        lines.append(
            f"- {c.first} vs {c.second}: cross at {at} FLOPs, interval "
            f"{_interval(c.interval, '.2e')}; {c.verdict}"
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

"""The comparison's outputs: the table, the winners, report.md, results.json and results.csv.

The terminal table and the one in report.md are the same text, built from the same
aggregated numbers that results.json stores, so the three never disagree.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stats
from .hardware import hardware_lines
from .reference import LEARNED_MARGIN, Reference
from .results import ArchResult, RunResult, Stat

TABLE_COLUMNS = (
    "Architecture",
    "LR",
    "Params (total / active)",
    "FLOPs/token",
    "Train FLOPs",
    "Time (s)",
    "Tokens/s",
    "Peak memory (MiB)",
    "Model memory (MiB)",
    "Final val loss",
    "Bits/byte",
    "Gap to floor",
    "NaN/skipped",
    "Notes",
)
LEFT_ALIGNED = (0, 2, len(TABLE_COLUMNS) - 1)  # text columns; numbers are right-aligned

CSV_FIELDS = (
    "architecture",
    "learning_rate",
    "seed",
    "status",
    "error",
    "total_params",
    "active_params",
    "steps",
    "tokens_seen",
    "train_time_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "mem_before_model_bytes",
    "model_mem_bytes",
    "memory_kind",
    "final_val_loss",
    "bits_per_byte",
    "learned",
    "last_eval_val_loss",
    "entropy_floor",
    "gap_to_floor",
    "nan_count",
    "roughness",
    "mfu",
    "flops_per_token",
    "train_flops",
    "run_dir",
)

MIB = 1024.0 * 1024.0


# ---- cell formatting (one function per column so tests can parse them back) ---------------
def _fmt(stat: Stat | None, fmt: str, scale: float = 1.0, signed: bool = False) -> str:
    if stat is None or stat.mean is None:
        return "-"
    spec = ("+" if signed else "") + fmt
    text = format(stat.mean / scale, spec)
    if stat.n > 1:  # ± the half-width of the 95% confidence interval of the mean
        text += " ± " + format((stat.ci95 or 0.0) / scale, fmt)
    return text


def format_flops(value: float | None) -> str:
    """A FLOP count in three significant digits: 5.52e6 (no '+', no leading zero)."""
    if value is None:
        return "-"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def _params(arch: ArchResult) -> str:
    total, active = arch.stats.get("total_params"), arch.stats.get("active_params")
    if total is None or total.mean is None:
        return "-"
    text = f"{int(total.mean):,}"
    if active is not None and active.mean is not None and int(active.mean) != int(total.mean):
        text += f" / {int(active.mean):,}"
    return text


def _notes(arch: ArchResult, unigram: float | None = None) -> str:
    resumed = [r for r in arch.ok_runs if r.resumed_from]
    notes: list[str] = []
    if arch.learned is False:
        bad = arch.not_learned_seeds
        which = "" if len(bad) == len(arch.ok_runs) else f" (seed {', '.join(map(str, bad))})"
        ref = f" {unigram:.4f}" if unigram is not None else ""
        notes.append(
            f"did not learn{which}: final val loss not {LEARNED_MARGIN:g} nats below the unigram "
            f"baseline{ref}"
        )
    if arch.at_edge and arch.learning_rate is not None:
        notes.append(f"best at the edge ({format_lr(arch.learning_rate)}): widen the sweep")
    if arch.every_rate_failed:
        notes.append("a seed failed at every rate: shown at the best surviving rate")
    if resumed:
        seeds = ", ".join(str(r.seed) for r in resumed)
        notes.append(f"resumed (seed {seeds}): time covers the last process only")
    if arch.status == "ok":
        n = len(arch.runs)
        return "; ".join(([f"{n} seeds"] if n > 1 else []) + notes)
    errs = "; ".join(arch.errors)
    if arch.status == "failed":
        return f"failed: {errs}"
    failed = len(arch.runs) - len(arch.ok_runs)
    return "; ".join([f"{failed} of {len(arch.runs)} seeds failed", errs] + notes)


def table_rows(archs: list[ArchResult], unigram: float | None = None) -> list[list[str]]:
    rows = []
    for a in archs:
        s = a.stats
        rows.append(
            [
                a.architecture,
                format_lr(a.learning_rate),
                _params(a),
                format_flops((s.get("flops_per_token") or Stat.of([])).mean),
                format_flops((s.get("train_flops") or Stat.of([])).mean),
                _fmt(s.get("train_time_s"), ".1f"),
                _fmt(s.get("tokens_per_s"), ",.0f"),
                _fmt(s.get("peak_mem_bytes"), ".1f", scale=MIB),
                _fmt(s.get("model_mem_bytes"), ".1f", scale=MIB),
                _fmt(s.get("final_val_loss"), ".4f"),
                _fmt(s.get("bits_per_byte"), ".4f"),
                _fmt(s.get("gap_to_floor"), ".4f", signed=True),
                _fmt(s.get("nan_count"), ".0f") if a.ok_runs else "-",
                _notes(a, unigram).replace("|", "/"),
            ]
        )
    return rows


def markdown_table(archs: list[ArchResult], unigram: float | None = None) -> str:
    """A GitHub-markdown table: readable in a terminal and in report.md."""
    rows = [list(TABLE_COLUMNS)] + table_rows(archs, unigram)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i in LEFT_ALIGNED else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# The terminal's short form: the columns a reader compares at a glance, short headers, and the
# notes under the table. Params, model memory and gap to floor stay in report.md.
TERMINAL_COLUMNS = (
    ("Architecture", "Architecture"),
    ("LR", "LR"),
    ("Train FLOPs", "FLOPs"),
    ("Time (s)", "Time s"),
    ("Tokens/s", "Tok/s"),
    ("Peak memory (MiB)", "Peak MiB"),
    ("Final val loss", "Val loss"),
    ("Bits/byte", "Bits/byte"),
    ("NaN/skipped", "NaN"),
)


def terminal_table(archs: list[ArchResult], unigram: float | None = None, width: int = 100) -> str:
    """markdown_table when it fits in ``width`` characters, else the short form (see above)."""
    full = markdown_table(archs, unigram)
    if max(len(line) for line in full.splitlines()) <= width:
        return full
    rows = table_rows(archs, unigram)
    columns = [(TABLE_COLUMNS.index(name), short) for name, short in TERMINAL_COLUMNS]
    keep = [(i, h) for i, h in columns if i != 1 or any(r[1] != "-" for r in rows)]
    grid = [[h for _, h in keep]] + [[r[i] for i, _ in keep] for r in rows]
    widths = [max(len(r[k]) for r in grid) for k in range(len(keep))]
    lines = []
    for n, row in enumerate(grid):
        cells = [
            c.ljust(w) if k == 0 else c.rjust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = TABLE_COLUMNS.index("Notes")
    lines += [f"  {r[0]}: {r[notes]}" for r in rows if r[notes]]
    lines.append("  (narrowed for the terminal; report.md has every column)")
    return "\n".join(lines)


# ---- winners ----------------------------------------------------------------------------
CRITERIA = ("fastest", "least memory", "best loss", "most stable")
ONE_SEED = "one seed: no significance can be claimed"
# The smallest lead that crowns a winner, beside p < 0.05 (a significant but tiny difference
# is a tie): nats/token for the loss, a fraction of the other's value for the rest.
MIN_EFFECT = {
    "best loss": (0.02, False),
    "fastest": (0.05, True),
    "least memory": (0.05, True),
    "most stable": (0.2, True),
}


@dataclass
class Winner:
    """One criterion's outcome. ``architecture`` is None when nobody wins (a tie, or no
    candidate); ``tied`` then names the tied architectures; ``p_value`` is the Welch p the
    decision rests on (None with one seed, where no significance can be claimed)."""

    criterion: str  # "fastest" | "least memory" | "best loss" | "most stable"
    architecture: str | None
    detail: str
    tied: list[str] = field(default_factory=list)
    p_value: float | None = None
    kind: str = "winner"  # "winner" | "tie" | "unproven" | "none"

    def line(self) -> str:
        if self.kind == "tie":
            return f"{self.criterion}: tie: {', '.join(self.tied)} ({self.detail})"
        who = self.architecture or "none"
        return f"{self.criterion}: {who} ({self.detail})"

    def headline(self) -> str:
        """The line as printed: "Winner" only for a significant, large enough lead."""
        if self.kind == "winner":
            return f"Winner, {self.line()}"
        if self.kind == "unproven":
            return f"Leader ({ONE_SEED}), {self.line()}"
        return f"No winner, {self.line()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "architecture": self.architecture,
            "detail": self.detail,
            "kind": self.kind,
            "headline": self.headline(),
            "tied": self.tied,
            "p_value": self.p_value,
        }


def _values(a: ArchResult, metric: str) -> list[float]:
    stat = a.stats.get(metric)
    return list(stat.values) if stat is not None else []


def _significance_winner(
    criterion: str,
    cands: list[ArchResult],
    metric: str,
    lower_is_better: bool,
    show: Any,
    excluded: str,
) -> Winner:
    """Leader by mean; named only when Welch's test (p < 0.05) puts it ahead of every other
    candidate by at least MIN_EFFECT; a tie otherwise; with one seed, a leader for which no
    significance can be claimed."""
    values = {a.architecture: _values(a, metric) for a in cands}
    effect, relative = MIN_EFFECT[criterion]
    d = stats.decide(values, lower_is_better, effect, relative)
    if d.kind == "none":
        return Winner(criterion, None, "no data" + excluded, kind="none")
    by_name = {a.architecture: a for a in cands}
    what = show(by_name[d.leader].mean(metric))
    sig = stats.describe(d)
    if d.kind == "tie":
        p = max(d.p_values[k] for k in d.tied[1:])
        shown = ", ".join(f"{k} {show(by_name[k].mean(metric))}" for k in d.tied[1:])
        detail = f"{d.leader} {what} vs {shown}: {sig}"
        return Winner(criterion, None, detail + excluded, d.tied, p, "tie")
    p = max(d.p_values.values()) if d.p_values else None
    if d.kind == "unproven":
        sig = ""  # the headline says it
    detail = what + (f"; {sig}" if sig else "")
    return Winner(criterion, d.leader, detail + excluded, [], p, d.kind)


def _excluded(groups: list[tuple[str, list[str]]]) -> str:
    return "".join(f"; excluded, {why}: {', '.join(names)}" for why, names in groups if names)


def winners(archs: list[ArchResult]) -> list[Winner]:
    """One outcome per criterion among the architectures that finished a seed and learned
    (a row whose final val loss is not below the unigram baseline by the stated margin wins
    nothing). An architecture with a failed seed (diverged, stopped by the NaN guard, a
    non-finite loss) cannot win "best loss" or "most stable": its survivors are the lucky
    seeds.

    fastest: highest tokens/s. least memory: lowest model memory (peak minus the process
    before the model; the peak where that is unknown). best loss: lowest final validation
    loss. most stable: lowest training-loss roughness (std of step-to-step loss change over
    the second half) among the rows with the fewest NaN/skipped steps. Each names a winner
    only when Welch's t-test over seeds puts it ahead of every other candidate (p < 0.05) by
    at least MIN_EFFECT; otherwise a tie; with one seed a leader without significance.
    """
    ok = [a for a in archs if a.ok_runs]
    if not ok:
        return [Winner(c, None, "every run failed", kind="none") for c in CRITERIA]
    cands = [a for a in ok if a.learned is not False]
    dropped = [a.architecture for a in ok if a.learned is False]
    if not cands:
        return [
            Winner(c, None, "no run learned: none below the unigram baseline", kind="none")
            for c in CRITERIA
        ]
    failed = [a.architecture for a in cands if a.status != "ok"]
    whole = [a for a in cands if a.status == "ok"]
    not_learned = ("did not learn", dropped)
    excluded = _excluded([not_learned])
    excluded_failed = _excluded([not_learned, ("a seed failed", failed)])

    mem_metric = (
        "model_mem_bytes"
        if all(a.mean("model_mem_bytes") is not None for a in cands)
        else "peak_mem_bytes"
    )
    mem_label = "MiB model memory" if mem_metric == "model_mem_bytes" else "MiB peak"
    out = [
        _significance_winner(
            "fastest", cands, "tokens_per_s", False, lambda v: f"{v:,.0f} tokens/s", excluded
        ),
        _significance_winner(
            "least memory",
            cands,
            mem_metric,
            True,
            lambda v: f"{v / MIB:.1f} {mem_label}",
            excluded,
        ),
    ]
    if not whole:
        why = "every candidate had a failed seed" + excluded_failed
        out += [Winner(c, None, why, kind="none") for c in ("best loss", "most stable")]
        return out
    out.append(
        _significance_winner(
            "best loss",
            whole,
            "final_val_loss",
            True,
            lambda v: f"final val loss {v:.4f}",
            excluded_failed,
        )
    )
    out.append(_most_stable(whole, excluded_failed))
    return out


def _most_stable(cands: list[ArchResult], excluded: str) -> Winner:
    """Fewest NaN/skipped steps first (every seed's count); among those, the roughness
    decided by the same test as the other criteria, or no crown."""
    nan = {a.architecture: a.mean("nan_count") or 0.0 for a in cands}
    fewest = min(nan.values())
    more = [k for k, v in nan.items() if v > fewest]
    pool = [a for a in cands if nan[a.architecture] == fewest]
    excluded += _excluded([("more NaN/skipped steps", more)])
    has_rough = [a for a in pool if _values(a, "roughness")]
    if not has_rough:
        detail = f"{fewest:.0f} NaN/skipped steps; no train-loss roughness measured"
        return Winner("most stable", None, detail + excluded, kind="none")
    w = _significance_winner(
        "most stable",
        has_rough,
        "roughness",
        True,
        lambda v: f"train-loss roughness {v:.4f}, {fewest:.0f} NaN/skipped steps",
        excluded,
    )
    return w


# ---- files --------------------------------------------------------------------------------
def write_results_json(
    path: Path,
    archs: list[ArchResult],
    runs: list[RunResult],
    wins: list[Winner],
    settings: dict[str, Any],
    hardware: dict[str, Any],
    data_meta: dict[str, Any],
    command: str,
    reference: Reference | None = None,
) -> None:
    """Everything the report shows, plus the whole learning-rate grid and every run."""
    reference = reference or Reference()
    doc = {
        "command": command,
        "settings": settings,
        "data": data_meta,
        "baselines": reference.to_dict(),
        "hardware": hardware,
        "table": {
            "columns": list(TABLE_COLUMNS),
            "header": reference.header_line(),
            "rows": table_rows(archs, reference.unigram_entropy),
        },
        "architectures": [a.to_dict() for a in archs],
        "best_learning_rates": {a.architecture: a.learning_rate for a in archs},
        "grid": [p.to_dict() | {"best": p is a} for a in archs for p in (a.grid or [a])],
        "winners": [w.to_dict() for w in wins],
        "runs": [r.to_dict(curves=False) for r in runs],
    }
    _atomic_write(path, json.dumps(doc, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_results_csv(path: Path, runs: list[RunResult]) -> None:
    """One row per run (architecture, seed): the raw numbers, no rounding."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for r in runs:
            d = r.to_dict(curves=False)
            writer.writerow({k: "" if d.get(k) is None else d[k] for k in CSV_FIELDS})
    tmp.replace(path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def report_markdown(
    *,
    title: str,
    archs: list[ArchResult],
    wins: list[Winner],
    settings: dict[str, Any],
    hardware: dict[str, Any],
    data_meta: dict[str, Any],
    command: str,
    child_commands: dict[str, str],
    plots: list[tuple[str, str]],
    protocol_notes: list[str],
    reference: Reference | None = None,
) -> str:
    """report.md: what was run, on what, with which settings, and what came out."""
    reference = reference or Reference()
    lines = [f"# {title}", "", f"Run on {hardware['date']}.", "", "## Results", ""]
    lines += [reference.header_line(), ""]
    lines.append(markdown_table(archs, reference.unigram_entropy))
    lines += ["", "Winners:", ""]
    lines += [f"- {w.headline()}" for w in wins]
    lines += mfu_lines(archs)
    sweep = [a for a in archs if len(a.grid) > 1]
    if sweep:
        lines += ["", "### Learning-rate grid (final val loss; * the rate in the table)", ""]
        lines += grid_table(archs)
    lines += ["", "## Plots", ""]
    lines += [f"![{caption}]({name})" for name, caption in plots]
    lines += ["", "## Protocol (identical for every architecture)", ""]
    lines += [f"- {note}" for note in protocol_notes]
    lines += ["", "### Settings", ""]
    lines += [f"- `{k}`: {v}" for k, v in settings.items()]
    lines += ["", "### Data", ""]
    lines += [f"- `{k}`: {v}" for k, v in data_meta.items()]
    lines += ["", "## Rerun", "", "```", command, "```", ""]
    lines += ["Each architecture ran in its own process with:", ""]
    for name, cmd in child_commands.items():
        lines += [f"- {name}:", "", "  ```", f"  {cmd}", "  ```"]
    lines += ["", "## Machine", ""]
    lines += hardware_lines(hardware)
    lines += ["", "## Runs", ""]
    for a in archs:
        for r in a.runs:
            rel = Path(r.run_dir).name
            state = "ok" if r.ok else f"failed: {r.error}"
            lines.append(f"- [{rel}]({rel}/) (seed {r.seed}): {state}")
    lines += [
        "",
        "## How the numbers are measured",
        "",
        *[f"- {line}" for line in COLUMN_NOTES],
        "",
    ]
    return "\n".join(lines)


def mfu_lines(archs: list[ArchResult]) -> list[str]:
    """MFU per architecture and the peak it divides by, with where that figure came from."""
    runs = [r for a in archs for r in a.ok_runs if r.mfu is not None and r.peak_flops]
    if not runs:
        return []
    cells = ", ".join(
        f"{a.architecture} {100 * a.stats['mfu'].mean:.2f}%"
        for a in archs
        if a.stats.get("mfu") is not None and a.stats["mfu"].mean is not None
    )
    peaks = {(r.peak_flops, r.peak_flops_source, r.peak_flops_how) for r in runs}
    lines = ["", f"MFU (model FLOPs / peak FLOP/s): {cells}."]
    for flops, source, how in sorted(peaks, key=lambda p: (p[0], str(p[1]), str(p[2]))):
        lines.append(f"- peak {flops / 1e9:,.1f} GFLOP/s per device, {source}: {how}")
    if len(peaks) > 1:
        lines.append("- the runs did not share one peak: their MFU values are not comparable")
    return lines


# One line per column of the table (and the cells' ±), printed under it in report.md.
COLUMN_NOTES = (
    "LR: the peak learning rate of the row; after a sweep (--learning-rates), the rate of "
    "the grid with the lowest mean final val loss for that architecture.",
    "Params: trainable parameters (total / active per token where they differ, MoE).",
    "FLOPs/token: training (forward + backward) FLOPs per token from train/flops.py: 6 x "
    "the parameters a token multiplies plus the sequence mixers' own arithmetic (attention "
    "scores, Mamba's scan, HyperMixing's summary), checked against torch's FlopCounterMode "
    "(tests/test_flops.py; the scan and summary by formula, which the counter cannot see).",
    "Train FLOPs: FLOPs/token x the tokens the run trained on: its compute "
    "(loss_vs_flops.png puts every run at it, the lowest-loss-per-compute runs joined as the "
    "Pareto frontier).",
    "Time (s): the trainer's wall time from the first step to the end, evaluations "
    "included (summary.json `train_time_s`).",
    "Tokens/s: the steady-state training rate (the first step, which holds warm-up, and "
    "evaluations excluded).",
    "Peak memory (MiB): CPU: the peak resident set of the training process from just "
    "before the model is built to the end (VmHWM; interpreter and torch runtime "
    "included); CUDA: torch.cuda.max_memory_allocated. Each run has its own process.",
    "Model memory (MiB): the peak minus what the process held just before the model was "
    "built (CPU: RSS; CUDA: allocated): the model's own share (weights, gradients, "
    "optimizer state, activations).",
    "Final val loss: mean cross-entropy (nats/token) on the same fixed validation batches "
    "for every architecture.",
    "Bits/byte: the final val loss in bits per UTF-8 byte of validation text (nats / ln 2 "
    "/ bytes per token of the val split): independent of the tokenizer.",
    "Gap to floor: final val loss minus the data's entropy floor (meta.json "
    "`entropy_floor`), the lowest loss any model can reach on generated data.",
    "NaN/skipped: optimizer steps skipped because the loss or gradient was not finite (over "
    "every seed, failed ones included).",
    f"Notes: 'did not learn' when the final val loss is not {LEARNED_MARGIN:g} nats below the "
    "unigram baseline (such a row wins nothing); 'k of n seeds failed' when a seed diverged "
    "(NaN guard, non-finite loss): such a row cannot win best loss or most stable, and a "
    "sweep never picks a rate at which a seed failed; 'best at the edge' when the best rate "
    "is the lowest or highest of the grid.",
    "±: with several seeds a cell shows the mean ± the half-width of its 95% confidence "
    "interval (Student t over the seeds that finished); a winner needs Welch's t-test "
    "p < 0.05 against every other row and a lead of at least "
    + ", ".join(
        f"{100 * v:g}% ({k})" if rel else f"{v:g} nats ({k})" for k, (v, rel) in MIN_EFFECT.items()
    )
    + "; with one seed the first row is a leader, no winner.",
)


def grid_table(archs: list[ArchResult]) -> list[str]:
    """Markdown lines: one row per architecture, one column per learning rate."""
    rates = sorted({p.learning_rate for a in archs for p in a.grid if p.learning_rate})
    head = "| Architecture | " + " | ".join(format_lr(r) for r in rates) + " |"
    lines = [head, "|" + "---|" * (len(rates) + 1)]
    for a in archs:
        cells = []
        by_rate = {p.learning_rate: p for p in a.grid}
        for r in rates:
            p = by_rate.get(r)
            cell = _fmt(p.stats.get("final_val_loss"), ".4f") if p is not None else "-"
            if p is not None and p.learned is False and cell != "-":
                cell += " (did not learn)"
            cells.append(cell + (" *" if p is a else ""))
        lines.append(f"| {a.architecture} | " + " | ".join(cells) + " |")
    return lines


def write_report(path: Path, text: str) -> None:
    _atomic_write(path, text)

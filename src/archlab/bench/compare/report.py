"""The comparison's outputs: the table, report.md, results.json and results.csv (the winners
they name are decided in winners.py; its names are importable from here too).

The terminal table and the one in report.md are the same text, built from the same
aggregated numbers that results.json stores, so the three never disagree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..common.hardware import hardware_lines
from ..common.reference import LEARNED_MARGIN, Reference
from ..common.results import ArchResult, RunResult, Stat
from .winners import CRITERIA, MIB, MIN_EFFECT, ONE_SEED, Winner, winners  # noqa: F401 (report.winners)

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

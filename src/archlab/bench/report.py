"""The comparison's outputs: the table, the winners, report.md, results.json and results.csv.

The terminal table and the one in report.md are the same text, built from the same
aggregated numbers that results.json stores, so the three never disagree.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hardware import hardware_lines
from .results import ArchResult, RunResult, Stat

TABLE_COLUMNS = (
    "Architecture",
    "Params (total / active)",
    "Time (s)",
    "Tokens/s",
    "Peak memory (MiB)",
    "Final val loss",
    "Gap to floor",
    "NaN/skipped",
    "Notes",
)

CSV_FIELDS = (
    "architecture",
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
    "final_val_loss",
    "last_eval_val_loss",
    "entropy_floor",
    "gap_to_floor",
    "nan_count",
    "roughness",
    "mfu",
    "run_dir",
)

MIB = 1024.0 * 1024.0


# ---- cell formatting (one function per column so tests can parse them back) ---------------
def _fmt(stat: Stat | None, fmt: str, scale: float = 1.0, signed: bool = False) -> str:
    if stat is None or stat.mean is None:
        return "-"
    spec = ("+" if signed else "") + fmt
    text = format(stat.mean / scale, spec)
    if stat.n > 1:
        text += " ± " + format((stat.std or 0.0) / scale, fmt)
    return text


def _params(arch: ArchResult) -> str:
    total, active = arch.stats.get("total_params"), arch.stats.get("active_params")
    if total is None or total.mean is None:
        return "-"
    text = f"{int(total.mean):,}"
    if active is not None and active.mean is not None and int(active.mean) != int(total.mean):
        text += f" / {int(active.mean):,}"
    return text


def _notes(arch: ArchResult) -> str:
    resumed = [r for r in arch.ok_runs if r.resumed_from]
    extra = ""
    if resumed:
        seeds = ", ".join(str(r.seed) for r in resumed)
        extra = f"resumed (seed {seeds}): time covers the last process only"
    if arch.status == "ok":
        n = len(arch.runs)
        return "; ".join(t for t in (f"{n} seeds" if n > 1 else "", extra) if t)
    errs = "; ".join(arch.errors)
    if arch.status == "failed":
        return f"failed: {errs}"
    return "; ".join(
        t for t in (f"{len(arch.ok_runs)}/{len(arch.runs)} seeds ok", errs, extra) if t
    )


def table_rows(archs: list[ArchResult]) -> list[list[str]]:
    rows = []
    for a in archs:
        s = a.stats
        rows.append(
            [
                a.architecture,
                _params(a),
                _fmt(s.get("train_time_s"), ".1f"),
                _fmt(s.get("tokens_per_s"), ",.0f"),
                _fmt(s.get("peak_mem_bytes"), ".1f", scale=MIB),
                _fmt(s.get("final_val_loss"), ".4f"),
                _fmt(s.get("gap_to_floor"), ".4f", signed=True),
                _fmt(s.get("nan_count"), ".0f") if a.ok_runs else "-",
                _notes(a).replace("|", "/"),
            ]
        )
    return rows


def markdown_table(archs: list[ArchResult]) -> str:
    """A GitHub-markdown table: readable in a terminal and in report.md."""
    rows = [list(TABLE_COLUMNS)] + table_rows(archs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i in (0, 1, 8) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---- winners ----------------------------------------------------------------------------
@dataclass
class Winner:
    criterion: str  # "fastest" | "least memory" | "best loss" | "most stable"
    architecture: str | None
    detail: str

    def line(self) -> str:
        who = self.architecture or "none"
        return f"{self.criterion}: {who} ({self.detail})"


def winners(archs: list[ArchResult]) -> list[Winner]:
    """One winner per criterion among the architectures with at least one finished seed.

    fastest: highest tokens/s. least memory: lowest peak memory. best loss: lowest final
    validation loss. most stable: fewest NaN/skipped steps, ties broken by the lowest
    training-loss roughness (std of step-to-step loss change over the second half).
    """
    ok = [a for a in archs if a.ok_runs]
    if not ok:
        return [
            Winner(c, None, "every run failed")
            for c in ("fastest", "least memory", "best loss", "most stable")
        ]

    def best(metric: str, highest: bool) -> ArchResult | None:
        cands = [a for a in ok if a.mean(metric) is not None]
        if not cands:
            return None
        key = (lambda a: -a.mean(metric)) if highest else (lambda a: a.mean(metric))
        return min(cands, key=key)

    out = []
    a = best("tokens_per_s", highest=True)
    out.append(
        Winner(
            "fastest",
            a and a.architecture,
            f"{a.mean('tokens_per_s'):,.0f} tokens/s" if a else "no data",
        )
    )
    a = best("peak_mem_bytes", highest=False)
    out.append(
        Winner(
            "least memory",
            a and a.architecture,
            f"{a.mean('peak_mem_bytes') / MIB:.1f} MiB peak" if a else "no data",
        )
    )
    a = best("final_val_loss", highest=False)
    out.append(
        Winner(
            "best loss",
            a and a.architecture,
            f"final val loss {a.mean('final_val_loss'):.4f}" if a else "no data",
        )
    )

    def stability_key(x: ArchResult) -> tuple[float, float]:
        nan = x.mean("nan_count")
        rough = x.mean("roughness")
        return (math.inf if nan is None else nan, math.inf if rough is None else rough)

    best_key = min(stability_key(x) for x in ok)
    tied = [x.architecture for x in ok if stability_key(x) == best_key]
    nan, rough = best_key
    detail = f"{nan:.0f} NaN/skipped steps" if math.isfinite(nan) else "no NaN count"
    if math.isfinite(rough):
        detail += f", train-loss roughness {rough:.4f}"
    if len(tied) > 1:
        detail = "tie; " + detail
    out.append(Winner("most stable", tied[0] if len(tied) == 1 else ", ".join(tied), detail))
    return out


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
) -> None:
    doc = {
        "command": command,
        "settings": settings,
        "data": data_meta,
        "hardware": hardware,
        "table": {"columns": list(TABLE_COLUMNS), "rows": table_rows(archs)},
        "architectures": [a.to_dict() for a in archs],
        "winners": [
            {"criterion": w.criterion, "architecture": w.architecture, "detail": w.detail}
            for w in wins
        ],
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
) -> str:
    """report.md: what was run, on what, with which settings, and what came out."""
    lines = [f"# {title}", "", f"Run on {hardware['date']}.", "", "## Results", ""]
    lines.append(markdown_table(archs))
    lines += ["", "Winners:", ""]
    lines += [f"- {w.line()}" for w in wins]
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
        "- Time: the trainer's wall time from the first step to the end, evaluations "
        "included (summary.json `train_time_s`); tokens/s: the trainer's steady-state "
        "training rate (the first step, which holds warm-up, and evaluations excluded).",
        "- Peak memory: the trainer's peak (CUDA: max allocated; CPU: peak resident set of "
        "the training process, which includes the interpreter and torch). Each architecture "
        "ran in its own process, so the peak is its own.",
        "- Final val loss: mean cross-entropy (nats/token) on the same fixed validation "
        "batches for every architecture; gap to floor: final val loss minus the data's "
        "entropy floor (meta.json `entropy_floor`), the lowest loss any model can reach.",
        "- NaN/skipped: optimizer steps skipped because the loss or gradient was not finite.",
        "- With several seeds a cell shows mean ± sample standard deviation over the seeds "
        "that finished.",
        "",
    ]
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    _atomic_write(path, text)

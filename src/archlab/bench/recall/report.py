"""The outputs of `archlab bench recall`: recall.md, results.json, results.csv and the plot.

recall.md has one table per difficulty (rows: architecture, columns: d_model, cells: test
accuracy at the chosen learning rate and the recurrent state size), the chance level as the
last row, the same table at the longer test length, then every run of the grid.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from .tasks import DIFFICULTY

RUN_COLUMNS = (
    "task",
    "architecture",
    "d_model",
    "pairs",
    "learning_rate",
    "seed",
    "ok",
    "val_accuracy",
    "test_accuracy",
    "test_example_accuracy",
    "long_accuracy",
    "long_seq_len",
    "long_note",
    "final_train_loss",
    "late_loss",
    "loss_falling",
    "at_chance_loss",
    "converged",
    "parameters",
    "state_elements",
    "cache_elements",
    "steps",
    "batch_size",
    "seq_len",
    "vocab_size",
    "train_seconds",
    "train_cpu_seconds",
    "wall_seconds",
    "cpu_seconds",
    "error",
)
PLOT_NAME = "recall_vs_dmodel.png"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_count(n: int | None) -> str:
    if n is None:
        return "?"
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}".replace(".0" + suffix, suffix)
    return str(n)


# Marks on cells whose training had not converged (worker.training_trend).
FALLING_MARK, CHANCE_MARK = "†", "‡"
MARKS_LEGEND = (
    f"{FALLING_MARK} training loss still falling at the end (the last 20% of steps below the "
    f"20% before by more than 5%); {CHANCE_MARK} training loss never left the no-context "
    "level ln(values) (a plateau at chance, which more steps can end). Either way the cell "
    "is this budget's result, not the architecture's ability: raise --steps."
)


def convergence_mark(cell: dict[str, Any]) -> str:
    return (FALLING_MARK if cell.get("loss_falling") else "") + (
        CHANCE_MARK if cell.get("at_chance_loss") else ""
    )


def cell_text(cell: dict[str, Any]) -> str:
    """``0.982 (lr 0.003, state 8k)``; seeds: mean ± spread; failures say so; † / ‡ when
    the chosen rate's training had not converged."""
    if cell["test_accuracy"] is None:
        return f"failed ({cell['error']})"
    accs = cell["test_accuracies"]
    acc = fmt_acc(cell["test_accuracy"])
    if len(accs) > 1:
        spread = (max(accs) - min(accs)) / 2
        acc += f" ± {spread:.3f}"
    mark = convergence_mark(cell)
    return (
        f"{acc}{' ' + mark if mark else ''} (lr {cell['best_learning_rate']:g}, "
        f"state {fmt_count(cell['state_elements'])})"
    )


def long_text(cell: dict[str, Any]) -> str:
    if cell["test_accuracy"] is None:
        return "failed"
    if cell["long_accuracy"] is None:
        return "cannot extrapolate (learned positions)"
    return f"{fmt_acc(cell['long_accuracy'])} (train-length {fmt_acc(cell['test_accuracy'])})"


def tables(settings, cells: list[dict[str, Any]], long: bool = False) -> dict[int, str]:
    """{pairs: markdown table}: rows architecture, columns d_model, last row chance."""
    out = {}
    for pairs in settings.kv_pairs:
        mine = {(c["architecture"], c["d_model"]): c for c in cells if c["pairs"] == pairs}
        head = ["architecture"] + [f"d_model {d}" for d in settings.d_models]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arch in settings.architectures:
            row = [arch]
            for d in settings.d_models:
                c = mine[(arch, d)]
                row.append(long_text(c) if long else cell_text(c))
            lines.append("| " + " | ".join(row) + " |")
        chance = settings.task_data(pairs).chance
        n_values = settings.task_data(pairs).num_values
        lines.append(
            "| "
            + " | ".join([f"chance (1/{n_values})"] + [f"{chance:.4f}"] * len(settings.d_models))
            + " |"
        )
        out[pairs] = "\n".join(lines)
    return out


def parse_table(text: str) -> dict[tuple[str, int], float | None]:
    """Inverse of ``tables`` for the accuracies (tests check the table equals results.json)."""
    rows = [ln for ln in text.strip().splitlines() if ln.startswith("|")]
    head = [h.strip() for h in rows[0].strip("|").split("|")]
    widths = [int(h.split()[-1]) for h in head[1:]]
    out: dict[tuple[str, int], float | None] = {}
    for ln in rows[2:]:
        parts = [p.strip() for p in ln.strip("|").split("|")]
        if parts[0].startswith("chance"):
            continue
        for d, txt in zip(widths, parts[1:], strict=True):
            out[(parts[0], d)] = None if txt.startswith("failed") else float(txt.split()[0])
    return out


def state_note(settings) -> str:
    return (
        "state = recurrent state per sequence in elements, summed over the 2 layers: attention "
        f"(dense, moe) the KV cache 2 x T x d_model per layer at T = {settings.seq_len}; Mamba "
        "d_inner x N (2 d_model x 16) per layer; HyperMixer its running d' x d_model matrix "
        "(d' = d_model / 2); hybrid one Mamba layer plus one sliding-window KV cache "
        "2 x min(window, T) x d_model. results.json also has `cache_elements`, what each "
        "model's own decode cache holds after T tokens (Mamba's convolution buffer included)."
    )


def positions_line(settings) -> str:
    """How each architecture of the grid encodes order under the grid's --use-rope choice
    (what its summary's Positions line says), architectures that agree grouped."""
    from ...config import preset_config
    from ...models import registry

    flag = {None: "each architecture's default", True: "--use-rope", False: "--no-use-rope"}
    groups: dict[str, list[str]] = {}
    for arch in settings.architectures:
        cfg = preset_config(arch, model_size="nano", use_rope=settings.use_rope)
        groups.setdefault(registry.get(arch).positions_of(cfg), []).append(arch)
    parts = [f"{', '.join(archs)}: {how}" for how, archs in groups.items()]
    return f"{flag[settings.use_rope]} ({'; '.join(parts)})"


def wall_time_text(sessions: list[dict[str, Any]]) -> str:
    """``12.3 min`` or, after --resume, ``12.3 min over 3 sessions (8.5 + 0.3 + 3.5 min)``."""
    total = sum(x["wall_seconds"] for x in sessions)
    text = f"{total / 60:.1f} min"
    if len(sessions) > 1:
        parts = " + ".join(f"{x['wall_seconds'] / 60:.1f}" for x in sessions)
        text += f" over {len(sessions)} sessions ({parts} min)"
    return text


def markdown(
    settings, results, cells, command: str, hardware: dict[str, Any], sessions: list[dict]
) -> str:
    from ..common.hardware import hardware_lines

    what = DIFFICULTY[settings.task]
    task_name = {
        "mqar": "multi-query associative recall (MQAR, Zoology)",
        "selective-copy": "selective copying (MAD)",
    }[settings.task]
    long_len = settings.seq_len * settings.test_factor
    ok = sum(1 for r in results if r.get("ok"))
    cpu = sum(r.get("cpu_seconds") or 0.0 for r in results)
    lines = [
        f"# archlab bench recall: {task_name}",
        "",
        f"Answer accuracy on {settings.num_test:,} held-out test examples (only the answer "
        f"positions count), 2-layer models trained {settings.steps} steps of batch "
        f"{settings.batch_size} at sequence length {settings.seq_len}, vocabulary "
        f"{settings.vocab_size}. Per cell, the learning rate with the best mean accuracy on "
        f"{settings.num_val:,} separate validation examples is chosen (from "
        f"{', '.join(f'{lr:g}' for lr in settings.learning_rates)}); the cell shows its test "
        f"accuracy{' (mean ± half range over seeds)' if settings.seeds > 1 else ''}.",
        "",
        f"{ok} of {len(results)} runs finished; grid wall time {wall_time_text(sessions)}, "
        f"CPU time of the runs {cpu / 60:.1f} min (each run's whole process: start, "
        "training, evaluation).",
        "",
        state_note(settings),
        "",
    ]
    unsettled = sum(1 for c in cells if convergence_mark(c))
    if unsettled:
        lines += [
            f"**{unsettled} of {len(cells)} cells had not converged** ({MARKS_LEGEND})",
            "",
        ]
    for pairs, table in tables(settings, cells).items():
        lines += [f"## {pairs} {what}, length {settings.seq_len}", "", table, ""]
    lines += [
        f"## Test-length generalisation: accuracy at {long_len} tokens "
        f"({settings.test_factor}x the training length)",
        "",
        "Same models, same rate, examples twice as long (for mqar the same pairs with a longer "
        "query region; for selective copying the same tokens in more noise). Architectures "
        "with learned absolute positions have no position beyond the training length and "
        "cannot extrapolate; they are not run there.",
        "",
    ]
    for pairs, table in tables(settings, cells, long=True).items():
        lines += [f"### {pairs} {what}", "", table, ""]
    lines += [f"![accuracy vs d_model]({PLOT_NAME})", "", "## Every run", ""]
    lines += [
        "| architecture | d_model | " + what + " | lr | seed | val acc | test acc | "
        f"acc at {long_len} | final train loss | converged | params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("ok"):
            long = fmt_acc(r.get("long_accuracy")) if r.get("long_accuracy") is not None else "n/a"
            lines.append(
                f"| {r['architecture']} | {r['d_model']} | {r['pairs']} | "
                f"{r['learning_rate']:g} | {r['seed']} | {fmt_acc(r['val_accuracy'])} | "
                f"{fmt_acc(r['test_accuracy'])} | {long} | {r['final_train_loss']:.3f} | "
                f"{converged_text(r)} | {r['parameters']:,} | {r['train_seconds']:.1f} |"
            )
        else:
            lines.append(
                f"| {r['architecture']} | {r['d_model']} | {r['pairs']} | "
                f"{r['learning_rate']:g} | {r['seed']} | FAILED: {r.get('error')} | | | | | | |"
            )
    lines += [
        "",
        "## Protocol",
        "",
        "- Every architecture keeps its own archlab block: dense, moe, hypermixer and hybrid "
        "blocks are a sequence mixer followed by an MLP (d_ff = 4 x d_model; MoE's is the "
        "routed expert MLP), as Zoology pairs each mixer with an MLP; the Mamba block has no "
        "MLP, as in the Mamba paper (its gated, expanded projection is that part). Hybrid at "
        "2 layers is one Mamba layer then one sliding-window attention layer.",
        "- Every architecture sees the same training, validation and test examples; each run "
        "is its own process. AdamW (weight decay "
        f"{settings.weight_decay:g} on matrices), 10% linear warmup then cosine to 10%, "
        "gradient clipping 1.0, loss on the answer positions only.",
        f"- Positions: {positions_line(settings)}.",
        "- Wall times were measured on whatever else the machine was running: the load "
        "average below says how busy it was.",
        "",
        "## Machine",
        "",
        *hardware_lines(hardware),
        f"- Load average (1/5/15 min) at the end: {hardware.get('loadavg', '?')}",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def converged_text(run: dict[str, Any]) -> str:
    if run.get("converged") is None:
        return "?"
    if run["converged"]:
        return "yes"
    return "no: " + ("loss still falling" if run.get("loss_falling") else "loss at chance level")


def results_csv(results: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUN_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in results:
        w.writerow({k: r.get(k) for k in RUN_COLUMNS})
    return buf.getvalue()


def figure(settings, cells: list[dict[str, Any]]):
    """One panel per difficulty: test accuracy vs d_model, one line per architecture."""
    from ..common.plots import Figure, color_of

    n = len(settings.kv_pairs)
    fig = Figure(figsize=(4.2 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    what = DIFFICULTY[settings.task]
    for ax, pairs in zip(axes, settings.kv_pairs, strict=True):
        for i, arch in enumerate(settings.architectures):
            ys = []
            for d in settings.d_models:
                c = next(
                    c
                    for c in cells
                    if c["pairs"] == pairs and c["d_model"] == d and c["architecture"] == arch
                )
                ys.append(c["test_accuracy"] if c["test_accuracy"] is not None else math.nan)
            ax.plot(
                settings.d_models,
                ys,
                marker="o",
                label=arch,
                color=color_of(arch, i),
                gid=f"acc:{arch}",
            )
        chance = settings.task_data(pairs).chance
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, gid="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(settings.d_models, [str(d) for d in settings.d_models])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{pairs} {what}, length {settings.seq_len}")
        ax.set_xlabel("d_model")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def write_outputs(
    out_dir: Path,
    settings,
    results,
    cells,
    command: str,
    hardware: dict[str, Any],
    sessions: list[dict[str, Any]],
) -> dict[str, Path]:
    from ..common.plots import save_figure

    hardware = dict(hardware)
    try:
        hardware["loadavg"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        hardware["loadavg"] = None
    paths = {
        "recall.md": out_dir / "recall.md",
        "results.json": out_dir / "results.json",
        "results.csv": out_dir / "results.csv",
        PLOT_NAME: out_dir / PLOT_NAME,
    }
    doc = {
        "settings": settings.to_dict(),
        "command": command,
        "hardware": hardware,
        "wall_seconds": round(sum(x["wall_seconds"] for x in sessions), 3),
        "sessions": sessions,
        "cells": cells,
        "runs": results,
    }
    _atomic_write(paths["results.json"], json.dumps(doc, indent=2, default=str) + "\n")
    _atomic_write(paths["results.csv"], results_csv(results))
    save_figure(figure(settings, cells), paths[PLOT_NAME])
    _atomic_write(
        paths["recall.md"], markdown(settings, results, cells, command, hardware, sessions)
    )
    return paths

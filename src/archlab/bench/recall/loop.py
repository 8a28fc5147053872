"""`archlab bench recall`: the associative-recall probe of Zoology and MAD, per architecture.

For every architecture x d_model x difficulty (key-value pairs for ``mqar``, tokens to copy
for ``selective-copy``) x learning rate x seed, one process (``python -m
archlab.bench.recall.worker``) trains a 2-layer model on the same generated examples and
reports answer accuracy; per cell the rate with the best mean *validation* accuracy is kept
and its accuracy on a separate *test* set is reported (choosing and reporting on different
examples, so the sweep does not flatter the best rate). Every run is also evaluated at
``test_factor`` (2) times the training length.

The 2-layer models (Zoology trains 2 layers): each architecture keeps its own block as archlab
defines it, so the probe measures the blocks the rest of the lab trains. dense, moe,
hypermixer and hybrid blocks are a sequence mixer followed by an MLP (MoE's is the routed
expert MLP): the MLP is part of those blocks, as Zoology pairs every mixer with an MLP. The
Mamba block has no MLP, as in the Mamba paper: its gated, expanded inner projection plays that
role, and adding one would not be Mamba. Hybrid at 2 layers is one Mamba layer then one
sliding-window attention layer. d_ff = 4 x d_model everywhere.

The folder holds ``recall.json`` (the settings, written first; --resume checks them),
``runs/<name>/`` (spec.json, metrics.jsonl, result.json), ``logs/``, ``recall.md``,
``results.json``, ``results.csv`` and ``recall_vs_dmodel.png``.

This module plans, runs and aggregates the grid; beside it in ``bench/recall/``,
``settings.py`` holds its settings (defaults, flag checks, resume, the rerun command),
``tasks.py`` the examples, ``worker.py`` one run and ``report.py`` the outputs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import Interrupted
from .settings import RecallSettings, rerun_command, run_spec
from .worker import RunSpec, read_curve, training_trend, write_json_atomic


def run_name(arch: str, d_model: int, pairs: int, lr: float, seed: int) -> str:
    return f"{arch}-d{d_model}-kv{pairs}-lr{lr:g}-s{seed}"


@dataclass
class PlannedRun:
    name: str
    spec: RunSpec
    run_dir: Path


def plan_runs(s: RecallSettings, out_dir: Path) -> list[PlannedRun]:
    """Ordered so that every pair count is complete early: pairs, width, arch, rate, seed."""
    out: list[PlannedRun] = []
    for pairs in s.kv_pairs:
        for d in s.d_models:
            for arch in s.architectures:
                for lr in s.learning_rates:
                    for seed in s.seed_list:
                        name = run_name(arch, d, pairs, lr, seed)
                        spec = run_spec(s, arch, d, pairs, lr, seed)
                        out.append(PlannedRun(name, spec, out_dir / "runs" / name))
    return out


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_one(run: PlannedRun, log_path: Path, t0: float) -> dict[str, Any]:
    """One child process; a crash becomes a failed record with the log's last line."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "result.json").unlink(missing_ok=True)
    (run.run_dir / "spec.json").write_text(json.dumps(asdict(run.spec), indent=2) + "\n")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "archlab.bench.recall.worker", str(run.run_dir)]
    env = dict(os.environ)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = read_result(run.run_dir)
    if res is None:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        tail = lines[-1] if lines else "no output"
        res = {**asdict(run.spec), "ok": False, "error": f"exit code {rc}: {tail}"}
    # CPU time of the whole child (import, training, evaluation): unlike wall time it barely
    # depends on what else the machine runs, so it estimates an idle machine's wall time
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["cpu_seconds"] = round(cpu, 3)
    res["wall_seconds"] = round(time.monotonic() - t0, 3)
    if (run.run_dir / "result.json").exists():  # keep it with the run, for --resume
        write_json_atomic(run.run_dir / "result.json", res)
    return res


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _describe(res: dict[str, Any]) -> str:
    if not res.get("ok"):
        return f"FAILED: {res.get('error')}"
    long = res.get("long_accuracy")
    long_txt = f"{long:.3f}" if long is not None else "n/a (learned positions)"
    return (
        f"val {res['val_accuracy']:.3f}, test {res['test_accuracy']:.3f}, "
        f"{res['seq_len'] * res['test_factor']} tokens {long_txt}"
    )


def run_grid(
    s: RecallSettings,
    out_dir: Path,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or finish) every planned run, then write every output; returns the summary."""
    from ..common.hardware import hardware_info
    from . import report as recall_report

    out_dir.mkdir(parents=True, exist_ok=True)
    command = rerun_command(s, out_dir)
    settings_path = out_dir / "recall.json"
    if not settings_path.exists():
        doc = {"settings": s.to_dict(), "command": command, "created": time.time()}
        settings_path.write_text(json.dumps(doc, indent=2) + "\n")
    runs = plan_runs(s, out_dir)
    say(
        f"archlab bench recall: {s.task}, {len(s.architectures)} architectures x "
        f"{len(s.d_models)} widths x {len(s.kv_pairs)} difficulties x "
        f"{len(s.learning_rates)} rates x {s.seeds} seed(s) = {len(runs)} runs of {s.steps} "
        f"steps (batch {s.batch_size}, length {s.seq_len}) -> {out_dir}"
    )
    results: list[dict[str, Any]] = []
    todo = []
    for run in runs:
        done = read_result(run.run_dir) if resume else None
        # finished, or diverged (a result of the protocol); a crash is run again
        if done is not None and (done.get("ok") or "final_train_loss" in done):
            if "converged" not in done:  # a run of an older version: judge its logged curve
                values = s.task_data(done["pairs"]).num_values
                done.update(training_trend(read_curve(run.run_dir), s.steps, values))
            results.append(done)
        else:
            todo.append(run)
    if resume and len(todo) < len(runs):
        say(f"--resume: {len(runs) - len(todo)} runs already finished; {len(todo)} to go")
    t_grid = time.monotonic()
    try:
        for i, run in enumerate(todo, start=1):
            t0 = time.monotonic()
            res = run_one(run, out_dir / "logs" / f"{run.name}.log", t0)
            results.append(res)
            elapsed = time.monotonic() - t_grid
            eta = elapsed / i * (len(todo) - i)
            say(
                f"[{len(runs) - len(todo) + i}/{len(runs)}] {run.name}: {_describe(res)} "
                f"({res['wall_seconds']:.1f} s; elapsed {_fmt_time(elapsed)}, "
                f"ETA {_fmt_time(eta)})"
            )
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the finished runs stay on disk
        record_session(settings_path, time.monotonic() - t_grid, interrupted=True)
        finished = sum(1 for r in results if r.get("ok") or "final_train_loss" in r)
        raise Interrupted(
            f"interrupted: {finished} of {len(runs)} runs finished (kept in {out_dir}); "
            f"continue the grid with: archlab bench recall --resume --out-dir "
            f"{shlex.quote(str(out_dir))}",
            getattr(exc, "signum", signal.SIGINT),
        ) from None
    sessions = record_session(settings_path, time.monotonic() - t_grid, interrupted=False)
    order = {r.name: k for k, r in enumerate(runs)}
    results.sort(
        key=lambda r: order.get(
            run_name(r["architecture"], r["d_model"], r["pairs"], r["learning_rate"], r["seed"]), 0
        )
    )
    cells = aggregate(s, results)
    paths = recall_report.write_outputs(
        out_dir, s, results, cells, command, hardware_info(), sessions
    )
    return {"results": results, "cells": cells, "paths": paths}


def record_session(settings_path: Path, wall_seconds: float, interrupted: bool) -> list[dict]:
    """Append this session's wall time to recall.json's ``sessions``; returns them all, so
    the report's grid wall time is the total over every --resume, not the last session's."""
    try:
        doc = json.loads(settings_path.read_text())
    except (OSError, ValueError):
        return [{"wall_seconds": round(wall_seconds, 3), "interrupted": interrupted}]
    doc.setdefault("sessions", []).append(
        {"ended": time.time(), "wall_seconds": round(wall_seconds, 3), "interrupted": interrupted}
    )
    write_json_atomic(settings_path, doc)
    return doc["sessions"]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(s: RecallSettings, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (pairs, d_model, architecture): the best rate by mean validation
    accuracy over seeds, and that rate's mean test and long-length accuracy."""
    cells = []
    for pairs in s.kv_pairs:
        chance = s.task_data(pairs).chance
        for d in s.d_models:
            for arch in s.architectures:
                mine = [
                    r
                    for r in results
                    if r["architecture"] == arch and r["d_model"] == d and r["pairs"] == pairs
                ]
                per_rate = []
                for lr in s.learning_rates:
                    rs = [r for r in mine if r["learning_rate"] == lr]
                    ok = [r for r in rs if r.get("ok")]
                    per_rate.append(
                        {
                            "learning_rate": lr,
                            "runs": len(rs),
                            "ok_runs": len(ok),
                            "val_accuracy": _mean([r["val_accuracy"] for r in ok]),
                            "test_accuracy": _mean([r["test_accuracy"] for r in ok]),
                            "long_accuracy": _mean(
                                [
                                    r["long_accuracy"]
                                    for r in ok
                                    if r.get("long_accuracy") is not None
                                ]
                            ),
                            "test_accuracies": [r["test_accuracy"] for r in ok],
                            "loss_falling": sum(1 for r in ok if r.get("loss_falling")),
                            "at_chance_loss": sum(1 for r in ok if r.get("at_chance_loss")),
                            "errors": sorted({r.get("error") for r in rs if not r.get("ok")}),
                        }
                    )
                usable = [p for p in per_rate if p["val_accuracy"] is not None]
                best = max(usable, key=lambda p: p["val_accuracy"]) if usable else None
                some = next((r for r in mine if r.get("ok")), None)
                cell = {
                    "task": s.task,
                    "architecture": arch,
                    "d_model": d,
                    "pairs": pairs,
                    "chance": chance,
                    "best_learning_rate": best["learning_rate"] if best else None,
                    "val_accuracy": best["val_accuracy"] if best else None,
                    "test_accuracy": best["test_accuracy"] if best else None,
                    "test_accuracies": best["test_accuracies"] if best else [],
                    "long_accuracy": best["long_accuracy"] if best else None,
                    # runs of the chosen rate whose loss was still falling at the end, or had
                    # never left the no-context level: the cell is the budget's, not the
                    # architecture's ability
                    "loss_falling": best["loss_falling"] if best else 0,
                    "at_chance_loss": best["at_chance_loss"] if best else 0,
                    "long_seq_len": s.seq_len * s.test_factor,
                    "long_note": some.get("long_note") if some else None,
                    "state_elements": some.get("state_elements") if some else None,
                    "cache_elements": some.get("cache_elements") if some else None,
                    "parameters": some.get("parameters") if some else None,
                    "per_rate": per_rate,
                    "error": None
                    if best
                    else "; ".join(sorted({e for p in per_rate for e in p["errors"] if e}))
                    or "no run",
                }
                cells.append(cell)
    return cells


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)

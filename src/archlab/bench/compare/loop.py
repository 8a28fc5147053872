"""`archlab compare`: train several architectures under one protocol and report the result.

The protocol (DESIGN.md): the same prepared data and tokenizer, the same token budget, the
same effective batch (batch x accumulation x sequence length), the same optimizer and
schedule, the same seed(s), the same fixed validation batches and the same optimizations.
The data is prepared ONCE here; then every (architecture, seed) trains in its own
subprocess (``python -m archlab train ...``), so its peak memory is its own and a crash
(out of memory, NaNs) only ends that run. The folder then holds ``compare.json`` (the
settings, written first), one run folder per (architecture, seed), ``logs/``,
``report.md``, ``results.json``, ``results.csv``, ``loss_vs_tokens.png`` and
``loss_vs_time.png``.

What makes the table citable (issue #11): every report is read against the data's
baselines (a run not below the unigram entropy "did not learn" and wins nothing); winners
need Welch's t-test over seeds (bench/common/stats.py); ``--learning-rates`` trains every
architecture at every rate and reports each at its best (one run folder per (architecture,
rate, seed), the whole grid in results.json/csv and ``loss_vs_lr.png``); the memory column
has the model's own share beside the process's peak; losses are also in bits per byte.

Exit code: 0 when at least one run finished, 1 when every run failed, 2 for a user error.

This file is the loop, top to bottom: plan the runs, train each one not finished yet, read
them back, write the outputs. The pieces live beside it in bench/compare/: the settings and
their checks in settings.py, the runs and their command lines in plan.py, the child process
and live progress in runner.py, the outputs in outputs.py. Every public name of those
modules is also importable from here.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ...train.optim import warmup_warning
from ..common.reference import load_reference
from ..common.results import read_run
from .outputs import (
    CompareOutcome,
    collect_run,
    data_summary,
    protocol_notes,
    reference_lines,
    write_outputs,
)
from .plan import (
    OUTPUT_FILES,
    SWEEP_FILES,
    RunSpec,
    child_command,
    comparison_finished,
    has_checkpoint,
    lr_tag,
    output_files,
    plan_runs,
    rerun_command,
    run_finished,
)
from .runner import CompareProgress, run_child
from .settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUDGET_NOTE,
    DEFAULT_LEARNING_RATE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_SEQ_LEN,
    FLAG_NAMES,
    CompareSettings,
    check_against_data,
    check_resume_flags,
    format_learning_rates,
    load_saved_settings,
    settings_for_data,
    settings_from_flags,
)


def run_compare(
    s: CompareSettings,
    out_dir: Path,
    *,
    resume: bool,
    meta: dict[str, Any],
    stream: TextIO | None = None,
    say: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> CompareOutcome:
    """Train every planned run that is not finished yet, then write all outputs.

    Progress (overall and the current run) goes to ``stream`` (stderr): live bars on a
    terminal, plain lines elsewhere, none when ``quiet``."""
    from ..common.hardware import hardware_info

    stream = stream or sys.stderr
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / "compare.json"
    command = rerun_command(s, out_dir)
    if not settings_path.exists():
        doc = {"settings": s.to_dict(), "command": command, "created": time.time()}
        settings_path.write_text(json.dumps(doc, indent=2) + "\n")
    specs = plan_runs(s, out_dir)
    grid = f" x {len(s.grid)} learning rates" if s.sweep else ""
    finished = {spec.name for spec in specs if resume and run_finished(spec.run_dir)}
    progress = CompareProgress(
        stream, len(specs), s.total_steps, runs_done=len(finished), mode="off" if quiet else None
    )
    say = say or progress.message
    say(
        f"archlab compare: {len(s.architectures)} architectures{grid} x {s.seeds} seed(s) at "
        f"{s.model_size}, {s.total_steps} steps of {s.tokens_per_step:,} tokens each, data "
        f"{s.data} -> {out_dir}"
    )
    warning = warmup_warning(s.warmup_steps, s.total_steps)
    if warning:
        say(warning)
    returncodes: dict[str, tuple[int | None, str | None]] = {}
    for i, spec in enumerate(specs, start=1):
        prefix = f"[{i}/{len(specs)} {spec.name}]"
        if spec.name in finished:
            say(f"{prefix} already finished; skipped")
            continue
        rc, tail = train_one(s, spec, out_dir / "logs", progress, prefix, say, resume)
        returncodes[spec.name] = (rc, tail)
    progress.close()
    reference = load_reference(Path(s.data), meta)
    runs = [
        collect_run(spec, reference, *returncodes.get(spec.name, (None, None))) for spec in specs
    ]
    children = child_commands(s, specs)
    return write_outputs(s, out_dir, runs, meta, hardware_info(), command, children, reference)


def train_one(
    s: CompareSettings,
    spec: RunSpec,
    log_dir: Path,
    progress: CompareProgress,
    prefix: str,
    say: Callable[[str], None],
    resume: bool,
) -> tuple[int, str]:
    """One run in its own process (continued from its checkpoint when resuming); its log
    goes to ``log_dir/<name>.log``. Returns (return code, last meaningful stderr line)."""
    cont = resume and has_checkpoint(spec.run_dir)
    if not cont and spec.run_dir.exists():
        (spec.run_dir / "summary.json").unlink(missing_ok=True)  # stale failure record
    spec.command = child_command(
        s, spec.architecture, spec.seed, spec.run_dir, resume=cont, learning_rate=spec.learning_rate
    ) + list(spec.extra_args)
    progress.note(f"{prefix} {'resuming' if cont else 'training'} ...")
    t0 = time.monotonic()
    progress.begin_run(prefix)
    try:
        rc, tail = run_child(spec, log_dir / f"{spec.name}.log", progress, prefix)
    except BaseException:  # interrupted: take the bars down before the message
        progress.close()
        raise
    finally:
        progress.end_run()
    res = read_run(spec.run_dir, spec.architecture, spec.seed, rc, tail)
    if res.ok:
        say(
            f"{prefix} done in {time.monotonic() - t0:.1f} s: "
            f"{res.tokens_per_s or 0:,.0f} tokens/s, final val loss {res.final_val_loss:.4f}"
        )
    else:
        say(f"{prefix} FAILED: {res.error}")
    return rc, tail


def child_commands(s: CompareSettings, specs: list[RunSpec]) -> dict[str, str]:
    """Run name -> the `archlab train` line that reproduces it from scratch (report.md).

    Looked up through this module's ``child_command``, the one the runs were launched with."""
    return {
        spec.name: shlex.join(
            child_command(
                s,
                spec.architecture,
                spec.seed,
                spec.run_dir,
                resume=False,
                learning_rate=spec.learning_rate,
            )
            + list(spec.extra_args)
        )
        for spec in specs
    }


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BUDGET_NOTE",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SEQ_LEN",
    "FLAG_NAMES",
    "OUTPUT_FILES",
    "SWEEP_FILES",
    "CompareOutcome",
    "CompareProgress",
    "CompareSettings",
    "RunSpec",
    "check_against_data",
    "check_resume_flags",
    "child_command",
    "child_commands",
    "collect_run",
    "comparison_finished",
    "data_summary",
    "format_learning_rates",
    "has_checkpoint",
    "load_saved_settings",
    "lr_tag",
    "output_files",
    "plan_runs",
    "protocol_notes",
    "reference_lines",
    "rerun_command",
    "run_child",
    "run_compare",
    "run_finished",
    "settings_for_data",
    "settings_from_flags",
    "train_one",
    "write_outputs",
]

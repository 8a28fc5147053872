"""The study, top to bottom: save its settings and ladder, train what is left, fit, write.

scale.json (written first) holds the settings, the ladder as planned (shapes, budgets, rates)
and the command; --resume reads the ladder from it, so a resumed study trains exactly what was
planned even if the learning-rate table changed since.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ...errors import UserError
from ..compare.plan import run_finished
from . import report
from .estimate import estimate_grid
from .ladder import Rung, build_ladder
from .plan import LadderRun, plan_ladder, train_ladder
from .settings import FLAG_NAMES, ScaleSettings


def rerun_command(s: ScaleSettings, out_dir: Path) -> str:
    parts = ["archlab", "scale", "--architectures", ",".join(s.architectures)]
    parts += ["--depths", ",".join(map(str, s.depths)), "--data", s.data]
    for key in ("tokens_per_param", "width_per_depth", "head_dim", "seq_len", "batch_size",
                "learning_rate", "recipe", "eval_steps", "device", "num_threads", "seed",
                "seeds", "bootstrap"):  # fmt: skip
        value = getattr(s, key)
        if value is not None:
            parts += [FLAG_NAMES[key], f"{value:g}" if isinstance(value, float) else str(value)]
    parts.append("--use-amp" if s.use_amp else "--no-use-amp")
    if s.compare_results:
        parts += ["--compare-results", s.compare_results]
    return shlex.join(parts + ["--out-dir", str(out_dir)])


def saved_ladder(out_dir: Path) -> list[Rung]:
    try:
        doc = json.loads((out_dir / "scale.json").read_text())
        return [Rung(**{k: v for k, v in r.items() if k != "train_flops"}) for r in doc["ladder"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"--resume: cannot read the ladder in {out_dir / 'scale.json'} ({exc})"
        ) from None


def study_finished(s: ScaleSettings, out_dir: Path) -> bool:
    runs = plan_ladder(s, saved_ladder(out_dir), out_dir)
    return all(run_finished(r.spec.run_dir) for r in runs) and all(
        (out_dir / f).exists() for f in report.OUTPUT_FILES
    )


def run_study(
    s: ScaleSettings,
    out_dir: Path,
    *,
    resume: bool,
    meta: dict[str, Any],
    stream: TextIO | None = None,
    say: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> report.StudyOutcome:
    from ..common.hardware import hardware_info
    from ..common.reference import load_reference
    from ..compare.outputs import collect_run

    t0 = time.monotonic()
    stream = stream or sys.stderr
    out_dir.mkdir(parents=True, exist_ok=True)
    command = rerun_command(s, out_dir)
    path = out_dir / "scale.json"
    vocab = int(meta["vocab_size"])
    fresh = not (resume and path.exists())
    rungs = build_ladder(s, vocab) if fresh else saved_ladder(out_dir)
    runs: list[LadderRun] = plan_ladder(s, rungs, out_dir)
    estimate = estimate_grid(s, rungs, runs, vocab)
    if fresh:
        doc = {
            "settings": s.to_dict(),
            "ladder": [r.to_dict() for r in rungs],
            "estimate": estimate.to_dict(),
            "command": command,
            "created": time.time(),
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
    codes = train_ladder(s, runs, out_dir, resume, stream, say, quiet, estimate)
    reference = load_reference(Path(s.data), meta)
    results = [collect_run(r.spec, reference, *codes.get(r.name, (None, None))) for r in runs]
    return report.write_outputs(
        s, out_dir, rungs, runs, results, meta, hardware_info(), command,
        time.monotonic() - t0, reference, estimate,
    )  # fmt: skip


def preview(s: ScaleSettings, meta: dict[str, Any]) -> str:
    """--estimate-only: the ladder as it would be trained and each run's estimated time."""
    from ..compare.report import format_flops

    rungs = build_ladder(s, int(meta["vocab_size"]))
    runs = plan_ladder(s, rungs, Path("."))
    est = estimate_grid(s, rungs, runs, int(meta["vocab_size"]))
    dense = {r.depth: r.params for r in rungs if r.architecture == "dense"}
    rows = []
    for r in rungs:
        gap = f"{100 * (r.params / dense[r.depth] - 1):+.0f}%" if r.depth in dense else "-"
        secs = sum(v for k, v in est.seconds.items() if k.startswith(r.name + "-seed"))
        shape = " ".join(f"{k}={v}" for k, v in r.shape.items() if k != "max_seq_len")
        rows.append([r.name, shape, f"{r.params:,}", gap, f"{r.tokens:,}", f"{r.steps:,}",
                     format_flops(r.train_flops), f"{r.learning_rate:.3g}", f"{secs:.0f}"])  # fmt: skip
    columns = ["Rung", "Shape", "Params (active)", "vs dense", "Tokens", "Steps",
               "Train FLOPs", "LR", "Est. s (all seeds)"]  # fmt: skip
    total = sum(r.train_flops for r in runs_rungs(runs))
    return "\n".join([
        report.markdown(columns, rows), "",
        f"{len(runs)} runs, {total:.3g} training FLOPs; {est.line()}.",
        f"(timing the rungs took {est.timing_s:.1f} s)",
    ])  # fmt: skip


def runs_rungs(runs: list[LadderRun]) -> list[Rung]:
    return [r.rung for r in runs]

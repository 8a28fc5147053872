"""The runs of a comparison: one ``RunSpec`` per (architecture, learning rate, seed).

``plan_runs`` names every run folder (seed-major, so a partial comparison has whole seeds);
``child_command`` is the exact `archlab train` line of one run, ``rerun_command`` the
`archlab compare` line that repeats the whole comparison; ``run_finished`` /
``has_checkpoint`` / ``comparison_finished`` are what --resume reads from the folders to
decide what is left to do.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .settings import FLAG_NAMES, CompareSettings, format_learning_rates


@dataclass
class RunSpec:
    """One child process: an architecture, a seed and its run folder."""

    architecture: str
    seed: int
    run_dir: Path
    command: list[str] = field(default_factory=list)
    learning_rate: float | None = None  # None: the comparison's --learning-rate
    # more `archlab train` flags after child_command's (a scaling study's model shape)
    extra_args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name


def child_command(
    s: CompareSettings,
    arch: str,
    seed: int,
    run_dir: Path,
    resume: bool,
    learning_rate: float | None = None,
) -> list[str]:
    """The exact `archlab train` command line of one run (at ``learning_rate``, default the
    comparison's --learning-rate). Public: other benches reuse compare's per-process runs."""
    cmd = [
        sys.executable,
        "-m",
        "archlab",
        "train",
        "--architecture",
        arch,
        "--model-size",
        s.model_size,
        "--data",
        s.data,
        "--seq-len",
        str(s.seq_len),
        "--batch-size",
        str(s.batch_size),
        "--gradient-accumulation-steps",
        str(s.gradient_accumulation_steps),
    ]
    if s.max_tokens is not None:
        cmd += ["--max-tokens", str(s.max_tokens)]
    else:
        cmd += ["--num-epochs", str(s.num_epochs), "--steps-per-epoch", str(s.steps_per_epoch)]
    cmd += [
        "--learning-rate",
        repr(s.rate_of(arch, learning_rate)),
        "--warmup-steps",
        str(s.warmup_steps),
        "--seed",
        str(seed),
        "--eval-interval",
        str(s.eval_interval),
        "--eval-steps",
        str(s.eval_steps),
        "--log-interval",
        str(s.log_interval),
        "--checkpoint-interval",
        str(s.checkpoint_interval),
        "--device",
        s.device,
    ]
    for key in ("use_amp", "use_compile", "use_gradient_checkpointing"):
        cmd.append(FLAG_NAMES[key] if getattr(s, key) else "--no-" + FLAG_NAMES[key][2:])
    cmd += ["--recipe", s.recipe]
    for key in ("use_rmsnorm", "use_rope"):
        value = getattr(s, key)
        if value is not None:
            cmd.append(FLAG_NAMES[key] if value else "--no-" + FLAG_NAMES[key][2:])
    if s.num_threads is not None:
        cmd += ["--num-threads", str(s.num_threads)]
    cmd += ["--out-dir", str(run_dir)]
    if resume:
        cmd.append("--resume")
    return cmd


def rerun_command(s: CompareSettings, out_dir: Path) -> str:
    """A command that repeats this comparison with every setting spelled out."""
    parts = [
        "archlab",
        "compare",
        "--architectures",
        ",".join(s.architectures),
        "--model-size",
        s.model_size,
        "--data",
        s.data,
    ]
    if s.max_tokens is not None:
        parts += ["--max-tokens", str(s.max_tokens)]
    else:
        parts += ["--num-epochs", str(s.num_epochs), "--steps-per-epoch", str(s.steps_per_epoch)]
    if s.sweep:
        parts += [FLAG_NAMES["learning_rates"], format_learning_rates(s.grid)]
    elif s.learning_rate is not None:
        parts += [FLAG_NAMES["learning_rate"], repr(s.learning_rate)]
    for key in (
        "seq_len",
        "batch_size",
        "gradient_accumulation_steps",
        "warmup_steps",
        "eval_interval",
        "eval_steps",
        "log_interval",
        "checkpoint_interval",
        "device",
        "num_threads",
        "seed",
        "seeds",
        "recipe",
    ):
        value = getattr(s, key)
        if value is not None:
            parts += [FLAG_NAMES[key], repr(value) if isinstance(value, float) else str(value)]
    for key in ("use_amp", "use_compile", "use_gradient_checkpointing", "use_rmsnorm", "use_rope"):
        value = getattr(s, key)
        if value is not None:
            parts.append(FLAG_NAMES[key] if value else "--no-" + FLAG_NAMES[key][2:])
    parts += ["--out-dir", str(out_dir)]
    return shlex.join(parts)


def lr_tag(lr: float) -> str:
    """The rate in a run folder's name: 0.0003 -> 'lr0.0003' (6 significant digits; the
    grid's rates are checked to differ in them)."""
    return f"lr{lr:g}"


def plan_runs(s: CompareSettings, out_dir: Path) -> list[RunSpec]:
    """Every (seed, learning rate, architecture) of the comparison, seed-major so that a
    partial comparison has whole seeds; a sweep's folders carry the rate in their name."""
    runs = []
    for seed in s.seed_list:
        for lr in s.grid:
            for arch in s.architectures:
                name = arch + (f"-{lr_tag(lr)}" if s.sweep else "")
                name += f"-seed{seed}" if s.seeds > 1 else ""
                runs.append(RunSpec(arch, seed, out_dir / name, learning_rate=s.rate_of(arch, lr)))
    return runs


def run_finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "ok"
    except (OSError, json.JSONDecodeError):
        return False


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").exists()


OUTPUT_FILES = (
    "report.md",
    "results.json",
    "results.csv",
    "loss_vs_tokens.png",
    "loss_vs_time.png",
    "loss_vs_flops.png",
)
SWEEP_FILES = ("loss_vs_lr.png",)


def output_files(s: CompareSettings) -> tuple[str, ...]:
    return OUTPUT_FILES + (SWEEP_FILES if s.sweep else ())


def comparison_finished(s: CompareSettings, out_dir: Path) -> bool:
    """Every planned run finished and every output file is there."""
    return all(run_finished(spec.run_dir) for spec in plan_runs(s, out_dir)) and all(
        (out_dir / f).exists() for f in output_files(s)
    )

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
need Welch's t-test over seeds (bench/stats.py); ``--learning-rates`` trains every
architecture at every rate and reports each at its best (one run folder per (architecture,
rate, seed), the whole grid in results.json/csv and ``loss_vs_lr.png``); the memory column
has the model's own share beside the process's peak; losses are also in bits per byte.

Exit code: 0 when at least one run finished, 1 when every run failed, 2 for a user error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from ..errors import Interrupted, UserError
from ..progress import Progress, eta_seconds, format_duration, progress_mode
from ..train.optim import default_warmup_steps, warmup_warning
from .reference import Reference, load_reference
from .results import RunResult, aggregate, best_points, read_run

# Default protocol of a bare `archlab compare`. The budget: nano training throughput at
# seq-len 128 x batch 16, measured with `archlab compare` pinned to 2 cores of an otherwise
# idle Xeon (taskset -c 0,1, 2 threads): dense 12,800 tokens/s, moe 9,900, hypermixer 3,000,
# mamba 2,070; hybrid (landed later) ran at 0.28-0.52x dense beside it on a busy 2-core
# machine, i.e. ~3,600-6,600. Summed, one token through all five costs ~1.15-1.27 ms, so 160k
# tokens take ~185-205 s of training, ~30 s of evaluation and ~8 s of process start per
# architecture: about 5 minutes, plus ~20 s to prepare the stories the first time.
DEFAULT_MAX_TOKENS = 160_000
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_LEARNING_RATE = 1e-3
# Checked against 4x the budget (issue #11; 640k tokens, same protocol, the schedule scaled
# with the run: 16 warmup steps, cosine over 313), seed 0, BPE-4096 stories, one thread per
# run on a shared 2-core machine: the ranking by final val loss is the same,
#   160k: mamba 2.676 < hybrid 2.713 < moe 3.203 < hypermixer 3.223 < dense 3.339
#   640k: mamba 0.990 < hybrid 1.007 < moe 1.174 < hypermixer 1.309 < dense 1.357
# (two pairs are within 0.04 at 160k with one seed: use --seeds for a significance claim).
DEFAULT_BUDGET_NOTE = (
    "default budget: 160,000 tokens per architecture (79 steps of 16 x 128 tokens, 4 warmup "
    "steps), about 5 minutes for all five nano architectures on 2 idle CPU cores; its ranking "
    "by final val loss matched a 4x longer run (seed 0)"
)
FLAG_NAMES = {
    "architectures": "--architectures",
    "model_size": "--model-size",
    "data": "--data",
    "max_tokens": "--max-tokens",
    "num_epochs": "--num-epochs",
    "steps_per_epoch": "--steps-per-epoch",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "learning_rate": "--learning-rate",
    "learning_rates": "--learning-rates",
    "warmup_steps": "--warmup-steps",
    "eval_interval": "--eval-interval",
    "eval_steps": "--eval-steps",
    "log_interval": "--log-interval",
    "checkpoint_interval": "--checkpoint-interval",
    "use_amp": "--use-amp",
    "use_compile": "--use-compile",
    "use_gradient_checkpointing": "--use-gradient-checkpointing",
    "use_rmsnorm": "--use-rmsnorm",
    "use_rope": "--use-rope",
    "device": "--device",
    "num_threads": "--num-threads",
    "seed": "--seed",
    "seeds": "--seeds",
}


@dataclass
class CompareSettings:
    """Everything that defines a comparison; stored in compare.json, checked on --resume."""

    architectures: list[str]
    model_size: str = "nano"
    data: str = ""  # the prepared folder every run reads
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    num_epochs: int | None = None
    steps_per_epoch: int | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    gradient_accumulation_steps: int = 1
    learning_rate: float = DEFAULT_LEARNING_RATE
    learning_rates: list[float] | None = None  # a sweep: every architecture at every rate
    warmup_steps: int = 0  # resolved from the step count when not given
    eval_interval: int = 0  # resolved: about eight evaluations per run
    eval_steps: int = 4
    log_interval: int = 0  # resolved: about a hundred train records per run
    checkpoint_interval: int = 0  # resolved: about four checkpoints per run (for --resume)
    use_amp: bool = False
    use_compile: bool = False
    use_gradient_checkpointing: bool = False
    use_rmsnorm: bool | None = None  # None: each architecture's preset default
    use_rope: bool | None = None
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    seeds: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return math.ceil(self.max_tokens / self.tokens_per_step)
        assert self.num_epochs is not None and self.steps_per_epoch is not None
        return self.num_epochs * self.steps_per_epoch

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    @property
    def grid(self) -> list[float]:
        """The learning rates every architecture trains at (one without a sweep)."""
        return list(self.learning_rates) if self.learning_rates else [self.learning_rate]

    @property
    def sweep(self) -> bool:
        return self.learning_rates is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RunSpec:
    """One child process: an architecture, a seed and its run folder."""

    architecture: str
    seed: int
    run_dir: Path
    command: list[str] = field(default_factory=list)
    learning_rate: float | None = None  # None: the comparison's --learning-rate

    @property
    def name(self) -> str:
        return self.run_dir.name


def settings_from_flags(raw: dict[str, Any]) -> CompareSettings:
    """Defaults for what the user left unset, and every check that needs no data.

    ``raw`` holds the user's explicit values (None = unset) keyed like CompareSettings.
    """
    given = {k: v for k, v in raw.items() if v is not None}
    if "max_tokens" in given and ("num_epochs" in given or "steps_per_epoch" in given):
        raise UserError("--max-tokens and --num-epochs/--steps-per-epoch are exclusive: give one")
    if ("num_epochs" in given) != ("steps_per_epoch" in given):
        raise UserError("--num-epochs and --steps-per-epoch go together (steps = their product)")
    if "num_epochs" in given:
        given["max_tokens"] = None
    for key in (
        "max_tokens",
        "num_epochs",
        "steps_per_epoch",
        "seq_len",
        "batch_size",
        "gradient_accumulation_steps",
        "eval_steps",
        "seeds",
        "num_threads",
    ):
        if given.get(key) is not None and given[key] < 1:
            raise UserError(f"{FLAG_NAMES[key]}: must be >= 1 (got {given[key]})")
    for key in ("warmup_steps", "eval_interval", "log_interval", "checkpoint_interval"):
        if given.get(key) is not None and given[key] < 0:
            raise UserError(f"{FLAG_NAMES[key]}: must be >= 0 (got {given[key]})")
    lr = given.get("learning_rate")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"--learning-rate: must be a positive number (got {lr})")
    if "learning_rates" in given:
        from .options import check_learning_rates

        if "learning_rate" in given:
            raise UserError(
                "--learning-rate and --learning-rates are exclusive: give one rate or a grid"
            )
        given["learning_rates"] = check_learning_rates(given["learning_rates"])
    s = CompareSettings(**given)
    if s.max_tokens is not None and s.max_tokens < s.tokens_per_step:
        raise UserError(
            f"--max-tokens {s.max_tokens:,} is smaller than one optimizer step "
            f"(batch {s.batch_size} x accumulation {s.gradient_accumulation_steps} x seq-len "
            f"{s.seq_len} = {s.tokens_per_step:,} tokens); raise it or shrink the batch"
        )
    steps = s.total_steps
    if "warmup_steps" not in given:
        s.warmup_steps = default_warmup_steps(steps)
    if "eval_interval" not in given:
        s.eval_interval = max(1, steps // 8)
    if "log_interval" not in given:
        s.log_interval = max(1, steps // 100)
    if "checkpoint_interval" not in given:
        s.checkpoint_interval = max(1, math.ceil(steps / 4))
    return s


def settings_for_data(raw: dict[str, Any], data_dir: Path, meta: dict[str, Any]) -> CompareSettings:
    """settings_from_flags bound to prepared data: MQAR examples have a fixed length, which
    becomes the seq-len unless one was given; then check_against_data."""
    if meta.get("task") == "mqar" and raw.get("seq_len") is None:
        raw = dict(raw, seq_len=int(meta["seq_len"]))
    s = settings_from_flags(raw)
    check_against_data(s, data_dir, meta)
    return s


def check_against_data(s: CompareSettings, data_dir: Path, meta: dict[str, Any]) -> None:
    """Bind the prepared data; every split must hold a window, every model the seq-len."""
    from ..config import preset_config

    s.data = str(data_dir)
    if meta.get("task") == "mqar" and s.seq_len != int(meta["seq_len"]):
        raise UserError(
            f"--seq-len {s.seq_len}: the mqar data in {data_dir} has sequences of "
            f"{meta['seq_len']} tokens; pass --seq-len {meta['seq_len']}"
        )
    # Every split must hold a window; every model must accept the sequence length.
    for split in ("train", "val"):
        n = int(meta.get(f"{split}_tokens", 0))
        if meta.get("task") != "mqar" and n <= s.seq_len + 1:
            raise UserError(
                f"--seq-len {s.seq_len}: the {split} split of {data_dir} has only {n} tokens"
            )
    for arch in s.architectures:
        cfg = preset_config(
            arch,
            model_size=s.model_size,
            vocab_size=int(meta["vocab_size"]),
            use_rope=s.use_rope,
            use_rmsnorm=s.use_rmsnorm,
        )
        if cfg.uses_learned_positions and s.seq_len > cfg.max_seq_len:
            raise UserError(
                f"--seq-len {s.seq_len} exceeds {arch}'s max_seq_len {cfg.max_seq_len} at "
                f"--model-size {s.model_size} (learned positions); lower --seq-len or pass "
                "--use-rope"
            )


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
        repr(s.learning_rate if learning_rate is None else learning_rate),
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
    else:
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


def format_learning_rates(rates: list[float]) -> str:
    return ",".join(f"{r:g}" if float(f"{r:g}") == r else repr(r) for r in rates)


def plan_runs(s: CompareSettings, out_dir: Path) -> list[RunSpec]:
    """Every (seed, learning rate, architecture) of the comparison, seed-major so that a
    partial comparison has whole seeds; a sweep's folders carry the rate in their name."""
    runs = []
    for seed in s.seed_list:
        for lr in s.grid:
            for arch in s.architectures:
                name = arch + (f"-{lr_tag(lr)}" if s.sweep else "")
                name += f"-seed{seed}" if s.seeds > 1 else ""
                runs.append(RunSpec(arch, seed, out_dir / name, learning_rate=lr))
    return runs


def run_finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "ok"
    except (OSError, json.JSONDecodeError):
        return False


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").exists()


# ---- the child process, with live progress -----------------------------------------------
_PROGRESS = re.compile(r"^step \d+/\d+ ")
_TRACE_NOISE = re.compile(r"^(Traceback|\s+File |\s+\^|\s{4})")


class CompareProgress:
    """The comparison's progress: runs done / total with an ETA, and the current run's steps.

    On a terminal two live bars (overall, current run) fed by the children's plain progress
    lines; elsewhere one plain line at most every ``every_s`` seconds, ``[2/5 mamba] step
    40/100 loss ... | compare: 1/5 runs done, eta 03:10``; ``mode="off"`` (``--quiet``) shows
    no progress, only the messages (run started, done, failed).
    """

    _STEP = re.compile(r"^step (\d+)/(\d+)\s*(.*?)(?:\s+elapsed \S+(?:\s+eta \S+)?)?$")

    def __init__(
        self,
        stream: TextIO,
        n_runs: int = 0,
        steps_per_run: int = 0,
        runs_done: int = 0,
        mode: str | None = None,
        every_s: float | None = None,
    ) -> None:
        from .. import progress as progress_mod

        self.stream = stream
        self.mode = mode if mode is not None else progress_mode(stream=stream)
        self.every_s = progress_mod.PLAIN_INTERVAL_S if every_s is None else every_s
        self.last = 0.0
        self.n_runs, self.steps_per_run = n_runs, steps_per_run
        self.runs_done = runs_done
        self.t0 = time.monotonic()
        self.session_steps = 0  # steps trained by this comparison process (for its ETA)
        self.run_first: int | None = None  # first step reported by the current run
        self.run_step = 0
        self.overall: Any = None
        self.current: Any = None
        if self.mode == "bar" and n_runs:
            self.overall = Progress(
                n_runs * steps_per_run,
                "compare",
                "step",
                mode="bar",
                stream=stream,
                initial=runs_done * steps_per_run,
                position=0,
            )
            self.overall.set_postfix(self._runs_text())

    def _runs_text(self) -> str:
        return f"{self.runs_done}/{self.n_runs} runs done"

    def eta(self) -> float | None:
        done = self.session_steps + (self.run_step - (self.run_first or 0))
        left = self.n_runs * self.steps_per_run - self.runs_done * self.steps_per_run
        left -= self.run_step
        return eta_seconds(done, max(left, 0), time.monotonic() - self.t0)

    # ---- a run ----------------------------------------------------------------------------
    def begin_run(self, prefix: str) -> None:
        self.run_first, self.run_step = None, 0
        if self.mode == "bar" and self.steps_per_run:
            self.current = Progress(
                self.steps_per_run, prefix, "step", mode="bar", stream=self.stream,
                position=1, leave=False,
            )  # fmt: skip

    def status(self, prefix: str, line: str) -> None:
        """A child's progress line ``step N/M ...``."""
        m = self._STEP.match(line)
        if m:
            step = int(m.group(1))
            if self.run_first is None:
                self.run_first = step - 1 if step > 0 else 0
            self.run_step = step
        if self.mode == "off":
            return
        if self.mode == "bar":
            if self.current is not None and m:
                self.current.set(self.run_step, postfix=m.group(3))
            if self.overall is not None:
                self.overall.set(self.runs_done * self.steps_per_run + self.run_step)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            tail = ""
            if self.n_runs:
                tail = f" | compare: {self._runs_text()}, eta {format_duration(self.eta())}"
            self.stream.write(f"{prefix} {line}{tail}\n")
            self.stream.flush()
            self.last = now

    def end_run(self) -> None:
        self.session_steps += self.run_step - (self.run_first or 0)
        self.runs_done += 1
        self.run_first, self.run_step = None, 0
        if self.current is not None:
            self.current.close()
            self.current = None
        if self.overall is not None:
            self.overall.set(self.runs_done * self.steps_per_run, postfix=self._runs_text())

    def note(self, text: str) -> None:
        """A progress message (a child's validation loss): silenced by --quiet."""
        if self.mode != "off":
            self.message(text)

    def message(self, text: str) -> None:
        if self.overall is not None:
            self.overall.write(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        for bar in (self.current, self.overall):
            if bar is not None:
                bar.close()
        self.current = self.overall = None


def run_child(
    spec: RunSpec, log_path: Path, progress: CompareProgress, prefix: str
) -> tuple[int, str]:
    """Run one training process to its end; (return code, last meaningful stderr line).

    SIGINT / SIGTERM are passed on to the child, which then saves a checkpoint and exits;
    afterwards Interrupted says where it stopped and how to continue the comparison.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    last_line = ""
    received: list[int] = []
    with log_path.open("w") as log:
        log.write("$ " + shlex.join(spec.command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            spec.command, stdout=log, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        assert proc.stderr is not None

        def forward(signum: int, frame: Any) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)  # a second one makes the child abort its save

        previous = _install_handlers(forward)
        try:
            for raw in proc.stderr:
                log.write(raw)
                for piece in raw.replace("\r", "\n").splitlines():
                    line = piece.strip()
                    if not line:
                        continue
                    if _PROGRESS.match(line):
                        progress.status(prefix, line)
                    elif line.startswith("step ") and "val loss" in line:
                        progress.note(f"{prefix} {line}")
                    elif not _TRACE_NOISE.match(piece):
                        last_line = line
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            _restore_handlers(previous)
    if received:
        raise Interrupted(_interrupt_message(spec, received[0]), received[0])
    return rc, last_line


def _install_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _interrupt_message(spec: RunSpec, signum: int) -> str:
    """Where the interrupted run stopped, read from its summary.json."""
    try:
        summary = json.loads((spec.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    where = (
        f"{spec.name} stopped at step {summary.get('steps')} (checkpoint {summary['checkpoint']})"
        if summary.get("checkpoint")
        else f"{spec.name} stopped before its first checkpoint"
    )
    return (
        f"{signal.Signals(signum).name}: {where}; continue the comparison with: archlab compare "
        f"--resume --out-dir {shlex.quote(str(spec.run_dir.parent))}"
    )


# ---- the whole comparison ----------------------------------------------------------------
def data_summary(data_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "source",
        "source_spec",
        "tokenizer",
        "vocab_size",
        "train_tokens",
        "val_tokens",
        "train_docs",
        "val_docs",
        "entropy_floor",
        "task",
        "hash",
    )
    return {"path": str(data_dir), **{k: meta.get(k) for k in keys if k in meta}}


def protocol_notes(s: CompareSettings, meta: dict[str, Any]) -> list[str]:
    budget = (
        f"{s.max_tokens:,} training tokens"
        if s.max_tokens is not None
        else f"{s.num_epochs} epochs x {s.steps_per_epoch} steps"
    )
    floor = meta.get("entropy_floor")
    return [
        f"Architectures: {', '.join(s.architectures)} at --model-size {s.model_size}, each in "
        "its own process (its peak memory is its own).",
        f"Data: {s.data} ({meta.get('source', '?')}, {meta.get('tokenizer')} tokenizer, "
        f"vocabulary {meta.get('vocab_size')}), prepared once and read by every run"
        + (f"; entropy floor {floor:.4f} nats/token" if floor is not None else "")
        + ".",
        f"Budget: {budget} = {s.total_steps} optimizer steps of {s.tokens_per_step:,} tokens "
        f"(batch {s.batch_size} x accumulation {s.gradient_accumulation_steps} x seq-len "
        f"{s.seq_len}).",
        "Optimizer: AdamW (the trainer's defaults: weight decay 0.1 on matrices, betas 0.9/0.95,"
        " gradient clipping 1.0), "
        + (
            f"peak learning rates {format_learning_rates(s.grid)} (every architecture at every "
            "rate, same seeds; each row shows the architecture at its best rate)"
            if s.sweep
            else f"peak learning rate {s.learning_rate:g}"
        )
        + f", {s.warmup_steps} linear warmup steps then cosine decay to 10%.",
        f"Seeds: {', '.join(map(str, s.seed_list))}; validation on the same fixed "
        f"{s.eval_steps} batches every {s.eval_interval} steps and at the end.",
        f"Optimizations: amp {s.use_amp}, compile {s.use_compile}, gradient checkpointing "
        f"{s.use_gradient_checkpointing}; rmsnorm {_preset(s.use_rmsnorm)}, rope "
        f"{_preset(s.use_rope)}; device {s.device}; torch threads per run: "
        + (str(s.num_threads) if s.num_threads else "torch's default (see Machine)")
        + ".",
    ]


def _preset(v: bool | None) -> str:
    return "preset default" if v is None else str(v)


@dataclass
class CompareOutcome:
    out_dir: Path
    runs: list[RunResult]
    archs: list[Any]
    winners: list[Any]
    table: str
    nothing_to_do: bool = False
    header: str = ""  # the baselines line printed above the table

    @property
    def exit_code(self) -> int:
        if self.nothing_to_do:
            return 0
        return 0 if any(r.ok for r in self.runs) else 1


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
    from .hardware import hardware_info

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
    return write_outputs(s, out_dir, runs, meta, hardware_info(), command, specs, reference)


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
    )
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


def collect_run(
    spec: RunSpec,
    reference: Reference,
    returncode: int | None = None,
    stderr_tail: str | None = None,
) -> RunResult:
    """A run folder read back, with what the references add: its rate, bits per byte and
    whether it learned (final val loss below the unigram baseline)."""
    res = read_run(
        spec.run_dir,
        spec.architecture,
        spec.seed,
        returncode,
        stderr_tail,
        reference.entropy_floor,
    )
    if spec.learning_rate is not None:
        res.learning_rate = spec.learning_rate
    if res.ok:
        res.bits_per_byte = reference.bits_per_byte(res.final_val_loss)
        res.learned = reference.learned(res.final_val_loss)
    return res


def write_outputs(
    s: CompareSettings,
    out_dir: Path,
    runs: list[RunResult],
    meta: dict[str, Any],
    hardware: dict[str, Any],
    command: str,
    specs: list[RunSpec],
    reference: Reference | None = None,
) -> CompareOutcome:
    from . import plots, report

    reference = reference or Reference(entropy_floor=meta.get("entropy_floor"))
    points = aggregate(runs, s.architectures, s.grid if s.sweep else None)
    archs = best_points(points, s.architectures)
    wins = report.winners(archs)
    table = report.markdown_table(archs, reference.unigram_entropy)
    data_meta = data_summary(Path(s.data), meta)
    settings = s.to_dict() | {"total_steps": s.total_steps, "tokens_per_step": s.tokens_per_step}
    # the curves: each architecture at its (best) rate
    by_arch = {a.architecture: a.runs for a in archs}
    title = f"{', '.join(s.architectures)} at {s.model_size}"
    lines = reference_lines(reference)
    for x, name in (("tokens", "loss_vs_tokens.png"), ("time", "loss_vs_time.png")):
        fig = plots.loss_figure(
            by_arch,
            x=x,
            title=f"validation loss vs {x}: {title}" + (" (best rate each)" if s.sweep else ""),
            references=lines,
        )
        plots.save_figure(fig, out_dir / name)
    plot_list = [
        ("loss_vs_tokens.png", "validation loss vs training tokens"),
        ("loss_vs_time.png", "validation loss vs wall time"),
    ]
    if s.sweep:
        fig = plots.lr_sweep_figure(
            {a.architecture: a.grid for a in archs},
            title=f"final validation loss vs learning rate: {title}",
            references=lines,
        )
        plots.save_figure(fig, out_dir / "loss_vs_lr.png")
        plot_list.append(("loss_vs_lr.png", "final validation loss vs learning rate"))
    report.write_results_json(
        out_dir / "results.json",
        archs,
        runs,
        wins,
        settings,
        hardware,
        data_meta,
        command,
        reference,
    )
    report.write_results_csv(out_dir / "results.csv", runs)
    children = {
        spec.name: shlex.join(
            child_command(
                s,
                spec.architecture,
                spec.seed,
                spec.run_dir,
                resume=False,
                learning_rate=spec.learning_rate,
            )
        )
        for spec in specs
    }
    md = report.report_markdown(
        title=f"archlab compare: {title}",
        archs=archs,
        wins=wins,
        settings=settings,
        hardware=hardware,
        data_meta=data_meta,
        command=command,
        child_commands=children,
        plots=plot_list,
        protocol_notes=protocol_notes(s, meta),
        reference=reference,
    )
    report.write_report(out_dir / "report.md", md)
    return CompareOutcome(out_dir, runs, archs, wins, table, header=reference.header_line())


def reference_lines(reference: Reference) -> list[tuple[str, float]]:
    """(label, nats/token) of the horizontal reference lines in every loss plot."""
    out = []
    for key, label in (
        ("unigram_entropy", "unigram"),
        ("bigram_entropy", "bigram"),
        ("entropy_floor", "entropy floor"),
    ):
        v = getattr(reference, key)
        if v is not None:
            out.append((label, v))
    return out


OUTPUT_FILES = (
    "report.md",
    "results.json",
    "results.csv",
    "loss_vs_tokens.png",
    "loss_vs_time.png",
)
SWEEP_FILES = ("loss_vs_lr.png",)


def output_files(s: CompareSettings) -> tuple[str, ...]:
    return OUTPUT_FILES + (SWEEP_FILES if s.sweep else ())


def comparison_finished(s: CompareSettings, out_dir: Path) -> bool:
    """Every planned run finished and every output file is there."""
    return all(run_finished(spec.run_dir) for spec in plan_runs(s, out_dir)) and all(
        (out_dir / f).exists() for f in output_files(s)
    )


def load_saved_settings(out_dir: Path) -> CompareSettings:
    path = out_dir / "compare.json"
    if not path.exists():
        raise UserError(f"--resume: {out_dir} is not an archlab compare folder (no compare.json)")
    try:
        return CompareSettings.from_dict(json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: cannot read {path} ({exc})") from None


def check_resume_flags(saved: CompareSettings, raw: dict[str, Any]) -> None:
    """Explicit flags given with --resume must agree with the saved protocol."""
    rates = raw.get("learning_rates")
    if rates is not None and (saved.learning_rates is None or list(rates) != saved.grid):
        made = (
            f"the grid {format_learning_rates(saved.grid)}"
            if saved.sweep
            else f"one learning rate ({saved.learning_rate:g}), no sweep"
        )
        raise UserError(
            f"--resume: --learning-rates {format_learning_rates(list(rates))} differs from "
            f"this comparison, made with {made} (compare.json); drop the flag or use a new "
            "--out-dir"
        )
    for key, value in raw.items():
        if value is None or key in ("data", "learning_rates"):
            continue
        if getattr(saved, key) != value:
            raise UserError(
                f"--resume: {FLAG_NAMES[key]} {value} differs from this comparison's "
                f"{getattr(saved, key)} (compare.json); drop the flag or use a new --out-dir"
            )


__all__ = [
    "CompareOutcome",
    "CompareSettings",
    "DEFAULT_BUDGET_NOTE",
    "OUTPUT_FILES",
    "check_resume_flags",
    "child_command",
    "collect_run",
    "format_learning_rates",
    "lr_tag",
    "output_files",
    "run_child",
    "train_one",
    "comparison_finished",
    "data_summary",
    "load_saved_settings",
    "plan_runs",
    "rerun_command",
    "check_against_data",
    "settings_for_data",
    "settings_from_flags",
    "run_compare",
]

"""`archlab bench recall`: the associative-recall probe of Zoology and MAD, per architecture.

For every architecture x d_model x difficulty (key-value pairs for ``mqar``, tokens to copy
for ``selective-copy``) x learning rate x seed, one process (``python -m
archlab.bench.recall_worker``) trains a 2-layer model on the same generated examples and
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
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UserError
from .recall_tasks import DEFAULT_VOCAB, TaskData, check_task
from .recall_worker import RunSpec, resolve_device, write_json_atomic

# The default grid, sized to finish in about 10 minutes on 2 CPU cores (measured; see README).
DEFAULT_ARCHITECTURES = ("dense", "hypermixer", "mamba", "moe", "hybrid")
DEFAULT_D_MODELS = (32, 64)
DEFAULT_KV_PAIRS = (2, 4)
DEFAULT_SEQ_LEN = 32
DEFAULT_LEARNING_RATES = (3e-3,)
DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 32
DEFAULT_N_HEADS = 4
# Zoology's own grid (Arora et al. 2023, Figure 2), for `--zoology`-sized runs by flags.
ZOOLOGY_FLAGS = (
    "--d-models 64,128,256,512 --kv-pairs 4,8,16,32,64 --seq-len 256 --vocab-size 8192 "
    "--learning-rates 1e-4,4.6e-4,2.2e-3,1e-2 --steps 20000 --num-train 100000"
)

FLAG_NAMES = {
    "task": "--task",
    "architectures": "--architectures",
    "d_models": "--d-models",
    "kv_pairs": "--kv-pairs",
    "seq_len": "--seq-len",
    "learning_rates": "--learning-rates",
    "seeds": "--seeds",
    "seed": "--seed",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "vocab_size": "--vocab-size",
    "n_heads": "--n-heads",
    "num_train": "--num-train",
    "num_val": "--num-val",
    "num_test": "--num-test",
    "test_factor": "--test-factor",
    "power_a": "--power-a",
    "weight_decay": "--weight-decay",
    "use_rope": "--use-rope",
    "threads": "--threads",
    "device": "--device",
}


@dataclass
class RecallSettings:
    """Everything that defines a recall grid; stored in recall.json, checked on --resume."""

    task: str = "mqar"
    architectures: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHITECTURES))
    d_models: list[int] = field(default_factory=lambda: list(DEFAULT_D_MODELS))
    kv_pairs: list[int] = field(default_factory=lambda: list(DEFAULT_KV_PAIRS))
    seq_len: int = DEFAULT_SEQ_LEN
    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LEARNING_RATES))
    seeds: int = 1
    seed: int = 0
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    vocab_size: int = 0  # 0 -> the task's default (mqar 32, selective-copy 16)
    n_heads: int = DEFAULT_N_HEADS
    num_train: int = 20_000
    num_val: int = 500
    num_test: int = 1_000
    test_factor: int = 2
    power_a: float = 0.01
    weight_decay: float = 0.1
    use_rope: bool | None = None  # None: each architecture's default (learned positions)
    threads: int | None = None
    device: str = "cpu"

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecallSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def task_data(self, pairs: int, seq_len: int | None = None) -> TaskData:
        return TaskData(self.task, self.vocab_size, pairs, seq_len or self.seq_len, self.power_a)


def settings_from_flags(raw: dict[str, Any]) -> RecallSettings:
    """Defaults for what the user left unset, then every check that needs no training.

    ``raw`` holds explicit values (None = unset) keyed like RecallSettings; lists are parsed.
    """
    given = {k: v for k, v in raw.items() if v is not None}
    check_task(given.get("task", "mqar"))
    for key in (
        "seq_len",
        "seeds",
        "steps",
        "batch_size",
        "n_heads",
        "num_train",
        "num_val",
        "num_test",
        "test_factor",
        "threads",
        "vocab_size",
    ):
        if key in given and given[key] < 1:
            raise UserError(f"{FLAG_NAMES[key]}: must be >= 1 (got {given[key]})")
    if "weight_decay" in given and not (given["weight_decay"] >= 0):
        raise UserError(f"--weight-decay: must be >= 0 (got {given['weight_decay']})")
    s = RecallSettings(**given)
    resolve_device(s.device)
    if not s.vocab_size:
        s.vocab_size = DEFAULT_VOCAB[s.task]
    for d in s.d_models:
        if d % s.n_heads:
            raise UserError(
                f"--d-models: width {d} is not divisible by --n-heads {s.n_heads} "
                "(attention splits d_model into equal heads)"
            )
    for p in s.kv_pairs:
        s.task_data(p).config()  # too many pairs for the vocabulary, sequence too short
    for arch in s.architectures:  # every model must build at every width
        for d in s.d_models:
            from .recall_worker import model_config

            model_config(run_spec(s, arch, d, s.kv_pairs[0], s.learning_rates[0], s.seed))
    return s


def run_name(arch: str, d_model: int, pairs: int, lr: float, seed: int) -> str:
    return f"{arch}-d{d_model}-kv{pairs}-lr{lr:g}-s{seed}"


def run_spec(
    s: RecallSettings, arch: str, d_model: int, pairs: int, lr: float, seed: int
) -> RunSpec:
    return RunSpec(
        task=s.task,
        architecture=arch,
        d_model=d_model,
        pairs=pairs,
        learning_rate=lr,
        seed=seed,
        data_seed=s.seed,
        seq_len=s.seq_len,
        vocab_size=s.vocab_size,
        n_heads=s.n_heads,
        steps=s.steps,
        batch_size=s.batch_size,
        num_train=s.num_train,
        num_val=s.num_val,
        num_test=s.num_test,
        test_factor=s.test_factor,
        power_a=s.power_a,
        weight_decay=s.weight_decay,
        use_rope=s.use_rope,
        threads=s.threads,
        device=s.device,
    )


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
    cmd = [sys.executable, "-m", "archlab.bench.recall_worker", str(run.run_dir)]
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
    from . import recall_report
    from .hardware import hardware_info

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
            results.append(done)
        else:
            todo.append(run)
    if resume and len(todo) < len(runs):
        say(f"--resume: {len(runs) - len(todo)} runs already finished; {len(todo)} to go")
    t_grid = time.monotonic()
    for i, run in enumerate(todo, start=1):
        t0 = time.monotonic()
        res = run_one(run, out_dir / "logs" / f"{run.name}.log", t0)
        results.append(res)
        elapsed = time.monotonic() - t_grid
        eta = elapsed / i * (len(todo) - i)
        say(
            f"[{len(runs) - len(todo) + i}/{len(runs)}] {run.name}: {_describe(res)} "
            f"({res['wall_seconds']:.1f} s; elapsed {_fmt_time(elapsed)}, ETA {_fmt_time(eta)})"
        )
    order = {r.name: k for k, r in enumerate(runs)}
    results.sort(
        key=lambda r: order.get(
            run_name(r["architecture"], r["d_model"], r["pairs"], r["learning_rate"], r["seed"]), 0
        )
    )
    cells = aggregate(s, results)
    paths = recall_report.write_outputs(
        out_dir, s, results, cells, command, hardware_info(), time.monotonic() - t_grid
    )
    return {"results": results, "cells": cells, "paths": paths}


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


def rerun_command(s: RecallSettings, out_dir: Path) -> str:
    parts = [
        "archlab",
        "bench",
        "recall",
        "--task",
        s.task,
        "--architectures",
        ",".join(s.architectures),
        "--d-models",
        ",".join(map(str, s.d_models)),
        "--kv-pairs",
        ",".join(map(str, s.kv_pairs)),
        "--seq-len",
        str(s.seq_len),
        "--learning-rates",
        ",".join(f"{lr:g}" for lr in s.learning_rates),
        "--seeds",
        str(s.seeds),
        "--seed",
        str(s.seed),
        "--steps",
        str(s.steps),
        "--batch-size",
        str(s.batch_size),
        "--vocab-size",
        str(s.vocab_size),
        "--n-heads",
        str(s.n_heads),
        "--num-train",
        str(s.num_train),
        "--num-val",
        str(s.num_val),
        "--num-test",
        str(s.num_test),
        "--test-factor",
        str(s.test_factor),
    ]
    if s.task == "mqar":
        parts += ["--power-a", f"{s.power_a:g}"]
    parts += ["--weight-decay", f"{s.weight_decay:g}"]
    if s.use_rope is not None:
        parts.append("--use-rope" if s.use_rope else "--no-use-rope")
    if s.threads is not None:
        parts += ["--threads", str(s.threads)]
    parts += ["--device", s.device]
    parts += ["--out-dir", str(out_dir)]
    return shlex.join(parts)


def load_saved_settings(out_dir: Path) -> RecallSettings:
    path = out_dir / "recall.json"
    if not path.exists():
        raise UserError(
            f"--resume: {out_dir} is not an archlab bench recall folder (no recall.json)"
        )
    try:
        return RecallSettings.from_dict(json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: cannot read {path} ({exc})") from None


def check_resume_flags(saved: RecallSettings, raw: dict[str, Any]) -> None:
    """Explicit flags given with --resume must agree with the saved grid."""
    for key, value in raw.items():
        if value is None:
            continue
        if getattr(saved, key) != value:
            raise UserError(
                f"--resume: {FLAG_NAMES[key]} {value} differs from this grid's "
                f"{getattr(saved, key)} (recall.json); drop the flag or use a new --out-dir"
            )


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)

"""Reading finished run folders and aggregating them over seeds.

A run folder follows the trainer's contract: ``summary.json`` (final numbers) and
``metrics.jsonl`` (train and eval records). Everything `archlab compare` reports comes from
those two files, so the report can always be checked against the runs.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Numbers reported per architecture (mean and spread over seeds).
METRICS = (
    "total_params",
    "active_params",
    "steps",
    "tokens_seen",
    "train_time_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "model_mem_bytes",
    "final_val_loss",
    "bits_per_byte",
    "gap_to_floor",
    "nan_count",
    "roughness",
    "mfu",
    "flops_per_token",
    "train_flops",
)


@dataclass
class Curve:
    """One run's loss curve: parallel lists, one entry per logged record."""

    steps: list[int] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    elapsed_s: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    """One architecture trained with one seed."""

    architecture: str
    seed: int
    run_dir: str
    learning_rate: float | None = None  # the peak rate this run trained at
    status: str = "failed"  # "ok" | "failed"
    error: str | None = None
    returncode: int | None = None
    total_params: int | None = None
    active_params: int | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    train_time_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: float | None = None  # CPU: peak RSS of the process; CUDA: max allocated
    mem_before_model_bytes: float | None = None  # the same measure just before the model
    model_mem_bytes: float | None = None  # peak minus that: the model's own share
    memory_kind: str | None = None  # "cpu_peak_rss" | "cuda_max_allocated" | ...
    final_val_loss: float | None = None
    bits_per_byte: float | None = None  # final val loss in bits per byte of text
    learned: bool | None = None  # final val loss below the unigram baseline (None: unknown)
    last_eval_val_loss: float | None = None  # from metrics.jsonl, for cross-checking
    entropy_floor: float | None = None
    gap_to_floor: float | None = None
    nan_count: int | None = None
    roughness: float | None = None
    mfu: float | None = None
    peak_flops: float | None = None  # the MFU's denominator (train/peak.py) and its source
    peak_flops_source: str | None = None
    peak_flops_how: str | None = None
    flops_per_token: float | None = None  # training (fwd + bwd) FLOPs per token, train/flops.py
    train_flops: float | None = None  # flops_per_token x tokens_seen: the run's compute
    resumed_from: str | None = None  # the checkpoint a resumed run continued from
    val_curve: Curve = field(default_factory=Curve)
    train_curve: Curve = field(default_factory=Curve)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not curves:
            d.pop("val_curve")
            d.pop("train_curve")
        return d


@dataclass
class Stat:
    """Mean and sample standard deviation over the seeds that finished."""

    mean: float | None
    std: float | None
    n: int
    values: list[float]

    ci95: float | None = None  # half-width of the 95% confidence interval (n >= 2)

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        from .stats import ci95_halfwidth

        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            return cls(None, None, 0, [])
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return cls(statistics.fmean(vals), std, len(vals), vals, ci95_halfwidth(vals))


@dataclass(eq=False)  # identity: a best point sits inside its own grid
class ArchResult:
    """All seeds of one architecture at one learning rate (a point of the grid).

    After a sweep, the row of an architecture is its best point; ``grid`` then holds every
    point of that architecture (the best included) and ``at_edge`` says whether the best
    rate is the lowest or highest of the grid.
    """

    architecture: str
    runs: list[RunResult]
    stats: dict[str, Stat] = field(default_factory=dict)
    learning_rate: float | None = None
    grid: list[ArchResult] = field(default_factory=list)
    at_edge: bool = False
    every_rate_failed: bool = False  # a sweep where a seed failed at every rate

    @property
    def ok_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.ok]

    @property
    def status(self) -> str:
        n_ok = len(self.ok_runs)
        if n_ok == len(self.runs):
            return "ok"
        return "failed" if n_ok == 0 else "partial"

    @property
    def errors(self) -> list[str]:
        return [f"seed {r.seed}: {r.error}" for r in self.runs if not r.ok]

    @property
    def learned(self) -> bool | None:
        """False when a finished seed did not go below the unigram baseline; None when
        nothing finished or there is no baseline to check against."""
        checks = [r.learned for r in self.ok_runs]
        if not checks or all(c is None for c in checks):
            return None
        return all(c is not False for c in checks)

    @property
    def not_learned_seeds(self) -> list[int]:
        return [r.seed for r in self.ok_runs if r.learned is False]

    def mean(self, metric: str) -> float | None:
        stat = self.stats.get(metric)
        return None if stat is None else stat.mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "learning_rate": self.learning_rate,
            "status": self.status,
            "learned": self.learned,
            "seeds": [r.seed for r in self.runs],
            "ok_seeds": [r.seed for r in self.ok_runs],
            "errors": self.errors,
            "run_dirs": [r.run_dir for r in self.runs],
            "stats": {k: asdict(v) for k, v in self.stats.items()},
            "best_at_edge_of_grid": self.at_edge,
            "every_rate_had_a_failed_seed": self.every_rate_failed,
        }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn last line (killed run) is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves_from_metrics(records: list[dict[str, Any]]) -> tuple[Curve, Curve]:
    """(validation curve from eval records, training curve from train records)."""
    val, train = Curve(), Curve()
    for rec in records:
        kind = rec.get("kind")
        if kind == "eval" and rec.get("val_loss") is not None:
            curve, loss = val, rec["val_loss"]
        elif kind == "train" and rec.get("loss") is not None:
            curve, loss = train, rec["loss"]
        else:
            continue
        if not math.isfinite(float(loss)):
            continue
        curve.steps.append(int(rec.get("step", 0)))
        curve.tokens.append(float(rec.get("tokens", 0)))
        curve.elapsed_s.append(float(rec.get("elapsed_s", 0.0)))
        curve.loss.append(float(loss))
    return val, train


def roughness(train: Curve) -> float | None:
    """Std of the step-to-step change of the training loss over the second half of the run.

    A smooth, stable run has small changes between logged steps; spikes and oscillations
    make it large. None with fewer than four logged points in that half.
    """
    half = train.loss[len(train.loss) // 2 :]
    if len(half) < 4:
        return None
    diffs = [b - a for a, b in zip(half, half[1:], strict=False)]
    return statistics.pstdev(diffs)


def read_run(
    run_dir: Path,
    architecture: str,
    seed: int,
    returncode: int | None = None,
    stderr_tail: str | None = None,
    entropy_floor: float | None = None,
) -> RunResult:
    """Collect one run folder into a RunResult; a missing summary makes it a failure."""
    run_dir = Path(run_dir)
    res = RunResult(architecture=architecture, seed=seed, run_dir=str(run_dir))
    res.returncode = returncode
    summary = _read_json(run_dir / "summary.json")
    records = read_metrics(run_dir)
    res.val_curve, res.train_curve = curves_from_metrics(records)
    res.roughness = roughness(res.train_curve)
    if res.val_curve.loss:
        res.last_eval_val_loss = res.val_curve.loss[-1]
    if summary is not None:
        for key in (
            "total_params",
            "active_params",
            "steps",
            "tokens_seen",
            "train_time_s",
            "tokens_per_s",
            "peak_mem_bytes",
            "mem_before_model_bytes",
            "model_mem_bytes",
            "final_val_loss",
            "nan_count",
            "mfu",
            "peak_flops",
            "flops_per_token",
        ):
            setattr(res, key, _number(summary.get(key)))
        if res.flops_per_token is not None and res.tokens_seen is not None:
            res.train_flops = float(res.flops_per_token) * float(res.tokens_seen)
        res.memory_kind = summary.get("memory_kind")
        res.peak_flops_source = summary.get("peak_flops_source")
        res.peak_flops_how = summary.get("peak_flops_how")
        lr = (summary.get("train_config") or {}).get("learning_rate")
        if isinstance(lr, (int, float)):
            res.learning_rate = float(lr)
        res.entropy_floor = summary.get("entropy_floor", entropy_floor)
        res.resumed_from = summary.get("resumed_from")
        res.status = summary.get("status", "failed")
        res.error = summary.get("error")
    if res.entropy_floor is None:
        res.entropy_floor = entropy_floor
    if res.final_val_loss is not None and not math.isfinite(res.final_val_loss):
        res.status = "failed"
        res.error = res.error or f"final validation loss is {res.final_val_loss}"
    if returncode not in (None, 0) and res.status == "ok":
        res.status = "failed"
    if summary is None:
        res.status = "failed"
    if res.status != "ok" and not res.error:
        res.error = _failure_line(returncode, stderr_tail, summary is None)
    if res.ok and res.final_val_loss is not None and res.entropy_floor is not None:
        res.gap_to_floor = res.final_val_loss - res.entropy_floor
    return res


def _number(value: Any) -> Any:
    """The trainer writes non-finite floats as strings ("nan", "inf"): read them back."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return value


def _failure_line(returncode: int | None, stderr_tail: str | None, no_summary: bool) -> str:
    if returncode is not None and returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    if stderr_tail:
        return stderr_tail
    if returncode not in (None, 0):
        return f"exit code {returncode}"
    return "no summary.json written" if no_summary else "failed"


def aggregate(
    runs: list[RunResult], order: list[str], learning_rates: list[float] | None = None
) -> list[ArchResult]:
    """Group runs by architecture (in ``order``) with mean and std over the ok seeds.

    With ``learning_rates`` (a sweep) there is one point per (architecture, rate), in
    ``order`` then rate order, each run matched by its ``learning_rate``.
    """
    out: list[ArchResult] = []
    for arch in order:
        for lr in learning_rates or [None]:
            mine = [
                r for r in runs if r.architecture == arch and (lr is None or r.learning_rate == lr)
            ]
            ok = [r for r in mine if r.ok]
            stats = {m: Stat.of([getattr(r, m) for r in ok]) for m in METRICS}
            # a failed seed's NaN/skipped steps count: the row must not read "0" for it
            stats["nan_count"] = Stat.of([r.nan_count for r in mine])
            rate = lr if lr is not None else (mine[0].learning_rate if mine else None)
            out.append(ArchResult(architecture=arch, runs=mine, stats=stats, learning_rate=rate))
    return out


def best_points(points: list[ArchResult], order: list[str]) -> list[ArchResult]:
    """Each architecture at its best learning rate: the lowest mean final validation loss
    among its points where no seed failed (a point that learned beats one that did not);
    only when a seed failed at every rate, among the points with a finished seed
    (``every_rate_failed`` then says so).

    The returned row carries ``grid`` (all of the architecture's points, rate order) and
    ``at_edge`` (the best rate is the lowest or highest of a grid of two or more rates).
    """
    out: list[ArchResult] = []
    for arch in order:
        mine = sorted(
            (p for p in points if p.architecture == arch),
            key=lambda p: p.learning_rate if p.learning_rate is not None else 0.0,
        )
        if not mine:
            continue
        scored = [p for p in mine if p.mean("final_val_loss") is not None]
        whole = [p for p in scored if p.status == "ok"]  # a rate where a seed failed: never
        every_failed = bool(scored) and not whole and len(mine) > 1
        scored = whole or scored
        if scored:
            best = min(scored, key=lambda p: (p.learned is False, p.mean("final_val_loss")))
        else:
            best = mine[len(mine) // 2]
        best.grid = mine
        best.every_rate_failed = every_failed
        best.at_edge = bool(scored) and len(mine) >= 2 and (best is mine[0] or best is mine[-1])
        out.append(best)
    return out

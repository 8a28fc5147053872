"""The study's runs: one `archlab train` process per (architecture, rung, seed), via compare.

Every run is a compare ``RunSpec`` whose command is compare's ``child_command`` for a
one-architecture protocol (the rung's token budget and learning rate) plus the rung's shape
flags, trained by compare's ``train_one`` (own process, live progress, signals forwarded,
continued from its checkpoint on --resume) and read back by compare's ``collect_run``. The
order is rung-major, smallest first and seeds inside, so an interrupted study has whole small
rungs and the ETA is learnt from cheap runs first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ...progress import Progress, eta_seconds, format_duration
from ..compare.plan import RunSpec, run_finished
from ..compare.runner import CompareProgress
from ..compare.settings import CompareSettings, settings_from_flags
from .estimate import GridEstimate
from .ladder import Rung, shape_flags
from .settings import ScaleSettings


@dataclass
class LadderRun:
    """One process of the study: a rung, a seed, its compare protocol and RunSpec."""

    rung: Rung
    seed: int
    protocol: CompareSettings
    spec: RunSpec

    @property
    def name(self) -> str:
        return self.spec.name


def rung_protocol(s: ScaleSettings, rung: Rung) -> CompareSettings:
    """compare's protocol for one rung: its budget and rate, everything else the study's."""
    protocol = settings_from_flags(
        {
            "architectures": [rung.architecture],
            "max_tokens": rung.tokens,
            "seq_len": s.seq_len,
            "batch_size": s.batch_size,
            "learning_rate": rung.learning_rate,
            "eval_steps": s.eval_steps,
            "use_amp": s.use_amp,
            "device": s.device,
            "num_threads": s.num_threads,
            "recipe": s.recipe,
        }
    )
    protocol.data = s.data
    return protocol


def plan_ladder(s: ScaleSettings, rungs: list[Rung], out_dir: Path) -> list[LadderRun]:
    """Every (depth, architecture, seed), smallest rung first."""
    runs = []
    for depth in s.depths:
        for rung in (r for r in rungs if r.depth == depth):
            protocol = rung_protocol(s, rung)
            for seed in s.seed_list:
                run_dir = out_dir / f"{rung.name}-seed{seed}"
                spec = RunSpec(
                    rung.architecture,
                    seed,
                    run_dir,
                    learning_rate=rung.learning_rate,
                    extra_args=shape_flags(rung.shape),
                )
                runs.append(LadderRun(rung, seed, protocol, spec))
    return runs


class LadderProgress(CompareProgress):
    """compare's progress lines and bars, with an ETA across the grid: each run weighs its
    pre-run estimate (estimate.py; without one, its FLOPs). Before any run has finished in
    this process the ETA is the estimate of what is left ("?" without one); then the time
    the finished work took per unit of weight, times the weight left. In a terminal the
    overall bar counts runs and shows that ETA."""

    label = "scale"

    def __init__(
        self,
        stream: TextIO,
        runs: list[LadderRun],
        finished: set[str],
        mode: str | None = None,
        every_s: float | None = None,
        seconds: dict[str, float] | None = None,
    ) -> None:
        super().__init__(stream, 0, 0, mode=mode, every_s=every_s)  # no step-based overall bar
        self.n_runs = len(runs)
        self.runs_done = sum(r.name in finished for r in runs)
        self.estimated = seconds is not None
        self.weight = {
            r.name: (seconds[r.name] if seconds is not None else r.rung.train_flops) for r in runs
        }
        self.weight_left = sum(w for name, w in self.weight.items() if name not in finished)
        self.weight_session = 0.0  # weight of the runs finished by this process
        self.run: LadderRun | None = None
        if self.mode == "bar" and self.n_runs:
            self.overall = Progress(
                self.n_runs, "scale", "run", mode="bar", stream=stream,
                initial=self.runs_done, position=0,
            )  # fmt: skip
            self.overall.set_postfix(self._bar_text())

    def start(self, run: LadderRun) -> None:
        """The next run: its steps size the current bar; its weight the ETA."""
        self.run = run
        self.steps_per_run = run.rung.steps

    def _current_weight(self) -> float:
        if self.run is None or not self.run.rung.steps:
            return 0.0
        done = self.run_step - (self.run_first or 0)
        return self.weight[self.run.name] * done / self.run.rung.steps

    def eta(self) -> float | None:
        done = self.weight_session + self._current_weight()
        left = max(self.weight_left - done, 0.0)
        if self.weight_session <= 0:  # nothing finished here yet: cold start-ups would mislead
            return left if self.estimated else None
        return eta_seconds(done, left, time.monotonic() - self.t0)

    def _bar_text(self) -> str:
        return f"{self._runs_text()}, eta {format_duration(self.eta())}"

    def status(self, prefix: str, line: str) -> None:
        overall, self.overall = self.overall, None  # compare's bar counts steps, this one runs
        try:
            super().status(prefix, line)
        finally:
            self.overall = overall
        if overall is not None:
            overall.set(self.runs_done, postfix=self._bar_text())

    def end_run(self) -> None:
        if self.run is not None:
            self.weight_session += self.weight[self.run.name]
        overall, self.overall = self.overall, None
        try:
            super().end_run()
        finally:
            self.overall = overall
        if self.overall is not None:
            self.overall.set(self.runs_done, postfix=self._bar_text())
        self.run = None


def train_ladder(
    s: ScaleSettings,
    runs: list[LadderRun],
    out_dir: Path,
    resume: bool,
    stream: TextIO,
    say: Callable[[str], None] | None,
    quiet: bool,
    estimate: GridEstimate | None = None,
) -> dict[str, tuple[int | None, str | None]]:
    """Train every run not finished yet (compare's train_one); run name -> (rc, stderr tail)."""
    from ..compare import loop as compare

    finished = {r.name for r in runs if resume and run_finished(r.spec.run_dir)}
    seconds = estimate.seconds if estimate is not None else None
    progress = LadderProgress(stream, runs, finished, "off" if quiet else None, seconds=seconds)
    say = say or progress.message
    total = sum(r.rung.train_flops for r in runs)
    left = sum(r.rung.train_flops for r in runs if r.name not in finished)
    say(
        f"archlab scale: {len(s.architectures)} architectures x {len(s.depths)} depths x "
        f"{s.seeds} seed(s) = {len(runs)} runs, {total:.3g} training FLOPs"
        + (f" ({left:.3g} left)" if finished else "")
        + f", {s.tokens_per_param:g} tokens per parameter, data {s.data} -> {out_dir}"
    )
    if estimate is not None:
        say(estimate.line(finished))
    codes: dict[str, tuple[int | None, str | None]] = {}
    try:
        for i, run in enumerate(runs, start=1):
            prefix = f"[{i}/{len(runs)} {run.name}]"
            if run.name in finished:
                say(f"{prefix} already finished; skipped")
                continue
            progress.start(run)
            codes[run.name] = compare.train_one(
                run.protocol, run.spec, out_dir / "logs", progress, prefix, say, resume
            )
    finally:
        progress.close()
    return codes

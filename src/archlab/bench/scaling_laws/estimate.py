"""Before the first run: what the whole grid will cost in wall time, rung by rung.

Each rung's model is built here and one training step (forward + backward + AdamW step on a
batch of random tokens at the study's batch size, context and thread count) is timed warm,
after one cold step (train/estimate.py's method, plus the optimizer). A run then costs

    START_S + steps x step_s + evaluations x eval_steps x step_s / 3

(an evaluation batch is a forward pass: about a third of a training step). START_S is the
fixed cost of one `archlab train` process (interpreter and torch import, data, model build,
the child's own warm-up, final checkpoint and summary), measured on this project's machine
(README, "Scaling laws"). The grid's estimate is the sum over its runs; the progress line's
ETA starts from it and is rescaled by the time the finished runs actually took.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from ...progress import format_duration
from .ladder import Rung, rung_config
from .settings import ScaleSettings

# seconds per `archlab train` process beyond its training steps: 4.8-13.8 CPU-s measured for
# the seven architectures' smallest rungs (Gated DeltaNet and Mamba-2 load numba kernels) by
# benchmarks/bench_scale_budget.py, one thread; 8 is about their mean
START_S = 8.0
WARM_STEPS = 3  # timed steps after the cold one; the median is kept


@dataclass
class GridEstimate:
    """Seconds per run (by name) and how they were obtained."""

    seconds: dict[str, float] = field(default_factory=dict)
    step_s: dict[str, float] = field(default_factory=dict)  # per rung name
    threads: int = 1
    device: str = "cpu"
    timing_s: float = 0.0  # what timing the rungs took here

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def left(self, finished: set[str]) -> float:
        return sum(v for k, v in self.seconds.items() if k not in finished)

    def line(self, finished: set[str] | None = None) -> str:
        finished = finished or set()
        n_left = sum(k not in finished for k in self.seconds)
        return (
            f"estimate: {format_duration(self.left(finished))} for {n_left} run(s) on "
            f"{self.device}, {self.threads} thread(s) per run (each rung's training step "
            f"timed here on a warm pass, + {START_S:g} s start-up per run); an estimate, "
            "not a measurement"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "total_s": self.total,
            "seconds_per_run": self.seconds,
            "seconds_per_step": self.step_s,
            "threads": self.threads,
            "device": self.device,
            "start_s_per_run": START_S,
        }


def time_step(
    s: ScaleSettings, rung: Rung, vocab_size: int, device: str, clock: Any = time.perf_counter
) -> float:
    """Median seconds of a warm training step of this rung's model (random tokens), by
    ``clock`` (wall; benchmarks/bench_scale_budget.py passes the thread's CPU clock)."""
    import torch

    from ...models import build_model
    from ...train.optim import build_optimizer

    cfg = rung_config(s, rung.architecture, rung.depth, vocab_size)
    model = build_model(cfg, device=device)
    opt = build_optimizer(model, rung.learning_rate, 0.1, device_type=torch.device(device).type)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (s.batch_size, s.seq_len + 1), generator=gen).to(device)
    times = []
    for _ in range(1 + WARM_STEPS):
        t0 = clock()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times[1:])


def estimate_grid(
    s: ScaleSettings, rungs: list[Rung], runs: list, vocab_size: int
) -> GridEstimate:  # runs: plan.LadderRun
    """Time every rung once (at the study's threads), then price every run."""
    import torch

    from ...train.device import pick_device

    device = str(pick_device(s.device))
    before = torch.get_num_threads()
    threads = s.num_threads or before
    t0 = time.perf_counter()
    est = GridEstimate(threads=threads, device=device)
    try:
        torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            for rung in rungs:
                est.step_s[rung.name] = time_step(s, rung, vocab_size, device)
    finally:
        torch.set_num_threads(before)
    est.timing_s = time.perf_counter() - t0
    for run in runs:
        step_s = est.step_s[run.rung.name]
        interval = max(1, run.protocol.eval_interval)
        evals = run.rung.steps // interval + 1
        est.seconds[run.name] = (
            START_S + run.rung.steps * step_s + evals * s.eval_steps * step_s / 3
        )
    return est

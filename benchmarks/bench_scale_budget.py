"""What the default `archlab scale` ladder costs: per-rung CPU seconds, summed, on one thread.

Why CPU seconds: the budget (about 30 minutes on 2 CPU cores) must be checked on a machine
that other jobs share; a one-thread process's CPU time is what it would take on an idle core,
however busy the machine. Each rung's training step is timed on the thread's CPU clock
(scaling_laws/estimate.py's ``time_step``: one cold step, the median of three warm ones) and a
run is priced as `archlab scale`'s pre-run estimate prices it (steps, evaluations, start-up).
The start-up is measured here too: the CPU time of a one-step `archlab train` process (its
interpreter, torch import, data, build, warm-up, final evaluation and checkpoint).

    python benchmarks/bench_scale_budget.py                      # the default ladder
    python benchmarks/bench_scale_budget.py --depths 1,2,3,4 --tokens-per-param 10

Prints one row per rung and the total; a second core is not counted (runs are sequential and
these models gain little from a second thread), so the total bounds the 2-core wall time.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def startup_cpu_s(data: Path, arch: str, shape_flags: list[str]) -> float:
    """CPU seconds (user + system) of a one-step, 1-thread `archlab train` of this
    architecture's smallest rung (its kernels loaded as a real run loads them)."""
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [sys.executable, "-m", "archlab", "train", "--architecture", arch, "--model-size",
             "nano", "--data", str(data), "--seq-len", "128", "--batch-size", "16",
             "--max-tokens", "2048", "--eval-steps", "4", "--num-threads", "1", "--out-dir",
             out, "--quiet", *shape_flags],
            check=True, capture_output=True,
        )  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    import torch

    from archlab.bench.scaling_laws import estimate, ladder, plan
    from archlab.bench.scaling_laws import settings as st
    from archlab.data.prepare import prepare_dataset
    from archlab.models import registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default=None)
    ap.add_argument("--tokens-per-param", type=float, default=None)
    ap.add_argument("--architectures", default=",".join(registry.SPECS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    raw = {"architectures": args.architectures.split(","), "num_threads": 1}
    if args.depths:
        raw["depths"] = [int(d) for d in args.depths.split(",")]
    if args.tokens_per_param:
        raw["tokens_per_param"] = args.tokens_per_param
    s = st.settings_from_flags(raw)
    data = Path(prepare_dataset("stories", tokenizer="bpe", vocab_size=st.DEFAULT_VOCAB,
                                verbose=False)).resolve()  # fmt: skip
    s.data = str(data)
    vocab = 1024
    rungs = ladder.build_ladder(s, vocab)
    runs = plan.plan_ladder(s, rungs, Path("unused"))
    first = min(s.depths)
    start = {
        a: startup_cpu_s(data, a, ladder.shape_flags(ladder.arch_shape(a, first, s, vocab)))
        for a in s.architectures
    }
    shown = ", ".join(f"{a} {v:.1f}" for a, v in start.items())
    print(f"start-up, CPU-s per `archlab train` process (1 thread, one step): {shown}")
    print(f"| {'rung':14s} | {'steps':>6s} | {'train FLOPs':>11s} | {'CPU ms/step':>11s} | "
          f"{'run CPU-s':>9s} |")  # fmt: skip
    total = 0.0
    for run in runs:
        r = run.rung
        step = estimate.time_step(s, r, vocab, "cpu", clock=time.thread_time)
        evals = r.steps // max(1, run.protocol.eval_interval) + 1
        secs = start[r.architecture] + r.steps * step + evals * s.eval_steps * step / 3
        total += secs
        print(f"| {r.name:14s} | {r.steps:6,d} | {r.train_flops:11.3g} | {1e3 * step:11.1f} | "
              f"{secs:9.0f} |")  # fmt: skip
    flops = sum(r.rung.train_flops for r in runs)
    print(
        f"total: {len(runs)} runs, {flops:.3g} training FLOPs, {total:.0f} CPU-s = "
        f"{total / 60:.1f} min on one idle core (an estimate from timed steps)"
    )


if __name__ == "__main__":
    main()

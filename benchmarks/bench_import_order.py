"""Benchmark: the fused kernels' speed must not depend on whether torch was imported first.

Each point is a fresh process that imports in one order, ``import archlab`` then torch
("archlab first") or ``import torch`` then archlab ("torch first"), builds a nano model and
times training steps (forward + cross-entropy + backward + AdamW) at batch 8. A third column,
"torch first, before", reproduces how torch-first ran before archlab set libgomp's spin count
in place (libgomp's default spin, restated with GOMP_SPINCOUNT=300000). The conditions
alternate round by round so that a busy spell of a shared machine hits all; the table gives
the median microseconds per token and the ratios to archlab-first.

    python benchmarks/bench_import_order.py                    # mamba, hypermixer, hybrid, dense
    python benchmarks/bench_import_order.py --models mamba --rounds 9 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
# (label, import order, environment). "before" is how torch-first ran before archlab set
# libgomp's spin count in place: libgomp's default, which GOMP_SPINCOUNT=300000 restates.
CONDITIONS = (
    ("archlab first", "archlab-first", {}),
    ("torch first", "torch-first", {}),
    ("torch first, before", "torch-first", {"GOMP_SPINCOUNT": "300000"}),
)


def worker(order: str, arch: str, seq_len: int, steps: int, threads: int) -> float:
    """Median seconds per token of ``steps`` training steps, imports in ``order``."""
    if order == "torch-first":
        import torch

        import archlab
    else:
        # isort: off
        import archlab
        import torch

        # isort: on
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = archlab.build_model(archlab.preset_config(arch, "nano", vocab_size=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (8, seq_len + 1))

    def step() -> None:
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile / warm up
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (8 * seq_len)


def run_point(order: str, extra: dict[str, str], arch: str, args: argparse.Namespace) -> float:
    code = (
        f"import sys; sys.path.insert(0, {SRC!r}); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from bench_import_order import worker; "
        f"print(worker({order!r}, {arch!r}, {args.seq_len}, {args.steps}, {args.threads}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env |= extra
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{order} {arch} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mamba,hypermixer,hybrid,dense")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the raw points here")
    args = p.parse_args(argv)
    models = args.models.split(",")
    labels = [c[0] for c in CONDITIONS]
    raw: dict[str, dict[str, list[float]]] = {m: {c: [] for c in labels} for m in models}
    for r in range(args.rounds):
        for m in models:
            for label, order, extra in CONDITIONS if r % 2 == 0 else CONDITIONS[::-1]:
                raw[m][label].append(run_point(order, extra, m, args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"\nnano, batch 8, T={args.seq_len}, {args.threads} threads, {args.rounds} rounds "
          f"x {args.steps} steps, training step (fwd + bwd + AdamW), us/token, medians "
          "(ratios: to archlab first)")  # fmt: skip
    print("| model | " + " | ".join(labels) + " | torch first | before |")
    print("|---|" + "---:|" * (len(labels) + 2))
    for m in models:
        med = [statistics.median(raw[m][c]) * 1e6 for c in labels]
        cells = " | ".join(f"{v:.2f}" for v in med)
        print(f"| {m} | {cells} | {med[1] / med[0]:.2f}x | {med[2] / med[0]:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: training-step speed and memory of every architecture against reference models.

One training step (forward + cross-entropy + backward + AdamW's update; ``--optimizer none``
leaves the update out) of each model at d_model 128, batch 8,
for several sequence lengths, beside the Hugging Face ``transformers`` reference models built at
the same shapes from a config (random init, nothing downloaded):

    ours:       dense, hypermixer, mamba, moe, hybrid, mamba2, gdn   (the ``nano`` preset shape of each
                architecture: layer counts differ so that parameter counts match)
    mamba-chunked / hypermixer-chunked: ours with the torch chunked scan / mixer instead of the
                fused numba kernels (ARCHLAB_SCAN=chunked, ARCHLAB_HYPERMIX=chunked; for
                Mamba that is also the op-by-op mixer graph instead of the fused CPU node)
    mamba-seq:  our Mamba with the sequential reference scan instead of the fused one
    hf-mamba:   MambaForCausalLM, same layers/state/conv/expand as our mamba (on CPU it runs its
                slow sequential path; the CUDA kernels are not installed)
    hf-mamba2:  Mamba2ForCausalLM, same shape as our mamba2 (its torch chunked path on CPU)
    hf-mixtral: MixtralForCausalLM, same layers/heads/experts/top-k/expert width as our moe
    hf-gpt2:    GPT2LMHeadModel, same layers/heads/MLP width as our dense (learned positions)
    hf-llama:   LlamaForCausalLM (SwiGLU, RoPE), same layers/heads, MLP width 4 d (opt-in)
    Mixtral's experts and Llama's MLP are SwiGLU (three matrices) where ours are GELU MLPs (two):
    at equal widths (the default) they hold 1.5x the feed-forward parameters and FLOPs;
    ``--swiglu-width params`` gives them 2/3 of the width instead, matching parameters.
    scan, scan-chunked, scan-seq: the selective scan alone (fused numba kernel, chunked torch
                scan, sequential reference) at d_inner = 2 d, N = 16, with D, z and softplus
    scan-mambapy: mamba.py's parallel-scan selective_scan (``pip install mambapy``), same shapes
    scan-hf:    transformers' MambaMixer layer (its CPU slow path: scan plus projections)
    mix, mix-chunked: HyperMixing's causal mixer alone (fused kernel vs chunked torch) at the
                nano shapes (d' = 64, d = d_model)

Method: every (model, length) point runs in a fresh subprocess, so that its memory is its own
and one model's allocations cannot slow the next. Peak memory is measured over the
``--warmup`` steps (at least one), which start from a clean state: the growth of the process's
resident set above the resident set just before the first step (model and inputs built), i.e.
activations, gradients and workspace of one training step. The kernel's high-water mark is reset
through ``/proc/self/clear_refs`` and read from ``VmHWM`` (Linux); where that reset is not
allowed it falls back to ``ru_maxrss``, an upper bound that can include setup. Then it times
``--repeats`` steps with a wall clock and reports the median. torch's thread count is set
explicitly (``--threads``) and printed.

    python benchmarks/bench_layers.py                            # default grid, a few minutes
    python benchmarks/bench_layers.py --seq-lens 128,512 --models mamba,mamba-seq,hf-mamba
    python benchmarks/bench_layers.py --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OURS = ("dense", "hypermixer", "mamba", "moe", "hybrid", "mamba2", "gdn")
EXTRA = (
    "mamba-chunked", "hypermixer-chunked", "mamba-seq", "hf-mamba", "hf-mamba2", "hf-mixtral", "hf-gpt2",
    "hf-llama", "scan", "scan-chunked", "scan-seq", "scan-mambapy", "scan-hf", "mix",
    "mix-chunked",
)  # fmt: skip
DEFAULT_MODELS = (
    "dense,hypermixer,mamba,moe,hybrid,mamba2,gdn,mamba-chunked,hypermixer-chunked,mamba-seq,scan,"
    "scan-chunked,scan-seq,scan-mambapy,scan-hf,mix,mix-chunked,hf-mamba,hf-mixtral,hf-gpt2"
)
# (ours, reference, what the ratio means)
COMPARISONS = (
    ("mamba", "mamba-chunked", "Mamba: fused scan vs chunked scan (whole model)"),
    ("hypermixer", "hypermixer-chunked", "HyperMixer: fused mixer vs chunked mixer (whole model)"),
    ("mamba", "mamba-seq", "Mamba: fused scan vs sequential scan (whole model)"),
    ("scan", "scan-chunked", "selective scan alone: fused vs chunked"),
    ("scan", "scan-seq", "selective scan alone: fused vs sequential"),
    ("scan", "scan-mambapy", "selective scan alone: fused vs mamba.py parallel scan"),
    ("scan", "scan-hf", "selective scan alone vs transformers MambaMixer layer (slow path)"),
    ("mix", "mix-chunked", "HyperMixing mixer alone: fused vs chunked"),
    ("mamba", "hf-mamba", "Mamba: ours vs transformers MambaForCausalLM"),
    ("mamba2", "hf-mamba2", "Mamba-2: ours vs transformers Mamba2ForCausalLM"),
    ("moe", "hf-mixtral", "MoE: ours vs transformers MixtralForCausalLM"),
    ("dense", "hf-gpt2", "dense: ours vs transformers GPT2LMHeadModel"),
    ("dense", "hf-llama", "dense: ours vs transformers LlamaForCausalLM"),
)


# ---- worker: one (model, length) point in its own process --------------------------------
def _ours_config(arch: str, T: int, args: argparse.Namespace):
    from archlab import preset_config

    kw = dict(vocab_size=args.vocab_size, max_seq_len=T, d_model=args.d_model)
    nano = preset_config(arch, "nano")  # the preset's MLP ratio (4 d; gdn's 3 d)
    kw["d_ff"] = nano.d_ff * args.d_model // nano.d_model
    if args.n_layers:
        kw["n_layers"] = args.n_layers
    return preset_config(arch, "nano", **kw)


def _swiglu(width: int, args: argparse.Namespace) -> int:
    """Width of a SwiGLU MLP standing in for a GELU MLP of ``width``."""
    return width if args.swiglu_width == "equal" else round(2 * width / 3)


def _hf_model(name: str, T: int, args: argparse.Namespace):
    """A transformers reference model at the shapes of the matching architecture of ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers as tf

    V, d = args.vocab_size, args.d_model
    if name == "hf-mamba":
        cfg = _ours_config("mamba", T, args)
        hf = tf.MambaConfig(
            vocab_size=V, hidden_size=d, state_size=cfg.state_size,
            num_hidden_layers=cfg.n_layers, expand=cfg.expand, conv_kernel=cfg.conv_size,
            time_step_rank=cfg.resolved_dt_rank, use_bias=False, use_conv_bias=True,
            tie_word_embeddings=True, use_cache=False,
        )  # fmt: skip
        return tf.MambaForCausalLM(hf)
    if name == "hf-mamba2":
        from archlab.export.hf_forms import _mamba2_config

        cfg = _ours_config("mamba2", T, args)
        common = dict(vocab_size=V, tie_word_embeddings=True, use_cache=False)
        return tf.Mamba2ForCausalLM(_mamba2_config(cfg, common))
    if name == "hf-mixtral":
        cfg = _ours_config("moe", T, args)
        hf = tf.MixtralConfig(
            vocab_size=V, hidden_size=d, intermediate_size=_swiglu(cfg.resolved_expert_d_ff, args),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, max_position_embeddings=T,
            tie_word_embeddings=True, use_cache=False,
        )  # fmt: skip
        return tf.MixtralForCausalLM(hf)
    cfg = _ours_config("dense", T, args)
    if name == "hf-gpt2":
        hf = tf.GPT2Config(
            vocab_size=V, n_positions=T, n_embd=d, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(hf)
    if name == "hf-llama":
        hf = tf.LlamaConfig(
            vocab_size=V, hidden_size=d, intermediate_size=_swiglu(cfg.d_ff, args),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, max_position_embeddings=T,
            tie_word_embeddings=True, use_cache=False,
        )  # fmt: skip
        return tf.LlamaForCausalLM(hf)
    raise ValueError(name)


def _make_step(name: str, T: int, args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    """(one training step, number of parameters) for a model name."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    B, V = args.batch, args.vocab_size
    if name.endswith("-chunked"):  # this subprocess only: the torch implementations
        os.environ["ARCHLAB_SCAN"] = os.environ["ARCHLAB_HYPERMIX"] = "chunked"
    if name.startswith("scan"):
        return _scan_step(name, T, args, g), 0
    if name.startswith("mix"):
        from archlab.models.hypermixer import causal_hypermix

        M, D = 64, args.d_model
        inputs = [torch.randn(B, T, k, generator=g).requires_grad_() for k in (M, D, M)]

        def mix_step() -> None:
            for t in inputs:
                t.grad = None
            causal_hypermix(*inputs)[0].square().mean().backward()

        return mix_step, 0

    idx = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    if name.startswith("hf-"):
        model = _hf_model(name, T, args)

        def logits_of(inp):
            return model(input_ids=inp, use_cache=False).logits
    else:
        from archlab import build_model

        if name == "mamba-seq":
            import archlab.models.mamba as mamba_mod
            from archlab.models.scan import selective_scan_sequential

            def sequential(*a, chunk_size=None, **kw):
                return selective_scan_sequential(*a, **kw)

            mamba_mod.selective_scan = sequential  # this subprocess only
            os.environ["ARCHLAB_SCAN"] = "sequential"  # and not the fused CPU mixer node
        model = build_model(_ours_config(name.split("-")[0], T, args))
        logits_of = model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if args.optimizer == "adamw" else None

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = logits_of(x)
        F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1)).backward()
        if opt is not None:
            opt.step()

    return step, sum(p.numel() for p in model.parameters())


def _scan_step(name: str, T: int, args: argparse.Namespace, g) -> Callable[[], None]:
    """One forward + backward of a selective scan implementation alone (Mamba's shapes)."""
    import torch

    B, D, N = args.batch, 2 * args.d_model, 16
    if name == "scan-hf":
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import transformers as tf
        from transformers.models.mamba.modeling_mamba import MambaMixer as HFMixer

        cfg = _ours_config("mamba", T, args)
        hf = tf.MambaConfig(
            hidden_size=args.d_model, state_size=N, expand=2, conv_kernel=cfg.conv_size,
            time_step_rank=cfg.resolved_dt_rank, use_bias=False, use_conv_bias=True,
        )  # fmt: skip
        layer = HFMixer(hf, layer_idx=0)
        x = torch.randn(B, T, args.d_model, generator=g, requires_grad=True)

        def hf_step() -> None:
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()

        return hf_step
    u = torch.randn(B, T, D, generator=g)
    delta = torch.randn(B, T, D, generator=g) - 4.0  # before softplus: dt ~ 0.02
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)  # S4D-real
    Bm, Cm = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    Dp, z = torch.ones(D), torch.randn(B, T, D, generator=g)
    inputs = [u, delta, A, Bm, Cm, Dp, z]
    for t in inputs:
        t.requires_grad_(True)
    if name == "scan-mambapy":
        from mambapy.mamba import MambaBlock  # pip install mambapy

        def fn(u, delta, A, Bm, Cm, Dp, z):
            y = MambaBlock.selective_scan(
                None, u, torch.nn.functional.softplus(delta), A, Bm, Cm, Dp
            )
            return y * torch.nn.functional.silu(z)
    else:
        from archlab.models.scan import selective_scan

        impl = {"scan": "fused", "scan-chunked": "chunked", "scan-seq": "sequential"}[name]

        def fn(u, delta, A, Bm, Cm, Dp, z):
            return selective_scan(u, delta, A, Bm, Cm, Dp, z, delta_softplus=True, impl=impl)

    def scan_step() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).square().mean().backward()

    return scan_step


def worker(args: argparse.Namespace) -> dict:
    import archlab  # noqa: F401  (first: it sets OpenMP's spin count before torch loads)

    # isort: split
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T = args.seq_len
    step, params = _make_step(args.worker, T, args)
    # compile or load the numba kernels before the baseline: JIT memory and time are one-off
    from archlab.models import kernels

    if kernels.fused_available("scan"):
        from archlab.models.kernels import hypermix_cpu, scan_cpu

        scan_cpu.warm_up(torch.float32)
        hypermix_cpu.warm_up(torch.float32)
    if kernels.fused_available("mamba_inner"):
        from archlab.models.kernels.mamba_cpu import warm_up_inner

        warm_up_inner(torch.float32)
    if kernels.fused_available("ssd"):  # Mamba-2 and Gated DeltaNet's kernels
        from archlab.models.kernels import conv_cpu, delta_cpu, gated_norm_cpu, ssd_cpu

        for mod in (conv_cpu, delta_cpu, gated_norm_cpu, ssd_cpu):
            mod.warm_up(torch.float32)
    # memory: the first step(s) from a clean state (later steps reuse what the allocator kept)
    from archlab.train.metrics import cpu_peak_bytes, current_memory_bytes, reset_cpu_peak

    rss0 = (current_memory_bytes(torch.device("cpu")) or 0) // 1024
    reset_ok = reset_cpu_peak()
    for _ in range(max(1, args.warmup)):
        step()
    peak = cpu_peak_bytes() // 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(
        model=args.worker, seq_len=T, batch=args.batch, params=params,
        step_s=statistics.median(times), min_s=min(times), times_s=times,
        us_per_token=statistics.median(times) / (args.batch * T) * 1e6,
        rss_before_mib=rss0 / 1024, peak_rss_mib=peak / 1024,
        peak_increase_mib=max(0, peak - rss0) / 1024,
        memory_method="VmHWM after clear_refs" if reset_ok else "ru_maxrss (upper bound)",
        threads=torch.get_num_threads(),
    )  # fmt: skip


# ---- parent: run the grid, print the tables ----------------------------------------------
def run_point(model: str, T: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", model, "--seq-len", str(T),
        "--batch", str(args.batch), "--d-model", str(args.d_model),
        "--vocab-size", str(args.vocab_size), "--n-layers", str(args.n_layers),
        "--threads", str(args.threads), "--warmup", str(args.warmup),
        "--repeats", str(args.repeats), "--swiglu-width", args.swiglu_width,
        "--optimizer", args.optimizer,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(model=model, seq_len=T, error=f"timeout > {args.timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(model=model, seq_len=T, error=tail[:160])
    return json.loads(lines[-1])


def _fmt_time(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "timeout" if r["error"].startswith("timeout") else "failed"
    return f"{r['step_s'] * 1e3:.0f} ms ({r['us_per_token']:.1f} µs/tok)"


def _fmt_mem(r: dict | None) -> str:
    if r is None or "error" in r:
        return "-"
    return f"{r['peak_increase_mib']:.0f} MiB"


def print_report(results: dict, models: list[str], lens: list[int], args) -> None:
    def get(m, T):
        return results.get((m, T))

    what = "forward + backward" + (" + AdamW" if args.optimizer == "adamw" else "")
    print(f"\n### Training step ({what}), batch {args.batch}, d_model {args.d_model}")
    print(
        f"threads {args.threads}, median of {args.repeats} after {args.warmup} warm-up, "
        f"median over {args.rounds} interleaved round(s)\n"
    )
    print("| model | params | " + " | ".join(f"T={T}" for T in lens) + " |")
    print("|---|---:|" + "---:|" * len(lens))
    for m in models:
        params = next((r["params"] for T in lens if (r := get(m, T)) and "params" in r), None)
        p = f"{params:,}" if params else "-"
        print(f"| {m} | {p} | " + " | ".join(_fmt_time(get(m, T)) for T in lens) + " |")
    if "dense" in models:
        print("\n### µs per token, and in brackets the multiple of dense at the same T\n")
        print("| model | " + " | ".join(f"T={T}" for T in lens) + " |")
        print("|---|" + "---:|" * len(lens))
        for m in models:
            cells = []
            for T in lens:
                r, d = get(m, T), get("dense", T)
                if r is None or "error" in r:
                    cells.append(_fmt_time(r))
                elif d is None or "error" in d:
                    cells.append(f"{r['us_per_token']:.1f}")
                else:
                    cells.append(f"{r['us_per_token']:.1f} ({r['step_s'] / d['step_s']:.2f}x)")
            print(f"| {m} | " + " | ".join(cells) + " |")
    if 512 in lens:
        print("\n### Per-token cost relative to T=512 (1.00 = linear in T)\n")
        print("| model | " + " | ".join(f"T={T}" for T in lens) + " |")
        print("|---|" + "---:|" * len(lens))
        for m in models:
            base = get(m, 512)
            cells = []
            for T in lens:
                r = get(m, T)
                ok = r and base and "error" not in r and "error" not in base
                cells.append(f"{r['us_per_token'] / base['us_per_token']:.2f}" if ok else "-")
            print(f"| {m} | " + " | ".join(cells) + " |")
    print("\n### Peak memory increase during a step (fresh process per point)\n")
    print("| model | " + " | ".join(f"T={T}" for T in lens) + " |")
    print("|---|" + "---:|" * len(lens))
    for m in models:
        print(f"| {m} | " + " | ".join(_fmt_mem(get(m, T)) for T in lens) + " |")
    print("\n### Ratios (reference time / our time; > 1 means ours is faster)\n")
    for ours, ref, label in COMPARISONS:
        if ours not in models or ref not in models:
            continue
        cells = []
        for T in lens:
            a, b = get(ours, T), get(ref, T)
            if a and b and "error" not in a and "error" not in b:
                cells.append(f"T={T}: {b['step_s'] / a['step_s']:.1f}x")
            elif a and b and "error" not in a:
                cells.append(f"T={T}: reference {_fmt_time(b)}")
        if cells:
            print(f"- {label}: " + ", ".join(cells))
    flat = [
        m for m in ("mamba", "mamba2", "gdn", "hypermixer", "hybrid", "dense", "moe") if m in models
    ]
    pairs = [(lo, hi) for lo in (512,) for hi in (max(lens),) if lo in lens and hi > lo]
    for lo, hi in pairs:
        cells = []
        for m in flat:
            a, b = get(m, lo), get(m, hi)
            if a and b and "error" not in a and "error" not in b:
                cells.append(f"{m} {b['us_per_token'] / a['us_per_token']:.2f}")
        if cells:
            print(f"- time per token, T={hi} relative to T={lo}: " + ", ".join(cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {OURS + EXTRA}")
    p.add_argument("--seq-lens", default="128,512,1024,4096")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=256, help="small: the layers dominate")
    p.add_argument("--n-layers", type=int, default=0, help="0: each architecture's nano preset")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds per point")
    p.add_argument(
        "--rounds", type=int, default=1,
        help="repeat the whole grid; each point reports the median over rounds (interleaved)",
    )  # fmt: skip
    p.add_argument("--swiglu-width", choices=("equal", "params"), default="equal")
    p.add_argument(
        "--optimizer", choices=("adamw", "none"), default="adamw",
        help="the whole models' step ends with AdamW's update (default) or without one",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write all results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in OURS + EXTRA]
    if unknown:
        p.error(f"--models: unknown {unknown} (allowed: {', '.join(OURS + EXTRA)})")
    lens = [int(t) for t in args.seq_lens.split(",")]
    import torch

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}")  # fmt: skip
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {}
    stopped: dict[str, str] = {}
    for rnd in range(args.rounds):  # rounds interleave every point: shared-machine load hits all
        for m in models:
            for T in lens:
                if m in stopped:  # a model that timed out or failed is not retried
                    results.setdefault((m, T), dict(model=m, seq_len=T, error=stopped[m]))
                    continue
                r = run_point(m, T, args)
                if "error" in r:
                    stopped[m] = r["error"]
                    results[(m, T)] = r
                    if not r["error"].startswith("timeout"):
                        print(f"  note: {m} skipped: {r['error']}", flush=True)
                    continue
                prev = results.get((m, T))
                if prev is not None and "error" not in prev:
                    r["round_step_s"] = prev["round_step_s"] + [r["step_s"]]
                    r["peak_increase_mib"] = max(r["peak_increase_mib"], prev["peak_increase_mib"])
                else:
                    r["round_step_s"] = [r["step_s"]]
                r["step_s"] = statistics.median(r["round_step_s"])
                r["us_per_token"] = r["step_s"] / (r["batch"] * T) * 1e6
                results[(m, T)] = r
                print(f"  [{rnd + 1}/{args.rounds}] {m:>18} T={T:<5} "
                      f"{r['round_step_s'][-1] * 1e3:.0f} ms, +{r['peak_increase_mib']:.0f} MiB",
                      flush=True)  # fmt: skip
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print_report(results, models, lens, args)
    if args.json:
        args.json.write_text(json.dumps(list(results.values()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation speed: archlab's cached decoding loop against Hugging Face `generate()`.

Part 1 — tokens/s of greedy generation (prefill of the context + a fixed number of new
tokens; end-of-text disabled so every run makes exactly that many) per architecture at
nano and micro size with 64 and 1024 tokens of context, beside transformers' `generate()`
on the equivalent reference model at equal shapes, random init (no download):

    dense       (learned positions, LayerNorm, GELU MLP)  GPT2LMHeadModel
    dense-rope  (RoPE; our GELU MLP vs Llama's SwiGLU)     LlamaForCausalLM
    mamba                                                 MambaForCausalLM (torch path)
    mamba2                                                Mamba2ForCausalLM (torch path)
    gdn         (pure Gated DeltaNet: OlmoHybridForCausalLM needs attention layers)   none
    moe         (our GELU experts vs Mixtral's SwiGLU)     MixtralForCausalLM
    hypermixer, hybrid                                    no transformers equivalent

SwiGLU references get intermediate width 2/3 of ours (to a multiple of 8) so the parameter
counts match; the
table prints both counts. Medians over --repeats timed runs after one warm-up run, ours and
the reference taking turns so load changes on a shared machine hit both alike.

Part 2 — per-token decode latency and cache size against context length: attention's KV
cache grows with the context (and so does its step time), Mamba's state is constant; the
hybrid's sliding window caps its KV cache at the window.

    python benchmarks/bench_generate.py                      # a few minutes on 2 cores
    python benchmarks/bench_generate.py --threads 4 --json out.json
    python benchmarks/bench_generate.py --archs dense,mamba --sizes nano --no-hf
    python benchmarks/bench_generate.py --archs dense,moe --sizes nano --skip-generate \
        --latency-contexts 64,1024 --latency-steps 64 --threads 1   # MoE decode target
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from typing import Any

import torch

from archlab import build_model, preset_config
from archlab.generate import DecodeState, SamplingParams, generate_ids

ARCHS = ("dense", "dense-rope", "hypermixer", "mamba", "moe", "hybrid", "mamba2", "gdn")
BURST, BURST_WARM = 16, 4  # decode-latency tokens per architecture per turn, the first untimed
VOCAB = 4096


def our_config(arch: str, size: str, max_len: int):
    """Size preset; max_seq_len raised so learned positions cover the longest run."""
    kw: dict[str, Any] = {}
    name = arch
    if arch == "dense-rope":
        name, kw["use_rope"] = "dense", True
    cfg = preset_config(name, size, vocab_size=VOCAB, **kw)
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len)).validate()


def swiglu_width(gelu_width: int) -> int:
    """SwiGLU has 3 matrices to the GELU MLP's 2: 2/3 the width, a multiple of 8 (Mixtral's
    grouped matmul needs 16-byte strides)."""
    return max(8, round(2 * gelu_width / 3 / 8) * 8)


def hf_model(arch: str, cfg, max_len: int):
    """The transformers reference at equal shapes, or None when there is none."""
    import transformers as tf

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights)
    if arch == "dense":
        c = tf.GPT2Config(
            n_positions=max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **common,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(c)
    if arch == "dense-rope":
        c = tf.LlamaConfig(
            hidden_size=cfg.d_model, intermediate_size=swiglu_width(cfg.d_ff),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, max_position_embeddings=max_len, **common,
        )  # fmt: skip
        return tf.LlamaForCausalLM(c)
    if arch == "mamba":
        c = tf.MambaConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=cfg.state_size,
            expand=cfg.expand, conv_kernel=cfg.conv_size, time_step_rank=cfg.resolved_dt_rank,
            use_bias=False, use_conv_bias=True, **common,
        )  # fmt: skip
        return tf.MambaForCausalLM(c)
    if arch == "mamba2":
        from archlab.export.hf_forms import _mamba2_config

        return tf.Mamba2ForCausalLM(_mamba2_config(cfg, common))
    if arch == "moe":
        c = tf.MixtralConfig(
            hidden_size=cfg.d_model, intermediate_size=swiglu_width(cfg.resolved_expert_d_ff),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, max_position_embeddings=max_len,
            sliding_window=None, **common,
        )  # fmt: skip
        return tf.MixtralForCausalLM(c)
    return None


def timed(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then the functions
    take turns (A B A B ...) so a change in machine load hits both sides alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ours_fn(model, prompt: list[int], new: int):
    greedy = SamplingParams(greedy=True)

    def run() -> None:
        out = list(generate_ids(model, prompt, new, greedy))
        assert len(out) == new

    return run


def hf_fn(model, prompt: list[int], new: int):
    idx = torch.tensor([prompt])
    mask = torch.ones_like(idx)
    gen = model.generation_config
    gen.eos_token_id = None  # exactly `new` tokens
    gen.pad_token_id = 0

    def run() -> None:
        with torch.inference_mode():
            out = model.generate(
                idx, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, use_cache=True,
            )  # fmt: skip
        assert out.shape[1] == len(prompt) + new

    return run


def part1(args) -> list[dict[str, Any]]:
    rows = []
    max_len = max(args.contexts) + args.new_tokens + 8
    for size in args.sizes:
        for arch in args.archs:
            torch.manual_seed(0)
            cfg = our_config(arch, size, max_len)
            ours = build_model(cfg).eval()
            ref = None if args.no_hf else hf_model(arch, cfg, max_len)
            if ref is not None:
                ref.eval()
            for ctx in args.contexts:
                g = torch.Generator().manual_seed(ctx)
                prompt = torch.randint(0, cfg.vocab_size, (ctx,), generator=g).tolist()
                row: dict[str, Any] = dict(
                    size=size, arch=arch, context=ctx, new_tokens=args.new_tokens,
                    params=ours.num_parameters(),
                )  # fmt: skip
                fns = {"ours": ours_fn(ours, prompt, args.new_tokens)}
                if ref is not None:
                    fns["hf"] = hf_fn(ref, prompt, args.new_tokens)
                med = timed(fns, args.repeats)
                row["ours_s"] = med["ours"]
                row["ours_tok_s"] = args.new_tokens / row["ours_s"]
                if ref is not None:
                    row["hf_model"] = type(ref).__name__
                    row["hf_params"] = sum(p.numel() for p in ref.parameters())
                    row["hf_s"] = med["hf"]
                    row["hf_tok_s"] = args.new_tokens / row["hf_s"]
                    row["speedup"] = row["hf_s"] / row["ours_s"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def state_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def part2(args) -> list[dict[str, Any]]:
    """Median single-token step time after a prefill of C tokens; cache bytes at C. The
    architectures take turns in bursts of BURST tokens (A B C A B C ...), so a change in
    machine load hits all of them alike and their ratios hold within the run. The first
    BURST_WARM tokens of a burst are not timed: taking turns token by token, every model
    decoded from cold CPU caches, 2-3x slower than in a real generation."""
    rows = []
    size = args.sizes[0]
    max_len = max(args.latency_contexts) + args.latency_steps + 8
    models = {}
    for arch in args.archs:
        torch.manual_seed(0)
        models[arch] = build_model(our_config(arch, size, max_len)).eval()
    for ctx in args.latency_contexts:
        states, steps, tokens, nbytes = {}, {}, {}, {}
        with torch.inference_mode():
            for arch, model in models.items():
                prompt = torch.randint(0, model.cfg.vocab_size, (ctx,)).tolist()
                states[arch] = DecodeState(model)
                states[arch].prefill(prompt)
                nbytes[arch] = state_bytes(states[arch].cache.layers)
                steps[arch], tokens[arch] = [], 1
            for r in range(1 + -(-args.latency_steps // BURST)):  # round 0 warms up
                for arch, state in states.items():
                    for i in range(BURST_WARM + BURST):  # the first ones warm the caches
                        t0 = time.perf_counter()
                        tokens[arch] = int(state.feed(tokens[arch]).argmax())
                        if r > 0 and i >= BURST_WARM:
                            steps[arch].append(time.perf_counter() - t0)
        for arch in args.archs:
            rows.append(
                dict(size=size, arch=arch, context=ctx,
                     ms_per_token=1e3 * statistics.median(steps[arch]), cache_bytes=nbytes[arch])
            )  # fmt: skip
    return rows


def format_row(r: dict[str, Any]) -> str:
    hf = (
        f"{r['hf_model']:>20} {r['hf_params'] / 1e6:6.2f}M {r['hf_tok_s']:9.1f} {r['speedup']:6.2f}x"
        if "hf_s" in r
        else f"{'-':>20} {'':7} {'':9} {'':7}"
    )
    return (
        f"{r['size']:6} {r['arch']:11} {r['context']:6} {r['params'] / 1e6:6.2f}M "
        f"{r['ours_tok_s']:9.1f}  {hf}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--sizes", default="nano,micro")
    p.add_argument("--contexts", default="64,1024")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers references")
    p.add_argument("--latency-contexts", default="64,256,1024,2048")
    p.add_argument("--latency-steps", type=int, default=16)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-generate", action="store_true", help="only part 2 (latency)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    args.archs = [a for a in args.archs.split(",") if a]
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.latency_contexts = [int(c) for c in args.latency_contexts.split(",")]
    unknown = sorted(set(args.archs) - set(ARCHS))
    if unknown:
        p.error(f"unknown --archs {unknown} (allowed: {', '.join(ARCHS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # transformers' "fast path not available" etc.
    try:
        import transformers

        hf_version = transformers.__version__
        transformers.logging.set_verbosity_error()  # missing-kernel and config notices
    except ImportError:
        hf_version = None
        args.no_hf = True
    env = dict(
        torch=torch.__version__, transformers=hf_version, threads=torch.get_num_threads(),
        cpus=os.cpu_count(), machine=platform.processor() or platform.machine(),
    )  # fmt: skip
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, torch threads "
        f"{env['threads']} (of {env['cpus']} CPUs); greedy, {args.new_tokens} new tokens, "
        f"median of {args.repeats} interleaved after 1 warm-up; tok/s = new tokens / (prefill + decode)"
    )
    print()
    print(
        f"{'size':6} {'arch':11} {'ctx':>6} {'params':>7} {'ours tok/s':>9}  "
        f"{'reference':>20} {'params':>7} {'ref tok/s':>9} {'ours/ref':>7}"
    )
    rows = [] if args.skip_generate else part1(args)
    lat = [] if args.skip_latency else part2(args)
    if lat:
        print()
        print(f"Per-token decode latency vs context ({args.sizes[0]}, median of "
              f"{args.latency_steps} steps after the prefill, architectures interleaved"
              f"{'; in brackets the multiple of dense' if 'dense' in args.archs else ''})")  # fmt: skip
        ctxs = args.latency_contexts
        dense = {r["context"]: r["ms_per_token"] for r in lat if r["arch"] == "dense"}
        print(f"{'arch':11} " + " ".join(f"{'ms@' + str(c):>16}" for c in ctxs) + "   cache KiB at "
              + "/".join(str(c) for c in ctxs))  # fmt: skip
        for arch in args.archs:
            rs = [r for r in lat if r["arch"] == arch]
            cells = [f"{r['ms_per_token']:.3f}" + (f" ({r['ms_per_token'] / dense[r['context']]:.2f}x)"
                     if dense else "") for r in rs]  # fmt: skip
            print(f"{arch:11} " + " ".join(f"{c:>16}" for c in cells) + "   "
                  + "/".join(f"{r['cache_bytes'] / 1024:.0f}" for r in rs))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, args=vars(args), generate=rows, latency=lat), f, indent=2)


if __name__ == "__main__":
    main()

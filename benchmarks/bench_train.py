#!/usr/bin/env python3
"""Training throughput: archlab's trainer against a minimal plain-PyTorch loop, same model.

The setting is the well-known CPU "baby GPT" on character-level Tiny Shakespeare (nanoGPT's
``train_shakespeare_char`` on a CPU): dense, 4 layers, 4 heads, d_model 128, sequence 64,
batch 12, dropout 0. Both loops build the same model from the same seed, draw batches from the
same memmap (``TokenDataset.get_batch``) and time the same steps (all but the first, which
holds warm-up and compilation). The plain loop is forward, cross-entropy, backward, AdamW step
and nothing else; the trainer does everything a real run does (schedule, clipping, the
non-finite guard, logging).

Repeats alternate plain / ours so that load on a shared machine hits both alike; the table
reports medians. Ratio = ours / plain loop with the same optimisation (AMP, compile);
"vs fp32" = ours / plain fp32 loop. MFU uses archlab's model FLOPs per token over a matmul
peak measured in this process (a shared machine makes both noisy).

    python benchmarks/bench_train.py                       # fp32, --use-amp, --use-compile
    python benchmarks/bench_train.py --steps 200 --repeats 5 --num-threads 2
    python benchmarks/bench_train.py --val-steps 2000      # also: val loss after 2000 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from archlab import build_model, preset_config  # noqa: E402
from archlab.train.config import TrainConfig  # noqa: E402
from archlab.train.flops import flops_per_token  # noqa: E402
from archlab.train.peak import peak as device_peak  # noqa: E402
from archlab.train.trainer import amp_dtype, run_training  # noqa: E402

DEFAULT_TEXT = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
)
MODEL = dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=64, dropout=0.0)
SEQ, BATCH, LR = 64, 12, 1e-3


def prepare(text: Path, out: Path | None) -> Path:
    from archlab.data.prepare import prepare_dataset

    if not text.exists():
        sys.exit(f"bench_train: {text} not found (pass --text PATH to Tiny Shakespeare input.txt)")
    return prepare_dataset(str(text), out, tokenizer="char", verbose=False)


def model_config(vocab: int):
    return preset_config("dense", "nano", vocab_size=vocab, **MODEL)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    data: Path, vocab: int, steps: int, amp: bool, compile_: bool, seed: int, device: torch.device
) -> float:
    """Tokens/s of the minimal loop over steps 2..steps (step 1 holds warm-up/compilation)."""
    from archlab.data.loader import TokenDataset

    torch.manual_seed(seed)
    model = build_model(model_config(vocab)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    fwd = torch.compile(model) if compile_ else model
    ds = TokenDataset(data, "train")
    g = torch.Generator().manual_seed(seed)
    dtype = amp_dtype(device)[0] if amp else None
    t_start = 0.0
    for step in range(steps):
        if step == 1:
            _sync(device)
            t_start = time.perf_counter()
        x, y = ds.get_batch(BATCH, SEQ, g)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = fwd(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    elapsed = time.perf_counter() - t_start
    return (steps - 1) * BATCH * SEQ / elapsed


def ours(
    data: Path, steps: int, amp: bool, compile_: bool, seed: int, out: Path, device: torch.device
) -> dict:
    cfg = TrainConfig(
        data=str(data), out_dir=str(out), seed=seed, device=device.type, batch_size=BATCH,
        seq_len=SEQ, num_epochs=1, steps_per_epoch=steps, learning_rate=LR, warmup_steps=0,
        use_amp=amp, use_compile=compile_, eval_interval=0, eval_steps=1, log_interval=50,
        checkpoint_interval=0,
    )  # fmt: skip
    return run_training(cfg, dict(architecture="dense", model_size="nano", **MODEL), progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="Tiny Shakespeare input.txt")
    ap.add_argument("--data-dir", type=Path, default=None, help="where to prepare the data")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="fp32,amp,compile",
                    help="comma list of fp32, amp, compile, amp+compile")  # fmt: skip
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-steps", type=int, default=0,
                    help="also train N steps (nanoGPT's schedule) and report the val loss")  # fmt: skip
    args = ap.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer does (TF32)
    data = prepare(args.text, args.data_dir)
    import json

    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    model = build_model(model_config(vocab), device="meta")
    fpt = flops_per_token(model, SEQ)
    print(
        f"bench_train: dense {MODEL['n_layers']}L/{MODEL['n_heads']}H/d{MODEL['d_model']}, "
        f"seq {SEQ}, batch {BATCH}, char vocab {vocab}, {model.num_parameters():,} parameters, "
        f"{fpt / 1e6:.2f} MFLOP/token; {device.type}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; "
        f"{args.steps} steps x {args.repeats} repeats (medians)"
    )
    rows = []
    plain_fp32 = None
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            amp, comp = "amp" in variant, "compile" in variant
            plain_runs, our_runs = [], []
            for r in range(args.repeats):
                plain_runs.append(plain_loop(data, vocab, args.steps, amp, comp, args.seed, device))
                s = ours(
                    data, args.steps, amp, comp, args.seed, Path(tmp) / f"{variant}-{r}", device
                )
                our_runs.append(s["tokens_per_s"])
            p, o = statistics.median(plain_runs), statistics.median(our_runs)
            if variant == "fp32":
                plain_fp32 = p
            dtype = amp_dtype(device)[0] if amp else torch.float32
            peak = device_peak(device, dtype).flops
            rows.append((variant, p, o, o / p, o / plain_fp32 if plain_fp32 else float("nan"),
                         fpt * o / peak, peak))  # fmt: skip
            print(f"  {variant}: plain {[round(v) for v in plain_runs]}, ours {[round(v) for v in our_runs]}",
                  flush=True)  # fmt: skip
    print()
    print(
        "| variant | plain loop tok/s | archlab tok/s | ratio | vs plain fp32 | MFU | peak TFLOP/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v, p, o, ratio, vs, m, peak in rows:
        print(
            f"| {v} | {p:,.0f} | {o:,.0f} | {ratio:.2f}x | {vs:.2f}x | {100 * m:.2f}% | {peak / 1e12:.3g} |"
        )
    if args.val_steps:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                data=str(data), out_dir=tmp, seed=args.seed, device=device.type, batch_size=BATCH,
                seq_len=SEQ, steps_per_epoch=args.val_steps, learning_rate=LR, min_lr_ratio=0.1,
                warmup_steps=100, beta2=0.99, weight_decay=0.1, eval_interval=0, eval_steps=200,
                log_interval=100, checkpoint_interval=0,
            )  # fmt: skip
            t0 = time.perf_counter()
            s = run_training(cfg, dict(architecture="dense", model_size="nano", **MODEL),
                             progress=False)  # fmt: skip
            print(
                f"\nval loss after {args.val_steps} steps (lr 1e-3 cosine to 1e-4, warmup 100, "
                f"beta2 0.99; 200 x {BATCH} x {SEQ} val tokens): {s['final_val_loss']:.4f} "
                f"in {time.perf_counter() - t0:.0f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

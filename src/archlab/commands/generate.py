"""archlab generate: continue a prompt with a trained checkpoint (any architecture)."""

from __future__ import annotations

import argparse
import sys


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Flags shared by generate and chat."""
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint folder, or a run folder (its latest checkpoint)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"stop after this many new tokens (default {max_new_tokens})",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divide logits by this before sampling; 0 = greedy (default 1.0)",
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus: sample among the smallest set reaching probability p",
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    add_sampling_args(p, max_new_tokens=128)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")


def warn_to_stderr(command: str):
    def warn(message: str) -> None:
        print(f"archlab {command}: warning: {message}", file=sys.stderr, flush=True)

    return warn


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..generate import SamplingParams, generate, load

    if not args.prompt.strip():
        raise UserError("--prompt: empty prompt")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1 (got {args.max_new_tokens})")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.greedy)  # validate first
    loaded = load(args.checkpoint, device=args.device)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    text = generate(
        loaded,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stream=stream if args.stream else None,
        warn=warn_to_stderr("generate"),
    )
    if args.stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0

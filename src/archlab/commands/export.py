"""`archlab export`: write a checkpoint as a Hugging Face transformers folder."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face transformers model folder",
        description="Write config.json, model.safetensors and the tokenizer so that "
        "transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT) load it. Only "
        "forms with an exact transformers counterpart are exported: dense GPT-2 form (learned "
        "positions, LayerNorm, GELU) -> GPT2LMHeadModel, dense Llama form (--use-rope "
        "--use-rmsnorm --mlp swiglu) -> LlamaForCausalLM, moe Mixtral form -> "
        "MixtralForCausalLM, mamba -> MambaForCausalLM. The export is verified by loading it "
        "back and comparing logits.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="checkpoint folder, or a run folder (its latest checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--format", choices=("hf",), default="hf", help="output format (default hf)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the export back to compare its logits with archlab's",
    )


def run(args: argparse.Namespace) -> int:
    from ..export import export_hf

    quiet_transformers()
    result = export_hf(args.checkpoint, args.out, force=args.force, verify=not args.no_verify)
    print("\n".join(result.lines()))
    return 0


def quiet_transformers() -> None:
    """transformers' own progress bars and fallback-kernel notices are noise for this command."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

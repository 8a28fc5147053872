"""archlab summary: the seed's architecture summary with exact parameter counts."""

from __future__ import annotations

import argparse
import json

from .model_args import add_model_args, model_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print an architecture summary and exact parameter counts")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ..models import build_model

    cfg = model_config_from_args(args)
    model = build_model(cfg, device="meta")  # exact counts, no weights allocated
    if args.json:
        print(json.dumps(model.summary_dict(), indent=2))
    else:
        print(model.summary())
    return 0

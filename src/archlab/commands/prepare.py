"""archlab prepare: a corpus -> train/val token files, tokenizer.json and meta.json."""

from __future__ import annotations

import argparse

SOURCES_HELP = (
    "a built-in source (stories, python, rustgpt, rustgpt-chat, mqar, selective-copy, "
    "tinystories) "
    "or a local .txt/.jsonl/.parquet file, folder or glob"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into train/val token files (data/<name> by default)",
        description="Tokenize a corpus into train.bin/val.bin, tokenizer.json and meta.json. "
        "Re-running with the same inputs and settings reuses the output.",
    )
    p.add_argument("source_pos", nargs="?", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--source", "--data", dest="source", help=SOURCES_HELP)
    p.add_argument("--out", "--out-dir", dest="out", help="output folder (default: data/<name>)")
    p.add_argument(
        "--tokenizer",
        help="bpe (byte-level BPE trained on the training split), char, word (RustGPT's rules) "
        "or a path to a tokenizer.json (default: the source's; bpe, word for rustgpt)",
    )
    p.add_argument("--vocab-size", type=int, help="BPE (default 4096) or word vocabulary size")
    p.add_argument(
        "--val-fraction", type=float, help="share of documents for validation (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="generation and split seed (default 0)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (whole documents)")
    p.add_argument(
        "--num-stories",
        type=int,
        help="stories to generate (stories: default 30000) or to take (tinystories)",
    )
    p.add_argument(
        "--stories-grammar",
        choices=("full", "tiny"),
        help="stories: grammar (tiny: small enough to enumerate)",
    )
    p.add_argument(
        "--doc-separator",
        help=r"documents in .txt files are split on this (default <|endoftext|>; '' keeps files whole; \n allowed)",
    )
    p.add_argument(
        "--text-field", help="the text field of .jsonl records / .parquet column (default text)"
    )
    p.add_argument(
        "--errors",
        choices=("strict", "replace"),
        help="non-UTF-8 bytes: stop (strict, default) or substitute U+FFFD",
    )
    g = p.add_argument_group("mqar (multi-query associative recall)")
    g.add_argument(
        "--mqar-vocab-size",
        type=int,
        help="vocabulary; keys and values from its two halves (default 256)",
    )
    g.add_argument(
        "--mqar-pairs", type=int, help="key-value pairs (and queries) per sequence (default 8)"
    )
    g.add_argument("--mqar-seq-len", type=int, help="sequence length (default 64)")
    g.add_argument("--mqar-train-examples", type=int, help="training sequences (default 20000)")
    g.add_argument("--mqar-val-examples", type=int, help="validation sequences (default 1000)")
    g.add_argument(
        "--mqar-power-a", type=float, help="power-law parameter of query distances (default 0.01)"
    )
    c = p.add_argument_group("selective-copy (MAD's selective copying)")
    c.add_argument("--sc-vocab-size", type=int, help="vocabulary incl. noise and delimiter (16)")
    c.add_argument("--sc-tokens", type=int, help="data tokens to copy per sequence (default 8)")
    c.add_argument("--sc-seq-len", type=int, help="sequence length (default 64)")
    c.add_argument("--sc-train-examples", type=int, help="training sequences (default 20000)")
    c.add_argument("--sc-val-examples", type=int, help="validation sequences (default 1000)")
    p.add_argument(
        "--force", action="store_true", help="rebuild even when the output is up to date"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output, only the summary")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    if args.source and args.source_pos and args.source != args.source_pos:
        raise UserError(f"two sources given: {args.source_pos!r} and --source {args.source!r}")
    source = args.source or args.source_pos
    if not source:
        raise UserError(
            "no source: pass one, e.g. `archlab prepare stories` or `archlab prepare --source corpus.txt`"
        )
    from pathlib import Path

    from ..data.prepare import data_files_ok, describe, load_meta, prepare_dataset

    if (Path(source) / "meta.json").exists():  # an already prepared folder: check and describe
        meta = load_meta(source)
        problem = data_files_ok(Path(source), meta)
        if problem:
            raise UserError(f"data folder {source} is incomplete ({problem}); prepare it again")
        print(describe(Path(source), meta))
        return 0

    options = {
        "num_stories": args.num_stories,
        "stories_grammar": args.stories_grammar,
        "doc_separator": args.doc_separator,
        "text_field": args.text_field,
        "errors": args.errors,
        "mqar_vocab_size": args.mqar_vocab_size,
        "mqar_pairs": args.mqar_pairs,
        "mqar_seq_len": args.mqar_seq_len,
        "mqar_train_examples": args.mqar_train_examples,
        "mqar_val_examples": args.mqar_val_examples,
        "mqar_power_a": args.mqar_power_a,
        "sc_vocab_size": args.sc_vocab_size,
        "sc_tokens": args.sc_tokens,
        "sc_seq_len": args.sc_seq_len,
        "sc_train_examples": args.sc_train_examples,
        "sc_val_examples": args.sc_val_examples,
    }
    out = prepare_dataset(
        source,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        max_tokens=args.max_tokens,
        force=args.force,
        verbose=not args.quiet,
        wait_for_lock=False,  # a second `archlab prepare` of one folder is refused, naming the pid
        **options,
    )
    print(describe(out, load_meta(out)))
    return 0

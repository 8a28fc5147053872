"""Benchmark: how long `archlab prepare` takes on a realistic text corpus.

Builds a mixed corpus of the requested size (real code from the interpreter's standard library,
Tiny Shakespeare from ../shared/datasets when present, and built-in stories), written as one
.txt file with <|endoftext|> between documents, then times ``prepare_dataset`` on it with
byte-level BPE (vocabulary 4096) and with the char tokenizer. The issue's target: 50 MB in under
about 60 s on 2 CPU cores.

    python benchmarks/bench_prepare.py            # 50 MB
    python benchmarks/bench_prepare.py --mb 10 --tokenizers bpe
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from archlab.data.prepare import load_meta, prepare_dataset  # noqa: E402
from archlab.data.stories import StoryGrammar  # noqa: E402

SHAKESPEARE = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
)


def build_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """~1/2 stdlib code (tests included), Shakespeare scenes, the rest stories; -> (bytes, docs)."""
    import sysconfig

    target = int(megabytes * 1e6)
    docs: list[str] = []
    size = 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        if size >= target // 2:
            break
        if "site-packages" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        if text and "<|endoftext|>" not in text:
            docs.append(text)
            size += len(text.encode())
    if SHAKESPEARE.exists():
        paras = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        for i in range(0, len(paras), 20):  # scene-sized documents of 20 speeches
            docs.append("\n\n".join(paras[i : i + 20]))
            size += len(docs[-1].encode())
    for text, _ in StoryGrammar().sample(10**9, seed=123):
        if size >= target:
            break
        docs.append(text)
        size += len(text.encode())
    data = "\n<|endoftext|>\n".join(docs)
    path.write_text(data, encoding="utf-8")
    return len(data.encode()), len(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    ap.add_argument("--tokenizers", default="bpe,char", help="comma-separated: bpe,char")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="archlab-bench-prepare-"))
    try:
        corpus = tmp / "corpus.txt"
        t = time.perf_counter()
        nbytes, ndocs = build_corpus(corpus, args.mb)
        print(
            f"corpus: {nbytes / 1e6:.1f} MB, {ndocs:,} documents (built in {time.perf_counter() - t:.1f} s)"
        )
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"machine: {cores} CPU cores usable, Python {sys.version.split()[0]}")
        print()
        header = "| tokenizer | vocab | tokens | total s | read s | tokenizer s | encode s | MB/s | target |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for kind in args.tokenizers.split(","):
            out = tmp / f"out-{kind}"
            vocab = args.vocab_size if kind == "bpe" else None
            t = time.perf_counter()
            prepare_dataset(str(corpus), out, tokenizer=kind, vocab_size=vocab, verbose=False)
            total = time.perf_counter() - t
            m = load_meta(out)
            ph = m.get("timings_s", {})
            tokens = m["train_tokens"] + m["val_tokens"]
            scaled = total * 50e6 / nbytes
            ok = "ok" if scaled < 60 else "SLOW"
            print(
                f"| {kind} | {m['vocab_size']:,} | {tokens:,} | {total:.1f} | {ph.get('read', 0):.1f} | "
                f"{ph.get('tokenizer', 0):.1f} | {ph.get('encode', 0):.1f} | {nbytes / 1e6 / total:.2f} | "
                f"{ok} ({scaled:.0f} s per 50 MB) |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

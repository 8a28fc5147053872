"""prepare: a source -> ``train.bin``/``val.bin`` (+ masks), ``tokenizer.json``, ``meta.json``.

The entry points: ``prepare_dataset`` (what `archlab prepare` runs) sends a text source to
data/corpus.py (splits, tokenizer training, token files) and a generated task (mqar,
selective-copy) to data/generated.py; both write the folder the same way (data/folder.py:
under a lock, built in a temporary sibling and renamed into place, a meta.json whose hash of
the settings lets a matching folder be reused as it is). ``resolve_data`` says what ``--data``
means for train / compare / eval, and ``describe`` is the summary `archlab prepare` prints.
The names other modules read (``load_meta``, ``data_files_ok``, ``FIXED_LENGTH_TASKS``) are
importable from here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .corpus import prepare_text
from .folder import REQUIRED_META, data_files_ok, load_meta
from .generated import (
    FIXED_LENGTH_TASKS,
    TASKS,
    check_task_options,
    pop_task_options,
    prepare_generated,
)
from .sources import BUILTIN_SOURCES, SourceOptions
from .tokenizer import load_tokenizer

STAGE_DEFAULTS = {"language": "stories", "code": "python", "chat": "rustgpt-chat"}


def prepare_dataset(
    source: str,
    out_dir: str | os.PathLike | None = None,
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    val_fraction: float | None = None,
    max_tokens: int | None = None,
    force: bool = False,
    verbose: bool = True,
    wait_for_lock: bool = True,
    **source_options: Any,
) -> Path:
    """Prepare ``source`` (a built-in name or local file/folder/glob); returns the folder.

    ``tokenizer``: "bpe" | "char" | "word" | path to a tokenizer.json (default: the source's,
    bpe or word for rustgpt). ``source_options``: ``num_stories``, ``stories_grammar``,
    ``doc_separator``, ``text_field``, ``errors`` and, for mqar, ``mqar_vocab_size``,
    ``mqar_pairs``, ``mqar_seq_len``, ``mqar_train_examples``, ``mqar_val_examples``,
    ``mqar_power_a``; for selective-copy, ``sc_vocab_size``, ``sc_tokens``, ``sc_seq_len``,
    ``sc_train_examples``, ``sc_val_examples``. ``wait_for_lock``: wait for another process
    preparing the same folder (False: refuse with FolderBusy, as ``archlab prepare`` does).
    """
    task_opts = pop_task_options(source_options)
    unknown = set(source_options) - set(SourceOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"prepare_dataset: unknown options {sorted(unknown)}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2 (got {max_tokens})")
    source = str(source)
    check_task_options(source, task_opts)
    common = dict(
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seed=seed,
        val_fraction=val_fraction,
        max_tokens=max_tokens,
        force=force,
        verbose=verbose,
        wait_for_lock=wait_for_lock,
        source_options=source_options,
    )
    if source in TASKS:
        return prepare_generated(source, out_dir, task_options=task_opts[source], **common)
    return prepare_text(source, out_dir, **common)


def _same_tokenizer(a: Path, b: str) -> bool:
    return load_tokenizer(a).to_json() == load_tokenizer(b).to_json()


def resolve_data(
    spec: str | os.PathLike | None,
    stage: str,
    preset: str | None,
    tokenizer: str | None = None,
    **opts: Any,
) -> Path:
    """``--data`` -> a prepared folder, preparing (or reusing) it when needed.

    ``spec``: a prepared folder (with meta.json), a built-in source name, a local
    file/folder/glob, or None for the stage's default (language -> stories, code -> python,
    chat -> rustgpt-chat; with preset rustgpt, language -> rustgpt). ``tokenizer`` (e.g. the
    tokenizer.json of an --init-from checkpoint) must match an existing folder's, and is used
    to prepare a source.
    """
    if spec is None:
        if stage not in STAGE_DEFAULTS:
            raise UserError(
                f"--stage: unknown stage {stage!r} (allowed: {', '.join(STAGE_DEFAULTS)})"
            )
        spec = "rustgpt" if preset == "rustgpt" and stage == "language" else STAGE_DEFAULTS[stage]
    spec = str(spec)
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "meta.json").exists():
        meta = load_meta(p)
        problem = data_files_ok(p, meta)
        if problem:
            raise UserError(
                f"data folder {p} is incomplete ({problem}); re-run `archlab prepare --force`"
            )
        if tokenizer is not None and not _same_tokenizer(p, tokenizer):
            raise UserError(
                f"data folder {p} was tokenized with a different tokenizer than {tokenizer}; "
                f"prepare it again with --tokenizer {tokenizer}"
            )
        return p
    if spec in BUILTIN_SOURCES or p.exists() or any(ch in spec for ch in "*?["):
        return prepare_dataset(spec, tokenizer=tokenizer, **opts)
    raise UserError(
        f"--data: {spec!r} is neither a prepared folder (with meta.json), a built-in source "
        f"({', '.join(BUILTIN_SOURCES)}) nor an existing file, folder or glob"
    )


def describe(out: Path, meta: dict[str, Any] | None = None) -> str:
    """The one-paragraph summary printed by ``archlab prepare``."""
    m = meta if meta is not None else load_meta(out)
    vocab = f"{m['vocab_size']:,}"
    req = m.get("requested_vocab_size")
    if m["tokenizer"] == "bpe" and req and req != m["vocab_size"]:
        vocab += f" (asked for {req:,}; the data has no more merges)"
    parts = [
        f"{m.get('source', '?')} in {out}: {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens",
        f"from {m.get('train_docs', 0):,} + {m.get('val_docs', 0):,} documents",
        f"{m['tokenizer']} tokenizer, vocabulary {vocab}, end-of-text id {m['eot_id']}, {m['dtype']}",
    ]
    if m["has_mask"]:
        parts.append(f"{m.get('train_loss_tokens', 0):,} train tokens count for the loss (mask)")
    if m.get("task") in TASKS:
        parts.append(TASKS[m["task"]].summary(m))
    if m.get("unigram_entropy") is not None and m.get("bigram_entropy") is not None:
        parts.append(
            f"baselines on val: unigram {m['unigram_entropy']:.4f}, "
            f"bigram {m['bigram_entropy']:.4f} nats/token"
        )
    if m.get("entropy_floor") is not None:
        parts.append(f"entropy floor {m['entropy_floor']:.4f} nats/token on val")
    if m.get("prepare_seconds") is not None:
        parts.append(f"built in {m['prepare_seconds']:.1f} s")
    return "; ".join(parts) + "."


__all__ = [
    "FIXED_LENGTH_TASKS",
    "REQUIRED_META",
    "STAGE_DEFAULTS",
    "data_files_ok",
    "describe",
    "load_meta",
    "prepare_dataset",
    "resolve_data",
]

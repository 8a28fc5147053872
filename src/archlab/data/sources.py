"""Sources: where documents come from (built-in generators, the stdlib, local files, the Hub).

A :class:`Source` yields :class:`Doc` objects and carries a ``fingerprint`` (JSON-able, cheap to
compute) that identifies its content; ``prepare`` hashes it with the settings to decide reuse.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .documents import Doc, Source

BUILTIN_SOURCES = (
    "stories",
    "python",
    "rustgpt",
    "rustgpt-chat",
    "mqar",
    "selective-copy",
    "tinystories",
)
CHAT_FORMAT = {"user": "User:", "assistant": "Assistant:", "end": "</s>"}
DEFAULT_NUM_STORIES = 30_000  # ~2.7M train + ~0.3M val BPE tokens at vocab 4096


# --------------------------------------------------------------------------------------
# stories
# --------------------------------------------------------------------------------------


def stories_source(num_stories: int | None, seed: int, grammar: str | None) -> Source:
    from .stories import GRAMMAR_VERSION, StoryGrammar
    from .stories_lexicon import LEXICONS

    n = DEFAULT_NUM_STORIES if num_stories is None else num_stories
    if n < 2:
        raise UserError(f"--num-stories must be at least 2 (got {n})")
    gname = grammar or "full"
    if gname not in LEXICONS:
        raise UserError(f"--stories-grammar: unknown grammar {gname!r} (allowed: full, tiny)")
    g = StoryGrammar(LEXICONS[gname]())

    def docs() -> Iterator[Doc]:
        for text, logp in g.sample(n, seed):
            yield Doc(text, logp=logp)

    return Source(
        name="stories" if gname == "full" else f"stories-{gname}",
        kind="stories",
        fingerprint={"grammar": gname, "grammar_version": GRAMMAR_VERSION, "num_stories": n},
        docs=docs,
        num_docs=n,
        has_logp=True,
    )


# --------------------------------------------------------------------------------------
# python: the running interpreter's standard library
# --------------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's .py files, sorted, without test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return root, files


def python_source() -> Source:
    root, files = stdlib_files()
    if not files:
        raise UserError(f"python: no .py files found in the standard library at {root}")
    listing = hashlib.sha256()
    for f in files:
        st = f.stat()
        listing.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    info: dict[str, Any] = {
        "stdlib": str(root),
        "python": sys.version.split()[0],
        "files": len(files),
    }

    def docs() -> Iterator[Doc]:
        skipped = 0
        for f in files:
            try:
                text = f.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1  # a few stdlib files are deliberately not UTF-8
                continue
            if text.strip():
                yield Doc(text)
        info["skipped_files"] = skipped

    return Source(
        name="python",
        kind="python",
        fingerprint={"python": sys.version, "stdlib": str(root), "listing": listing.hexdigest()},
        docs=docs,
        num_docs=len(files),
        info=info,
    )


# --------------------------------------------------------------------------------------
# rustgpt: the seed's flavour of pretraining sentences and chat exchanges
# --------------------------------------------------------------------------------------


def _rustgpt_texts() -> Iterator[str]:
    from .rustgpt_corpus import CHAT, PRETRAINING

    for s in PRETRAINING:
        yield f"{s} </s>"
    for q, a in CHAT:
        yield f"User: {q} Assistant: {a} </s>"


def rustgpt_source(chat: bool) -> Source:
    from . import rustgpt_corpus as rc

    digest = hashlib.sha256(repr((rc.PRETRAINING, rc.CHAT)).encode()).hexdigest()

    def docs() -> Iterator[Doc]:
        if not chat:
            for s in rc.PRETRAINING:
                yield Doc(f"{s} </s>")
            return
        for q, a in rc.CHAT:
            prompt = f"{CHAT_FORMAT['user']} {q} {CHAT_FORMAT['assistant']}"
            answer = f" {a} {CHAT_FORMAT['end']}"
            yield Doc(prompt + answer, segments=((prompt, False), (answer, True)))

    name = "rustgpt-chat" if chat else "rustgpt"
    return Source(
        name=name,
        kind=name,
        fingerprint={"corpus": digest},
        docs=docs,
        num_docs=len(rc.CHAT if chat else rc.PRETRAINING),
        default_tokenizer="word",
        chat=chat,
        vocab_texts=_rustgpt_texts,
        info={"chat_format": CHAT_FORMAT} if chat else {},
    )


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------


@dataclass
class SourceOptions:
    """Options of ``archlab prepare`` that shape the documents (not the tokenizer)."""

    num_stories: int | None = None
    stories_grammar: str | None = None
    doc_separator: str | None = None
    text_field: str | None = None
    errors: str | None = None


def _reject(opts: SourceOptions, source: str, *names: str) -> None:
    for n in names:
        if getattr(opts, n) is not None:
            flag = "--" + n.replace("_", "-")
            raise UserError(f"{flag} does not apply to the {source!r} source")


def build_source(spec: str, seed: int, opts: SourceOptions) -> Source:
    """A built-in name or a local file/folder/glob -> Source (mqar is handled by prepare)."""
    if opts.errors is not None and opts.errors not in ("strict", "replace"):
        raise UserError(f"--errors: unknown policy {opts.errors!r} (allowed: strict, replace)")
    file_opts = ("doc_separator", "text_field", "errors")
    if spec == "stories":
        _reject(opts, spec, *file_opts)
        return stories_source(opts.num_stories, seed, opts.stories_grammar)
    if spec == "python":
        _reject(opts, spec, *file_opts, "num_stories", "stories_grammar")
        return python_source()
    if spec in ("rustgpt", "rustgpt-chat"):
        _reject(opts, spec, *file_opts, "num_stories", "stories_grammar")
        return rustgpt_source(chat=spec == "rustgpt-chat")
    if spec == "tinystories":
        _reject(opts, spec, *file_opts, "stories_grammar")
        from .hub import tinystories_source

        return tinystories_source(opts.num_stories)
    from .local import local_source

    _reject(opts, "local files", "num_stories", "stories_grammar")
    return local_source(
        spec,
        doc_separator=opts.doc_separator,
        text_field=opts.text_field,
        errors=opts.errors or "strict",
    )

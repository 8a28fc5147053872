"""A text source -> a trained tokenizer and token files: the language-model data.

Splits: documents go to val when a seeded hash of their text falls below ``val_fraction`` (so
identical documents always land in the same split and train/val share no document); sources
with official splits keep them; a corpus that is one single document (e.g. Tiny Shakespeare)
is cut at a line boundary, the first ``1 - val_fraction`` for training, the rest for val.

Tokenizer: byte-level BPE, characters or RustGPT's words, trained on the training split only
(the character alphabet on all splits, so val has no unknown character), or a given
tokenizer.json.

Token files: each document's tokens followed by end-of-text (unless the document already ends
with it, as RustGPT's ``</s>`` does), uint16 when the vocabulary fits, else uint32; chat
documents also get a loss mask (only the assistant's replies count). The folder itself (lock,
atomic rename, meta.json) is data/folder.py's.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .folder import (
    FORMAT_VERSION,
    add_missing_baselines,
    atomic_build,
    baselines_meta,
    check_replaceable,
    locked,
    log,
    settings_digest,
    up_to_date,
    write_meta,
)
from .sources import Doc, Source, SourceOptions, build_source
from .tokenizer import TextTokenizer, load_tokenizer, train_bpe, train_char, train_word

DEFAULT_BPE_VOCAB = 4096
DEFAULT_VAL_FRACTION = 0.1
TOKENIZER_KINDS = ("bpe", "char", "word")
_BATCH_DOCS = 512
# A document longer than this is encoded in pieces cut at safe newlines (see _pieces), so
# the progress bar moves within one huge document (a single .txt corpus). The ids are exactly
# those of the whole text; the time is the same (5.6M chars of BPE: 6.47 s whole, 6.30 s in
# pieces, shared 2-core machine, 2 rayon threads).
_PIECE_CHARS = 1 << 20
_PIECE_BATCH_CHARS = 8 << 20  # pieces encoded (and reported) per call
_CHARS_PER_TOKEN_BOUND = 16  # documents read for --max-tokens: at most this many chars/token


def prepare_text(
    source: str,
    out_dir: str | os.PathLike | None,
    *,
    tokenizer: str | None,
    vocab_size: int | None,
    seed: int,
    val_fraction: float | None,
    max_tokens: int | None,
    force: bool,
    verbose: bool,
    wait_for_lock: bool,
    source_options: dict[str, Any],
) -> Path:
    """Prepare a text source (built-in or local) into ``out_dir``; reuse it when up to date."""
    vf = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
    if not 0.0 < vf < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, exclusive (got {vf})")

    src = build_source(source, seed, SourceOptions(**source_options))
    if src.split_mode == "given" and val_fraction is not None:
        raise UserError(
            f"--val-fraction does not apply to {source!r}: it has its own validation split"
        )
    spec = tokenizer or src.default_tokenizer
    tok_setting = _tokenizer_setting(spec, vocab_size, src)
    settings = {
        "format_version": FORMAT_VERSION,
        "source": src.kind,
        "fingerprint": src.fingerprint,
        "tokenizer": tok_setting,
        "seed": seed,
        "val_fraction": vf,
        "max_tokens": max_tokens,
    }
    digest = settings_digest(settings)
    out = Path(out_dir) if out_dir is not None else _default_dir(src.name, spec, tok_setting, src)
    with locked(out, wait_for_lock, verbose):
        if not force and up_to_date(out, digest):
            log(f"{out} is up to date (same inputs and settings); reusing it", verbose)
            add_missing_baselines(out, verbose)
            return out
        check_replaceable(out)
        log(f"preparing {source} -> {out}", verbose)
        t0 = time.time()

        def build(tmp: Path) -> None:
            meta = _build_lm(src, tmp, spec, tok_setting, seed, vf, max_tokens, verbose)
            meta.update(baselines_meta(tmp, meta))
            meta.update(
                source_spec=source,
                hash=digest,
                settings=settings,
                seed=seed,
                val_fraction=vf,
                max_tokens=max_tokens,
                prepare_seconds=round(time.time() - t0, 3),
            )
            write_meta(tmp, meta)

        atomic_build(out, build)
    return out


def _file_digest(p: Path) -> str:
    """A given tokenizer.json enters the settings hash by content, not by path."""
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tokenizer_setting(spec: str, vocab_size: int | None, src: Source) -> dict[str, Any]:
    """--tokenizer / --vocab-size checked and resolved into what the settings hash holds."""
    if spec in TOKENIZER_KINDS:
        if spec == "char" and vocab_size is not None:
            raise UserError(
                "--vocab-size does not apply to --tokenizer char (its vocabulary is the data's characters)"
            )
        if spec == "bpe":
            vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        if vocab_size is not None and vocab_size < 1:
            raise UserError(f"--vocab-size must be positive (got {vocab_size})")
        return {"kind": spec, "vocab_size": vocab_size, "chat": src.chat}
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(
            f"--tokenizer: {spec!r} is neither bpe, char, word nor an existing tokenizer.json"
        )
    if vocab_size is not None:
        raise UserError("--vocab-size does not apply to a given tokenizer.json")
    return {"file": str(p.resolve()), "sha256": _file_digest(p)}


def _default_dir(name: str, spec: str, setting: dict[str, Any], src: Source) -> Path:
    """data/<name>, with a suffix when the tokenizer is not the source's default one."""
    if "file" in setting:
        return Path("data") / f"{name}-tok{setting['sha256'][:8]}"
    vocab = setting.get("vocab_size")
    default_vocab = DEFAULT_BPE_VOCAB if spec == "bpe" else None
    suffix = ""
    if spec != src.default_tokenizer or vocab != default_vocab:
        suffix = f"-{spec}" + (str(vocab) if vocab != default_vocab else "")
    return Path("data") / f"{name}{suffix}"


def _split_score(text: str, seed: int) -> float:
    """Uniform in [0, 1) from a seeded hash of the text."""
    h = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()
    )
    return int.from_bytes(h.digest(), "little") / 2.0**64


def _progress(
    total: int | None, desc: str, unit: str, verbose: bool, unit_scale: bool = False
) -> Any:
    """A bar on a terminal; elsewhere a plain line every 10 s (large inputs only); quiet: none."""
    from ..progress import Progress

    return Progress(
        total,
        f"archlab prepare: {desc}",
        unit,
        mode=None if verbose else "off",
        unit_scale=unit_scale,
        leave=False,
    )


def _collect(
    src: Source, seed: int, vf: float, max_tokens: int | None, verbose: bool
) -> tuple[list[Doc], str]:
    """All documents in source order, each with its split; returns (docs, split_mode)."""
    docs: list[Doc] = []
    budget = None if max_tokens is None else max_tokens * _CHARS_PER_TOKEN_BOUND
    chars = 0
    scores: list[float] = []
    with _progress(src.num_docs, "reading", "doc", verbose) as bar:
        for doc in src.docs():
            if doc.split is None:
                score = _split_score(doc.text, seed)
                doc.split = "val" if score < vf else "train"
                scores.append(score)
            docs.append(doc)
            bar.update(1)
            chars += len(doc.text)
            if budget is not None and chars >= budget:
                break
    if not docs:
        raise UserError(f"{src.name}: empty corpus (no non-empty documents)")
    mode = src.split_mode
    if mode == "hash" and len(docs) == 1:  # one document: first part train, tail val
        text = docs[0].text if budget is None else docs[0].text[:budget]
        target = int(len(text) * (1.0 - vf))
        cut = text.rfind("\n", 0, target) + 1 or target
        if cut <= 0 or cut >= len(text) or not text[:cut].strip() or not text[cut:].strip():
            raise UserError(f"{src.name}: a single document too short to split into train and val")
        return [Doc(text[:cut], split="train"), Doc(text[cut:], split="val")], "tail"
    if mode == "hash":  # a small corpus can hash every document into one split
        splits = [d.split for d in docs]
        if "val" not in splits:
            docs[int(np.argmin(scores))].split = "val"
        elif "train" not in splits:
            docs[int(np.argmax(scores))].split = "train"
    return docs, mode


def _train_tokenizer(
    src: Source, docs: list[Doc], spec: str, setting: dict[str, Any], verbose: bool
) -> TextTokenizer:
    """The tokenizer the data is encoded with, fitted on the training split only."""
    if "file" in setting:
        return load_tokenizer(setting["file"])
    train_texts = (d.text for d in docs if d.split == "train")
    if spec == "bpe":
        # Each merge needs a pair seen twice: at most (UTF-8 bytes) / 2 merges, <= 2 per
        # character. A larger request (--vocab-size 1e9) would only exhaust the trainer.
        chars = sum(len(d.text) for d in docs if d.split == "train")
        vocab = min(int(setting["vocab_size"]), 512 + 2 * chars)
        log(f"training byte-level BPE (vocab {vocab}) on the training split", verbose)
        return train_bpe(
            train_texts,
            vocab,
            chat=src.chat,
            show_progress=verbose and sys.stderr.isatty(),
        )
    if spec == "char":  # the alphabet of all splits: no statistics leak, no <unk> in val
        return train_char(d.text for d in docs)
    texts = src.vocab_texts() if src.vocab_texts is not None else train_texts
    return train_word(texts, setting.get("vocab_size"))


def _build_lm(
    src: Source,
    tmp: Path,
    spec: str,
    tok_setting: dict[str, Any],
    seed: int,
    vf: float,
    max_tokens: int | None,
    verbose: bool,
) -> dict[str, Any]:
    """Read, split, fit the tokenizer and write the token files (+ masks) into ``tmp``;
    returns meta.json's data keys (counts, entropy floor, timings)."""
    t0 = time.perf_counter()
    docs, split_mode = _collect(src, seed, vf, max_tokens, verbose)
    t1 = time.perf_counter()
    tok = _train_tokenizer(src, docs, spec, tok_setting, verbose)
    t2 = time.perf_counter()
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    eot = tok.eot_id
    stats = {s: {"tokens": 0, "docs": 0, "loss_tokens": 0, "logp": []} for s in ("train", "val")}
    files = {s: open(tmp / f"{s}.bin", "wb") for s in ("train", "val")}
    masks = {s: open(tmp / f"{s}_mask.bin", "wb") for s in ("train", "val")} if src.chat else {}
    total = 0
    done = False
    try:
        # progress in characters: one document can be the whole corpus (a single .txt file)
        n_chars = sum(len(d.text) for d in docs)
        with _progress(n_chars, "tokenizing", "char", verbose, unit_scale=True) as bar:
            for b in range(0, len(docs), _BATCH_DOCS):
                batch = docs[b : b + _BATCH_DOCS]
                ids_list, mask_list = _encode_docs(tok, batch, eot, bar.update)
                for doc, ids, m in zip(batch, ids_list, mask_list, strict=True):
                    if max_tokens is not None and split_mode == "tail":
                        # one document cut in two: cap each part at its share, token-exact
                        share = 1.0 - vf if doc.split == "train" else vf
                        cap = max(2, round(max_tokens * share))
                        if len(ids) > cap:
                            ids, done = ids[: cap - 1] + [eot], True
                    elif max_tokens is not None and total + len(ids) > max_tokens and total > 0:
                        done = True
                        break
                    st = stats[doc.split]
                    files[doc.split].write(np.asarray(ids, dtype=dtype).tobytes())
                    if m is not None:
                        masks[doc.split].write(np.asarray(m, dtype=np.uint8).tobytes())
                        st["loss_tokens"] += int(sum(m))
                    else:
                        st["loss_tokens"] += len(ids)
                    st["tokens"] += len(ids)
                    st["docs"] += 1
                    if doc.logp is not None:
                        st["logp"].append(doc.logp)
                    total += len(ids)
                if done:
                    break
    finally:
        for f in [*files.values(), *masks.values()]:
            f.close()
    for s in ("train", "val"):
        if stats[s]["tokens"] == 0:
            why = f" (--max-tokens {max_tokens} is too small)" if max_tokens else ""
            raise UserError(f"{src.name}: the {s} split is empty{why}; use more data")
        if stats[s]["loss_tokens"] == 0:
            raise UserError(f"{src.name}: no token of the {s} split counts for the loss")
    tok.save(tmp / "tokenizer.json")
    t3 = time.perf_counter()

    floors: dict[str, float | None] = {}
    for s in ("train", "val"):
        st = stats[s]
        exact = src.has_logp and len(st["logp"]) == st["docs"]
        floors[s] = -math.fsum(st["logp"]) / st["tokens"] if exact else None
    meta: dict[str, Any] = {
        "task": "lm",
        "source": src.kind,
        "name": src.name,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": tok_setting.get("vocab_size"),
        "eot_id": eot,
        "special_tokens": tok.special_tokens,
        "dtype": np.dtype(dtype).name,
        "train_tokens": stats["train"]["tokens"],
        "val_tokens": stats["val"]["tokens"],
        "train_docs": stats["train"]["docs"],
        "val_docs": stats["val"]["docs"],
        "train_loss_tokens": stats["train"]["loss_tokens"],
        "val_loss_tokens": stats["val"]["loss_tokens"],
        "has_mask": src.chat,
        "split": split_mode,
        "entropy_floor": floors["val"],
        "entropy_floor_train": floors["train"],
        "entropy_floor_note": (
            "nats/token: sum of -log p(story) over the val split / its tokens (incl. end-of-text)"
            if floors["val"] is not None
            else None
        ),
        "mean_doc_tokens": round(
            (stats["train"]["tokens"] + stats["val"]["tokens"])
            / (stats["train"]["docs"] + stats["val"]["docs"]),
            3,
        ),
        "truncated_by_max_tokens": done,
        "timings_s": {
            "read": round(t1 - t0, 3),
            "tokenizer": round(t2 - t1, 3),
            "encode": round(t3 - t2, 3),
        },
        "source_info": src.info,
    }
    if src.chat:
        from .sources import CHAT_FORMAT

        meta["chat_format"] = CHAT_FORMAT
    return meta


def _safe_cut(ch: str) -> bool:
    return "!" <= ch <= "~"  # printable, non-space ASCII


def _pieces(text: str, size: int | None = None) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, each cut right after a newline
    whose neighbours are printable non-space ASCII. Every tokenizer here splits there anyway:
    byte-level BPE's pre-tokenizer makes such a newline a token of its own (it joins neither
    the word before nor the one after, and no special token holds a newline), the character
    tokenizer encodes characters, RustGPT's word rules split on whitespace. So the pieces'
    ids, concatenated, are the whole text's (tests/test_data_prepare.py checks all three)."""
    size = size or _PIECE_CHARS
    out: list[str] = []
    start, n = 0, len(text)
    while n - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and not (
            cut + 1 < n and _safe_cut(text[cut - 1]) and _safe_cut(text[cut + 1])
        ):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        out.append(text[start : cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


def _encode_docs(
    tok: TextTokenizer, docs: list[Doc], eot: int, on_chars: Any = None
) -> tuple[list[list[int]], list[list[int] | None]]:
    """Encode a batch; chat documents piece by piece so the mask follows the segments.

    ``on_chars(n)`` is told how many characters are done as encoding proceeds (all of them
    by the end): long documents are encoded in pieces, a few megabytes per call."""
    report = on_chars or (lambda n: None)
    plain = [i for i, d in enumerate(docs) if d.segments is None]
    ids_out: list[list[int]] = [[] for _ in docs]
    masks: list[list[int] | None] = [None] * len(docs)
    if plain:
        # (doc index, piece) in order; pieces of one document are consecutive
        work = [(i, p) for i in plain for p in _pieces(docs[i].text)]
        k = 0
        while k < len(work):
            group, chars = [], 0
            while k < len(work) and (not group or chars + len(work[k][1]) <= _PIECE_BATCH_CHARS):
                group.append(work[k])
                chars += len(work[k][1])
                k += 1
            for (i, _), ids in zip(group, tok.encode_batch([p for _, p in group]), strict=True):
                ids_out[i].extend(ids)
            report(chars)
    seg_docs = [i for i, d in enumerate(docs) if d.segments is not None]
    if seg_docs:
        pieces = [seg for i in seg_docs for seg in docs[i].segments]  # type: ignore[union-attr]
        encoded = tok.encode_batch([p for p, _ in pieces])
        k = 0
        for i in seg_docs:
            ids, m = [], []
            for _text, counts in docs[i].segments:  # type: ignore[union-attr]
                ids.extend(encoded[k])
                m.extend([int(counts)] * len(encoded[k]))
                k += 1
            ids_out[i], masks[i] = ids, m
        report(sum(len(docs[i].text) for i in seg_docs))
    for i, ids in enumerate(ids_out):
        if not ids or ids[-1] != eot:
            ids.append(eot)
            if masks[i] is not None:
                # end-of-text after an answer counts: the model must learn to stop
                masks[i].append(masks[i][-1] if masks[i] else 0)  # type: ignore[index]
    return ids_out, masks

"""prepare: a source -> ``train.bin``/``val.bin`` (+ masks), ``tokenizer.json``, ``meta.json``.

The output is built in a temporary sibling folder and renamed into place when complete, so an
error never leaves a half-written data folder. ``meta.json`` holds a hash of the source's
fingerprint and every setting; a folder whose hash matches is reused as it is.

Splits: documents go to val when a seeded hash of their text falls below ``val_fraction`` (so
identical documents always land in the same split and train/val share no document); sources
with official splits keep them; a corpus that is one single document (e.g. Tiny Shakespeare)
is cut at a line boundary, the first ``1 - val_fraction`` for training, the rest for val.

Token files: each document's tokens followed by end-of-text (unless the document already ends
with it, as RustGPT's ``</s>`` does), uint16 when the vocabulary fits, else uint32.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileSystemError, FolderBusy, UserError
from ..fsutil import errno_reason, is_read_error, lock_folder, os_error_reason, write_errno
from .baselines import BASELINE_KEYS, BASELINES_NOTE, baselines_of_folder
from .sources import BUILTIN_SOURCES, Doc, Source, SourceOptions, build_source
from .tokenizer import TextTokenizer, load_tokenizer, train_bpe, train_char, train_word

FORMAT_VERSION = 1
DEFAULT_BPE_VOCAB = 4096
DEFAULT_VAL_FRACTION = 0.1
STAGE_DEFAULTS = {"language": "stories", "code": "python", "chat": "rustgpt-chat"}
TOKENIZER_KINDS = ("bpe", "char", "word")
_BATCH_DOCS = 512
# A document longer than this is encoded in pieces cut at safe newlines (see _pieces), so
# the progress bar moves within one huge document (a single .txt corpus). The ids are exactly
# those of the whole text; the time is the same (5.6M chars of BPE: 6.47 s whole, 6.30 s in
# pieces, shared 2-core machine, 2 rayon threads).
_PIECE_CHARS = 1 << 20
_PIECE_BATCH_CHARS = 8 << 20  # pieces encoded (and reported) per call
_CHARS_PER_TOKEN_BOUND = 16  # documents read for --max-tokens: at most this many chars/token
_MQAR_OPTIONS = {
    "mqar_vocab_size": "vocab_size",
    "mqar_pairs": "num_kv_pairs",
    "mqar_seq_len": "seq_len",
    "mqar_train_examples": "num_train",
    "mqar_val_examples": "num_val",
    "mqar_power_a": "power_a",
}
_SC_OPTIONS = {
    "sc_vocab_size": "vocab_size",
    "sc_tokens": "num_tokens",
    "sc_seq_len": "seq_len",
    "sc_train_examples": "num_train",
    "sc_val_examples": "num_val",
}
# Tasks whose examples are whole, fixed-length rows (the loader and eval read them aligned).
FIXED_LENGTH_TASKS = ("mqar", "selective-copy")


def log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"archlab prepare: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------

REQUIRED_META = (
    "tokenizer",
    "vocab_size",
    "eot_id",
    "dtype",
    "train_tokens",
    "val_tokens",
    "has_mask",
    "task",
)


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check a prepared folder's meta.json (one-line UserError when bad)."""
    d = Path(data_dir)
    p = d / "meta.json"
    if not p.is_file():
        raise UserError(f"{d}: not a prepared data folder (no meta.json); run `archlab prepare`")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt {p} ({exc}); re-run `archlab prepare --force`") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt {p} (not a JSON object); re-run `archlab prepare --force`")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(
            f"corrupt {p} (missing {', '.join(missing)}); re-run `archlab prepare --force`"
        )
    if meta["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"corrupt {p} (dtype {meta['dtype']!r}); re-run `archlab prepare --force`")
    return meta


def data_files_ok(d: Path, meta: dict[str, Any]) -> str | None:
    """None when every file the meta promises is there with the right size, else the problem."""
    item = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        n = int(meta[f"{split}_tokens"])
        files = [(d / f"{split}.bin", n * item)]
        if meta["has_mask"]:
            files.append((d / f"{split}_mask.bin", n))
        for f, size in files:
            if not f.is_file():
                return f"{f.name} is missing"
            if f.stat().st_size != size:
                return f"{f.name} has {f.stat().st_size} bytes, meta.json expects {size}"
    if not (d / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    return None


def _up_to_date(out: Path, digest: str) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        return (
            isinstance(meta, dict)
            and meta.get("hash") == digest
            and data_files_ok(out, meta) is None
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------------------
# Atomic output folder
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(out: Path, wait: bool = True, verbose: bool = True) -> Iterator[None]:
    """Hold ``out``'s lock (a sibling ``.NAME.lock``) while it is checked and rebuilt.

    ``wait``: serialise concurrent prepares of one folder (parallel trainings that share the
    default data wait for the first); otherwise a second process is refused (exit 2, naming
    the holder's pid). Under the lock, a killed prepare's temporaries are cleaned up.
    """
    lock_path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))  # can we write here?
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"data folder {out}: a part of the path is a file, not a folder") from None
    except OSError as exc:
        raise FileSystemError(
            f"data folder {out}: cannot write in {out.parent} ({os_error_reason(exc)})"
        ) from None
    try:
        lock = lock_folder(out, "data folder", lock_path=lock_path)
    except FolderBusy as busy:
        if not wait:
            raise
        log(f"{busy}; waiting for it", verbose)
        lock = lock_folder(out, "data folder", lock_path=lock_path, wait=True)
    try:
        _clean_stale(out)
        yield
    finally:
        lock.release()


def _clean_stale(out: Path) -> None:
    """Temporaries of a killed prepare: drop half-built folders, restore a swapped-out one."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():  # killed between the two renames of _swap_in: put it back
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise UserError(
            f"--out {out} exists and is not a prepared data folder (no meta.json); "
            "choose another --out or remove it"
        )


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
    except OSError as exc:
        if old is not None and not out.exists():
            os.rename(old, out)
        hint = (
            " (a mount point cannot be replaced: choose a folder inside it as --out)"
            if exc.errno == errno.EBUSY
            else ""
        )
        raise FileSystemError(
            f"cannot put the data in place at {out}: {os_error_reason(exc)}{hint}"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_build(out: Path, build: Any) -> None:
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        build(tmp)
    except BaseException as exc:
        code = None if is_read_error(exc, tmp) else write_errno(exc, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if code is None:
            raise
        kept = (
            f"the previous data in {out} is intact"
            if (out / "meta.json").exists()
            else "nothing was written"
        )
        raise FileSystemError(f"{errno_reason(code)} writing data folder {out}; {kept}") from None
    try:
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------
# Settings, names, hashing
# --------------------------------------------------------------------------------------


def _file_digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tokenizer_setting(spec: str, vocab_size: int | None, src: Source) -> dict[str, Any]:
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


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :24
    ]


def _split_score(text: str, seed: int) -> float:
    """Uniform in [0, 1) from a seeded hash of the text."""
    h = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()
    )
    return int.from_bytes(h.digest(), "little") / 2.0**64


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------


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
    mqar_opts = {k: source_options.pop(k) for k in list(source_options) if k in _MQAR_OPTIONS}
    sc_opts = {k: source_options.pop(k) for k in list(source_options) if k in _SC_OPTIONS}
    unknown = set(source_options) - set(SourceOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"prepare_dataset: unknown options {sorted(unknown)}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2 (got {max_tokens})")
    source = str(source)
    if source != "selective-copy":
        given = [k for k, v in sc_opts.items() if v is not None]
        if given:
            raise UserError(
                f"--{given[0].replace('_', '-')} applies to the selective-copy source only"
            )
    if source == "selective-copy":
        given = [k for k, v in mqar_opts.items() if v is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies to the mqar source only")
        return _prepare_selective_copy(
            out_dir,
            tokenizer,
            vocab_size,
            seed,
            val_fraction,
            max_tokens,
            force,
            verbose,
            sc_opts,
            source_options,
            wait_for_lock,
        )
    if source == "mqar":
        return _prepare_mqar(
            out_dir,
            tokenizer,
            vocab_size,
            seed,
            val_fraction,
            max_tokens,
            force,
            verbose,
            mqar_opts,
            source_options,
            wait_for_lock,
        )
    given = [k for k, v in mqar_opts.items() if v is not None]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} applies to the mqar source only")
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
    digest = _digest(settings)
    out = Path(out_dir) if out_dir is not None else _default_dir(src.name, spec, tok_setting, src)
    with _locked(out, wait_for_lock, verbose):
        if not force and _up_to_date(out, digest):
            log(f"{out} is up to date (same inputs and settings); reusing it", verbose)
            _add_missing_baselines(out, verbose)
            return out
        _check_replaceable(out)
        log(f"preparing {source} -> {out}", verbose)
        t0 = time.time()

        def build(tmp: Path) -> None:
            meta = _build_lm(src, tmp, spec, tok_setting, seed, vf, max_tokens, verbose)
            meta.update(_baselines_meta(tmp, meta))
            meta.update(
                source_spec=source,
                hash=digest,
                settings=settings,
                seed=seed,
                val_fraction=vf,
                max_tokens=max_tokens,
                prepare_seconds=round(time.time() - t0, 3),
            )
            _write_meta(tmp, meta)

        _atomic_build(out, build)
    return out


def _write_meta(d: Path, meta: dict[str, Any]) -> None:
    from .. import __version__

    meta = {"format_version": FORMAT_VERSION, "archlab_version": __version__, **meta}
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (d / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")


def _baselines_meta(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json keys of the data baselines, computed from the token files just written."""
    b = baselines_of_folder(d, meta)
    return {**{k: round(v, 6) for k, v in b.items()}, "baselines_note": BASELINES_NOTE}


def _add_missing_baselines(out: Path, verbose: bool) -> None:
    """A folder prepared by an older archlab: compute its baselines once, store them in its
    meta.json (atomically; under the prepare lock). A read-only folder is left as it is
    (``load_baselines`` computes them on read)."""
    p = out / "meta.json"
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict) or all(k in meta for k in BASELINE_KEYS):
        return
    log("adding the data baselines (unigram, bigram entropy) to meta.json", verbose)
    meta.update(_baselines_meta(out, meta))
    tmp = out / f".meta.json.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, p)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
    if "file" in setting:
        return load_tokenizer(setting["file"])
    train_texts = (d.text for d in docs if d.split == "train")
    if spec == "bpe":
        log(
            f"training byte-level BPE (vocab {setting['vocab_size']}) on the training split",
            verbose,
        )
        return train_bpe(
            train_texts,
            setting["vocab_size"],
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


# --------------------------------------------------------------------------------------
# mqar
# --------------------------------------------------------------------------------------


def _prepare_mqar(
    out_dir: Any,
    tokenizer: str | None,
    vocab_size: int | None,
    seed: int,
    val_fraction: float | None,
    max_tokens: int | None,
    force: bool,
    verbose: bool,
    mqar_opts: dict[str, Any],
    source_options: dict[str, Any],
    wait_for_lock: bool = True,
) -> Path:
    from . import mqar

    for flag, value in (
        ("--tokenizer", tokenizer),
        ("--vocab-size (use --mqar-vocab-size)", vocab_size),
        ("--val-fraction (use --mqar-val-examples)", val_fraction),
        ("--max-tokens (use --mqar-train-examples)", max_tokens),
    ):
        if value is not None:
            raise UserError(f"{flag} does not apply to the mqar source")
    for k, v in source_options.items():
        if v is not None:
            raise UserError(f"--{k.replace('_', '-')} does not apply to the mqar source")
    kw = {_MQAR_OPTIONS[k]: v for k, v in mqar_opts.items() if v is not None}
    cfg = mqar.MQARConfig(**kw).validate()
    settings = {
        "format_version": FORMAT_VERSION,
        "source": "mqar",
        "mqar": cfg.to_dict(),
        "seed": seed,
    }
    digest = _digest(settings)
    default = mqar.MQARConfig()
    name = (
        "mqar"
        if cfg == default
        else f"mqar-v{cfg.vocab_size}-kv{cfg.num_kv_pairs}-len{cfg.seq_len}"
    )
    out = Path(out_dir) if out_dir is not None else Path("data") / name
    with _locked(out, wait_for_lock, verbose):
        if not force and _up_to_date(out, digest):
            log(f"{out} is up to date (same settings); reusing it", verbose)
            _add_missing_baselines(out, verbose)
            return out
        _check_replaceable(out)
        log(f"preparing mqar -> {out}", verbose)
        t0 = time.time()

        def build(tmp: Path) -> None:
            tok = mqar.tokenizer(cfg.vocab_size)
            dtype = np.uint16 if cfg.vocab_size <= 2**16 else np.uint32
            counts = {}
            for split, n, s in (
                ("train", cfg.num_train, seed),
                ("val", cfg.num_val, seed + 1_000_003),
            ):
                tokens, mask = mqar.generate(cfg, n, s)
                tokens.astype(dtype).tofile(tmp / f"{split}.bin")
                mask.tofile(tmp / f"{split}_mask.bin")
                counts[split] = (tokens.size, n, int(mask.sum()))
            tok.save(tmp / "tokenizer.json")
            meta = {
                "task": "mqar",
                "source": "mqar",
                "source_spec": "mqar",
                "name": name,
                "tokenizer": tok.kind,
                "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id,
                "special_tokens": tok.special_tokens,
                "dtype": np.dtype(dtype).name,
                "seq_len": cfg.seq_len,
                "example_tokens": cfg.seq_len + 1,
                "num_kv_pairs": cfg.num_kv_pairs,
                "mqar": cfg.to_dict(),
                "train_tokens": counts["train"][0],
                "val_tokens": counts["val"][0],
                "train_docs": counts["train"][1],
                "val_docs": counts["val"][1],
                "train_loss_tokens": counts["train"][2],
                "val_loss_tokens": counts["val"][2],
                "has_mask": True,
                "split": "generated",
                "entropy_floor": None,
                "metric": "accuracy",
                "hash": digest,
                "settings": settings,
                "seed": seed,
                "prepare_seconds": round(time.time() - t0, 3),
            }
            meta.update(_baselines_meta(tmp, meta))
            _write_meta(tmp, meta)

        _atomic_build(out, build)
    return out


def _prepare_selective_copy(
    out_dir: Any,
    tokenizer: str | None,
    vocab_size: int | None,
    seed: int,
    val_fraction: float | None,
    max_tokens: int | None,
    force: bool,
    verbose: bool,
    sc_opts: dict[str, Any],
    source_options: dict[str, Any],
    wait_for_lock: bool = True,
) -> Path:
    """MAD's selective copying as prepared data, in the same aligned format as mqar."""
    from . import selective_copy

    for flag, value in (
        ("--tokenizer", tokenizer),
        ("--vocab-size (use --sc-vocab-size)", vocab_size),
        ("--val-fraction (use --sc-val-examples)", val_fraction),
        ("--max-tokens (use --sc-train-examples)", max_tokens),
    ):
        if value is not None:
            raise UserError(f"{flag} does not apply to the selective-copy source")
    for k, v in source_options.items():
        if v is not None:
            raise UserError(f"--{k.replace('_', '-')} does not apply to the selective-copy source")
    kw = {_SC_OPTIONS[k]: v for k, v in sc_opts.items() if v is not None}
    cfg = selective_copy.SelectiveCopyConfig(**kw).validate()
    settings = {
        "format_version": FORMAT_VERSION,
        "source": "selective-copy",
        "selective_copy": cfg.to_dict(),
        "seed": seed,
    }
    digest = _digest(settings)
    name = (
        "selective-copy"
        if cfg == selective_copy.SelectiveCopyConfig()
        else f"selective-copy-v{cfg.vocab_size}-k{cfg.num_tokens}-len{cfg.seq_len}"
    )
    out = Path(out_dir) if out_dir is not None else Path("data") / name
    with _locked(out, wait_for_lock, verbose):
        if not force and _up_to_date(out, digest):
            log(f"{out} is up to date (same settings); reusing it", verbose)
            return out
        _check_replaceable(out)
        log(f"preparing selective-copy -> {out}", verbose)
        t0 = time.time()

        def build(tmp: Path) -> None:
            tok = selective_copy.tokenizer(cfg.vocab_size)
            dtype = np.uint16 if cfg.vocab_size <= 2**16 else np.uint32
            counts = {}
            for split, n, s in (
                ("train", cfg.num_train, seed),
                ("val", cfg.num_val, seed + 1_000_003),
            ):
                tokens, mask = selective_copy.generate(cfg, n, s)
                tokens.astype(dtype).tofile(tmp / f"{split}.bin")
                mask.tofile(tmp / f"{split}_mask.bin")
                counts[split] = (tokens.size, n, int(mask.sum()))
            tok.save(tmp / "tokenizer.json")
            _write_meta(
                tmp,
                {
                    "task": "selective-copy",
                    "source": "selective-copy",
                    "source_spec": "selective-copy",
                    "name": name,
                    "tokenizer": tok.kind,
                    "vocab_size": tok.vocab_size,
                    "eot_id": tok.eot_id,
                    "special_tokens": tok.special_tokens,
                    "dtype": np.dtype(dtype).name,
                    "seq_len": cfg.seq_len,
                    "example_tokens": cfg.seq_len + 1,
                    "num_tokens_to_copy": cfg.num_tokens,
                    "selective_copy": cfg.to_dict(),
                    "train_tokens": counts["train"][0],
                    "val_tokens": counts["val"][0],
                    "train_docs": counts["train"][1],
                    "val_docs": counts["val"][1],
                    "train_loss_tokens": counts["train"][2],
                    "val_loss_tokens": counts["val"][2],
                    "has_mask": True,
                    "split": "generated",
                    "entropy_floor": None,
                    "metric": "accuracy",
                    "hash": digest,
                    "settings": settings,
                    "seed": seed,
                    "prepare_seconds": round(time.time() - t0, 3),
                },
            )

        _atomic_build(out, build)
    return out


# --------------------------------------------------------------------------------------
# resolve_data: what --data means for train / compare / eval
# --------------------------------------------------------------------------------------


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
    if m.get("task") == "selective-copy":
        parts.append(
            f"selective copying: {m['num_tokens_to_copy']} tokens to copy, sequences of "
            f"{m['seq_len']} tokens, metric accuracy"
        )
    if m.get("task") == "mqar":
        parts.append(
            f"MQAR: {m['num_kv_pairs']} pairs, sequences of {m['seq_len']} tokens, metric accuracy"
        )
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

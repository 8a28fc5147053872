"""A prepared data folder: its meta.json, its lock and its atomic rebuild.

Every kind of data (a text corpus in data/corpus.py, a generated task in data/generated.py)
is written the same way: under the folder's lock (a sibling ``.NAME.lock``), into a
temporary sibling folder that is renamed into place when complete, so an error or a kill
never leaves a half-written folder. ``meta.json`` holds a hash of every setting that made the
data (``settings_digest``); a folder whose hash matches is reused as it is, and its data
baselines (unigram and bigram entropy) are stored in it when an older archlab left them out,
and read from it by :func:`load_baselines` (the arithmetic is ``baselines.py``'s).
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileSystemError, FolderBusy, UserError
from ..fsutil import errno_reason, is_read_error, lock_folder, os_error_reason, write_errno
from .baselines import BASELINE_KEYS, BASELINES_NOTE, baselines_of_folder

FORMAT_VERSION = 1


def log(msg: str, verbose: bool) -> None:
    """One ``archlab prepare: ...`` line on stderr (nothing when quiet)."""
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


def up_to_date(out: Path, digest: str) -> bool:
    """``out`` was prepared with these settings (same hash) and every file is whole."""
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
def locked(out: Path, wait: bool = True, verbose: bool = True) -> Iterator[None]:
    """Hold ``out``'s lock (a sibling ``.NAME.lock``, deleted on release) while it is checked
    and rebuilt.

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
        lock = lock_folder(out, "data folder", lock_path=lock_path, remove=True)
    except FolderBusy as busy:
        if not wait:
            raise
        log(f"{busy}; waiting for it", verbose)
        lock = lock_folder(out, "data folder", lock_path=lock_path, wait=True, remove=True)
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


def check_replaceable(out: Path) -> None:
    """Refuse to replace a file or a non-empty folder that is not prepared data."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise UserError(
            f"--out {out} exists and is not a prepared data folder (no meta.json); "
            "choose another --out or remove it"
        )


def _swap_in(tmp: Path, out: Path) -> None:
    """Two renames (out -> .old, tmp -> out); the old folder comes back if the second fails."""
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


def atomic_build(out: Path, build: Callable[[Path], None]) -> None:
    """``build(tmp)`` fills a fresh temporary sibling of ``out``, which then replaces ``out``.

    A write error (disk full, read-only) ends in one FileSystemError line saying whether the
    previous data is intact; anything else propagates with the temporary removed."""
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


def settings_digest(settings: dict[str, Any]) -> str:
    """The hash stored in meta.json: equal settings (and source fingerprint) -> reuse."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :24
    ]


def max_token_id(path: Path, dtype: str) -> int:
    """The largest token id in a token file (-1 when it is empty), in chunks of 64 M tokens."""
    n = path.stat().st_size // np.dtype(dtype).itemsize
    if n == 0:
        return -1
    tokens = np.memmap(path, dtype=dtype, mode="r")
    step = 1 << 26
    return max(int(tokens[i : i + step].max()) for i in range(0, n, step))


def write_meta(d: Path, meta: dict[str, Any]) -> None:
    """meta.json with the format and archlab versions first and the creation time."""
    from .._version import __version__

    meta = {"format_version": FORMAT_VERSION, "archlab_version": __version__, **meta}
    for split in ("train", "val"):  # checked against the vocabulary when the folder is opened
        meta[f"{split}_max_id"] = max_token_id(d / f"{split}.bin", meta["dtype"])
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (d / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")


def baselines_meta(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json keys of the data baselines, computed from the token files just written."""
    b = baselines_of_folder(d, meta)
    return {**{k: round(v, 6) for k, v in b.items()}, "baselines_note": BASELINES_NOTE}


def add_missing_baselines(out: Path, verbose: bool) -> None:
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
    meta.update(baselines_meta(out, meta))
    tmp = out / f".meta.json.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, p)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _stored(meta: dict[str, Any]) -> dict[str, float] | None:
    vals = {k: meta.get(k) for k in BASELINE_KEYS}
    if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals.values()):
        return {k: float(v) for k, v in vals.items()}  # type: ignore[arg-type]
    return None


def load_baselines(data_dir: str | os.PathLike) -> dict[str, float]:
    """The folder's ``{"unigram_entropy", "bigram_entropy"}`` (nats/token).

    Read from meta.json when ``prepare`` stored them; for a folder prepared by an older archlab
    (no such keys) they are computed from its token files on every call and nothing is written
    back, so a folder shared or read-only is never modified and no stale value is cached.
    """
    meta = load_meta(data_dir)
    stored = _stored(meta)
    if stored is not None:
        return stored
    problem = data_files_ok(Path(data_dir), meta)
    if problem:
        raise UserError(
            f"data folder {data_dir} is incomplete ({problem}); re-run `archlab prepare --force`"
        )
    return baselines_of_folder(data_dir, meta)

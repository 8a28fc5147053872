"""Local corpora: .txt, .jsonl and .parquet files, given as a file, a folder or a glob.

* ``.txt``: documents separated by ``<|endoftext|>`` (``--doc-separator``; an empty separator
  keeps each file whole), each stripped of surrounding whitespace, empty ones dropped.
* ``.jsonl``: one JSON object per line, the document in ``--text-field`` (default ``text``).
* ``.parquet``: the ``--text-field`` column (needs ``pyarrow``).

Bytes must be UTF-8: otherwise a :class:`UserError` names the file and the byte offset, and
``--errors replace`` substitutes U+FFFD and goes on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .documents import Doc, Source

SUPPORTED = (".txt", ".jsonl", ".parquet")
DEFAULT_SEPARATOR = "<|endoftext|>"
DEFAULT_TEXT_FIELD = "text"
_GENERIC_STEMS = {"input", "data", "train", "text", "corpus", "all", "dataset"}


def find_files(spec: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob -> sorted supported files."""
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED:
            raise UserError(
                f"{spec}: unsupported file type {p.suffix!r} (supported: .txt, .jsonl, .parquet)"
            )
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED)
        if not files:
            raise UserError(f"{spec}: folder has no .txt, .jsonl or .parquet files")
        return files
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [m for m in matches if m.is_file() and m.suffix.lower() in SUPPORTED]
        if not files:
            raise UserError(f"{spec}: no .txt, .jsonl or .parquet files match this pattern")
        return files
    raise UserError(f"no such file or folder: {spec}")


def default_name(spec: str, files: list[Path]) -> str:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p.resolve().name or "files"
    if p.is_file():
        stem = p.stem
        if stem.lower() in _GENERIC_STEMS and p.resolve().parent.name:
            return p.resolve().parent.name
        return stem
    prefix = Path(os.path.commonpath([str(f.resolve()) for f in files]))
    return (prefix.name if prefix.is_dir() else prefix.parent.name) or "files"


def decode_bytes(data: bytes, path: Path, errors: str, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8", errors="replace" if errors == "replace" else "strict")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: invalid UTF-8 at byte offset {base_offset + exc.start}; "
            "pass --errors replace to substitute U+FFFD and go on"
        ) from None


def unescape_separator(sep: str) -> str:
    """Let ``--doc-separator '\\n\\n'`` mean two newlines."""
    return sep.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def read_txt(path: Path, separator: str, errors: str) -> Iterator[str]:
    text = decode_bytes(path.read_bytes(), path, errors)
    parts = text.split(separator) if separator else [text]
    for part in parts:
        doc = part.strip()
        if doc:
            yield doc


def read_jsonl(path: Path, field: str, errors: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = decode_bytes(raw, path, errors, base_offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise UserError(
                    f"{path}:{lineno}: no {field!r} field (choose one with --text-field)"
                )
            value = obj[field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: field {field!r} is not a string")
            if value.strip():
                yield value


def read_parquet(path: Path, field: str, errors: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise UserError(
            f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})"
        ) from None
    if field not in schema.names:
        cols = ", ".join(schema.names)
        raise UserError(
            f"{path}: no {field!r} column (columns: {cols}; choose one with --text-field)"
        )
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(columns=[field], batch_size=8192):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if isinstance(value, bytes):
                value = decode_bytes(value, path, errors)
            if not isinstance(value, str):
                raise UserError(f"{path}: column {field!r} does not hold text")
            if value.strip():
                yield value


def local_source(
    spec: str,
    doc_separator: str | None = None,
    text_field: str | None = None,
    errors: str = "strict",
) -> Source:
    files = find_files(spec)
    sep = DEFAULT_SEPARATOR if doc_separator is None else unescape_separator(doc_separator)
    field = text_field or DEFAULT_TEXT_FIELD
    exts = {f.suffix.lower() for f in files}
    if doc_separator is not None and ".txt" not in exts:
        raise UserError("--doc-separator applies to .txt files only")
    if text_field is not None and not exts & {".jsonl", ".parquet"}:
        raise UserError("--text-field applies to .jsonl and .parquet files only")
    digests = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
        digests.append([f.name, h.hexdigest()])

    def docs() -> Iterator[Doc]:
        for f in files:
            ext = f.suffix.lower()
            if ext == ".txt":
                texts = read_txt(f, sep, errors)
            elif ext == ".jsonl":
                texts = read_jsonl(f, field, errors)
            else:
                texts = read_parquet(f, field, errors)
            for t in texts:
                yield Doc(t)

    return Source(
        name=default_name(spec, files),
        kind="files",
        fingerprint={
            "files": digests,
            "doc_separator": sep if ".txt" in exts else None,
            "text_field": field if exts & {".jsonl", ".parquet"} else None,
            "errors": errors,
        },
        docs=docs,
        info={"files": [str(f) for f in files]},
    )

"""The folder an export writes: checked, locked, built beside the target and swapped in.

An export never deletes what it did not write. ``--out`` is refused when it is empty, is or
contains the checkpoint or the current directory, is a mount point, or (with ``--force``) is
a non-empty folder without the marker of an earlier export. The new folder is written as a
hidden sibling (``.NAME.tmp-PID``), verified there, and only then renamed over the old one;
a failure at any point leaves ``--out`` as it was. A lock beside the target
(``.NAME.lock``, removed afterwards) refuses a second export to the same folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import FileSystemError, UserError
from ..fsutil import errno_reason, lock_beside, write_errno

# Written into every export (since the first version): the mark of "a folder export wrote".
MARKER = "archlab_config.json"
# What an export folder may hold; anything else in it is the user's and is never deleted.
EXPORT_FILES = frozenset(
    {
        MARKER,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_own_export(folder: Path) -> bool:
    """``folder`` holds the marker of an earlier export and nothing an export does not write."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    names = {p.name for p in entries}
    return (
        MARKER in names
        and names <= EXPORT_FILES
        and all(p.is_file() and not p.is_symlink() for p in entries)
    )


def check_out(out: str | os.PathLike, checkpoint: Path, force: bool) -> Path:
    """The export target, or a one-line UserError saying why ``--out`` cannot be written."""
    if not str(out).strip():
        raise UserError("--out: empty value; give the folder to write the export to")
    path = Path(out).expanduser()
    real = path.resolve()
    ckpt = checkpoint.resolve()
    if _inside(ckpt, real):
        raise UserError(
            f"--out {path} is or contains the checkpoint {checkpoint}; choose another folder"
        )
    if _inside(Path.cwd().resolve(), real):
        raise UserError(f"--out {path} is or contains the current directory; choose a new folder")
    if real == Path(real.anchor) or os.path.ismount(real):
        raise UserError(f"--out {path} is a mount point; export into a new folder inside it")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"--out {path} exists and is not a folder; choose another folder")
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as exc:
            raise FileSystemError(
                f"--out {path}: cannot read it ({errno_reason(exc.errno or 5)})"
            ) from None
        if not empty:
            if not force:
                raise UserError(
                    f"--out {path} exists and is not empty (use --force to replace an earlier "
                    "export)"
                )
            if not is_own_export(path):
                raise UserError(
                    f"--out {path} holds files an export did not write (no {MARKER}, or other "
                    "files beside it); --force replaces only an earlier export: choose another "
                    "folder"
                )
    return path


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """Lock ``out``, yield a fresh hidden sibling to write into; the caller then ``swap_in``s.

    Whatever fails inside (a full disk, a failed verification, Ctrl-C) removes the sibling
    and leaves ``out`` untouched; a write error becomes one FileSystemError line.
    """
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {out}: a parent of it is a file, not a folder") from None
    except OSError as exc:
        raise FileSystemError(
            f"--out {out}: cannot create {parent} ({errno_reason(exc.errno or 5)})"
        ) from None
    with lock_beside(out, "export folder"):
        _remove_stale(parent, out.name)
        tmp = parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            yield tmp
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            code = write_errno(exc, tmp)
            if code is None or isinstance(exc, UserError):
                raise
            raise FileSystemError(
                f"{errno_reason(code)} writing the export to {out}; "
                + ("the earlier export there is intact" if out.exists() else "nothing was written")
            ) from None


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an earlier export there is moved aside first
    and deleted only after the new folder is in place."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(parent: Path, name: str) -> None:
    """Temporaries of killed exports to the same folder (we hold its lock: none is live)."""
    for p in parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(parent.glob(f".{name}.old-*")):
        if not (parent / name).exists():  # killed between the two renames: put it back
            os.replace(p, parent / name)
        else:
            shutil.rmtree(p, ignore_errors=True)
    legacy = parent / f".{name}.tmp"  # the name earlier versions used
    if legacy.is_dir() and is_own_export(legacy):
        shutil.rmtree(legacy, ignore_errors=True)

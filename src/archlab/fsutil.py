"""File-system safety shared by train, compare, prepare and bench.

* ``lock_folder``: an advisory ``flock`` on a lock file, held for a process's life. The kernel
  drops it when the process dies (even by SIGKILL), so a crash never leaves a folder stuck;
  a second process is refused with one line naming the holder's pid.
* ``ensure_writable_dir``: create an output folder and prove it is writable before any
  expensive work, so a read-only or foreign folder fails in one line at the start.
* ``write_errno`` / ``os_error_reason``: the errno behind a failed write, also when a library
  hid it (safetensors' ``SafetensorError``, ``torch.save``'s "unexpected pos", numpy's
  "requested and 0 written"), as the one-line text the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from .errors import FileSystemError, FolderBusy, UserError

LOCK_NAME = ".archlab.lock"
# Fewer bytes than this left on the file system after a failed write: the disk was full.
_FULL_BELOW = 1 << 20
_ERRNO_TEXT = (
    (errno.ENOSPC, ("no space left on device", "os error 28")),
    (errno.EDQUOT, ("disk quota exceeded", "os error 122")),
    (errno.EROFS, ("read-only file system", "os error 30")),
    (errno.EACCES, ("permission denied", "os error 13")),
)


# ---- messages -----------------------------------------------------------------------------
def errno_reason(code: int) -> str:
    """'no space left on device' for ENOSPC: strerror in lower case."""
    return os.strerror(code).lower()


def os_error_reason(exc: BaseException) -> str:
    """The cause of an OSError in a few words (its errno's message, else its text)."""
    if isinstance(exc, OSError) and exc.errno:
        return errno_reason(exc.errno)
    text = " ".join(str(exc).split())
    return text[:160] or type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """'no space left on device: /runs/x/summary.json' (both paths for a rename)."""
    reason = os_error_reason(exc)
    if exc.filename is not None and exc.filename2 is not None:
        return f"{reason}: {exc.filename} -> {exc.filename2}"
    if exc.filename is not None:
        return f"{reason}: {exc.filename}"
    return reason


def available_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def is_read_error(exc: BaseException, written: Path) -> bool:
    """An OSError about a file outside ``written`` (the folder being written): a read failed."""
    if not isinstance(exc, OSError) or exc.filename is None:
        return False
    try:
        Path(os.fsdecode(exc.filename)).resolve().relative_to(Path(written).resolve())
    except ValueError:
        return True
    return False


def write_errno(exc: BaseException, where: Path) -> int | None:
    """The errno of a failed write into ``where``, or None when it was not a file-system error.

    Libraries that write files themselves do not always raise OSError: safetensors raises
    ``SafetensorError("... No space left on device (os error 28)")`` and ``torch.save`` a
    RuntimeError ("unexpected pos 576 vs 534"). Their text is searched for a known cause, and
    failing that a file system with (almost) no space left means the disk was full.
    """
    if not isinstance(exc, Exception):
        return None  # KeyboardInterrupt, SystemExit: not a write failure
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc).lower()
    for code, needles in _ERRNO_TEXT:
        if any(n in text for n in needles):
            return code
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
        free = available_bytes(where)
        if free is not None and free < _FULL_BELOW:
            return errno.ENOSPC
        if isinstance(exc, OSError):
            return errno.EIO
    return None


# ---- output folders -----------------------------------------------------------------------
def ensure_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (and parents) and check a file can be written in it; one line if not."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is an existing file, not a folder; choose another {flag}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file
        raise UserError(
            f"{flag} {p}: {_file_in_path(p)} is a file, not a folder; choose another {flag}"
        ) from None
    except OSError as exc:
        raise FileSystemError(
            f"{flag} {p}: cannot create the folder ({os_error_reason(exc)})"
        ) from None
    probe = p / f".archlab-write-test-{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as exc:
        raise FileSystemError(f"{flag} {p}: cannot write there ({os_error_reason(exc)})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return p


def readable_like_the_others(folder: Path) -> None:
    """safetensors writes its files 0600 (a temporary file's mode); give every file in
    ``folder`` the mode the process's umask gives any other file, so another user can read
    an exported model or a checkpoint like the JSON files beside it."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(0o666 & ~umask)


def _file_in_path(p: Path) -> Path:
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return p


# ---- locks --------------------------------------------------------------------------------
class FolderLock:
    """An exclusive flock held until ``release()`` or the process's end."""

    def __init__(self, path: Path, fd: int | None, remove: bool = False) -> None:
        self.path = path
        self._fd = fd
        self._remove = remove  # a lock file beside the folder: deleted while still held

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            if self._remove:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def lock_folder(
    folder: str | os.PathLike,
    what: str,
    *,
    lock_path: str | os.PathLike | None = None,
    wait: bool = False,
    remove: bool = False,
) -> FolderLock:
    """Take ``folder``'s lock (``folder/.archlab.lock`` unless ``lock_path``).

    Busy: FolderBusy naming the holder's pid, or with ``wait`` block until it is free.
    The pid is written into the file only after the lock is ours, so a refused process never
    overwrites the holder's. ``remove``: the lock file (a ``.NAME.lock`` beside the folder)
    is deleted on release; a process that locked the deleted file then tries again on the
    new one, so two processes never both hold the lock. (A killed holder leaves the file:
    the next lock takes it over.)
    """
    while True:
        lock = _lock_once(folder, what, lock_path, wait, remove)
        if not remove or lock._fd is None or _same_file(lock._fd, lock.path):
            return lock
        os.close(lock._fd)  # we locked a file its holder deleted on release: try again


def lock_beside(folder: str | os.PathLike, what: str, wait: bool = False) -> FolderLock:
    """The lock of a folder that may not exist yet: ``.NAME.lock`` in its parent, deleted on
    release (used by export and prepare)."""
    folder = Path(folder)
    lock_path = folder.parent / f".{folder.name}.lock"
    return lock_folder(folder, what, lock_path=lock_path, wait=wait, remove=True)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_once(
    folder: str | os.PathLike,
    what: str,
    lock_path: str | os.PathLike | None,
    wait: bool,
    remove: bool,
) -> FolderLock:
    folder = Path(folder)
    path = Path(lock_path) if lock_path is not None else folder / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; atomic renames still protect files
        return FolderLock(path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FileSystemError(f"cannot lock {what} {folder} ({os_error_line(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(
            f"{what} {folder} is in use by another archlab process (pid {lock_holder(path)}); "
            "wait for it to finish or choose another folder"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the lock holds without the pid (e.g. a full disk); messages then say "unknown"
    return FolderLock(path, fd, remove)

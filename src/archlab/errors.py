"""User-facing errors: the CLI prints their message as one line and exits with their code.

Exit codes: 2 for a usage error (a bad flag or file the user can fix), 1 for a failure of the
machine or file system (disk full, read-only, no permission), 130 / 143 for SIGINT / SIGTERM.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, corrupt checkpoint): exit 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration a user asked for is invalid; the message is one line for the CLI."""


class FileSystemError(UserError):
    """The file system refused a write or read (disk full, read-only, permission): exit 1."""

    exit_code = 1


class NothingToDo(UserError):
    """The command would change nothing (a finished run resumed with no larger budget): the
    CLI prints the message as one line and exits 0."""

    exit_code = 0


class FolderBusy(UserError):
    """Another live process holds the lock of a run, comparison or data folder: exit 2."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT / SIGTERM) ended the command; exit 128 + the signal number."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message = message
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


# ---- out of memory ----------------------------------------------------------------------------
_OOM_NEEDLES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError, or torch's RuntimeError from an allocator that
    could not allocate ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory")."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(n in text for n in _OOM_NEEDLES)


def out_of_memory_line(exc: BaseException, lower: str) -> str:
    """'out of memory: one allocation of 37.3 TiB failed; lower --d-model ...' (one line)."""
    import re

    text = str(exc)
    asked = None
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        asked = _bytes(int(m.group(1)))
    else:
        m = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGTP]i?B)", text)
        asked = m.group(1) if m else None
    what = f"one allocation of {asked} failed" if asked else "an allocation failed"
    return f"out of memory: {what}; {lower}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"

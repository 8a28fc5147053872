"""Standard streams a command can lose: closed (``>&-``), on a full device (``2>/dev/full``)
or a reader gone. Progress and notices that cannot be written must never end a run.

``guard_streams`` (called by ``cli.main``) first gives a closed descriptor 0/1/2 ``/dev/null``,
so a file opened later can never take its number and receive the program's output; then
it wraps ``sys.stderr`` (and, for commands whose results are files, ``sys.stdout``) so that
a failed write silences that stream instead of raising.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

# Commands whose standard output is the result itself: a write that fails there is an error.
RESULT_ON_STDOUT = frozenset({"generate", "chat", "eval", "summary", "export"})


class QuietOnFailure(io.TextIOBase):
    """A text stream that stops writing (silently) after its first failed write."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.failed = False

    def write(self, text: str) -> int:  # type: ignore[override]
        if not self.failed:
            try:
                self._stream.write(text)
            except (OSError, ValueError):  # ENOSPC, EBADF, EPIPE, a closed file object
                self.failed = True
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.failed = True

    def isatty(self) -> bool:
        try:
            return not self.failed and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self._stream, name)


def closed_descriptors() -> list[int]:
    """The standard descriptors (0, 1, 2) the process was started without."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    return closed


def guard_streams(command: str | None) -> tuple[list[int], Callable[[], None]]:
    """(the descriptors that were closed, a function restoring sys.stdout/sys.stderr)."""
    closed = closed_descriptors()
    for fd in closed:
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:
            continue
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    saved = (sys.stdout, sys.stderr)
    if 2 in closed or sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    if 1 in closed or sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = QuietOnFailure(sys.stderr)  # type: ignore[assignment]
    if command not in RESULT_ON_STDOUT:
        sys.stdout = QuietOnFailure(sys.stdout)  # type: ignore[assignment]

    def restore() -> None:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, QuietOnFailure):
                stream.flush()
        sys.stdout, sys.stderr = saved

    return closed, restore

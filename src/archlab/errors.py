"""User-facing errors: the CLI prints their message as one line and exits with their code.

Exit codes: 2 for a usage error (a bad flag or file the user can fix), 1 for a failure of the
machine or file system (disk full, read-only, no permission), 130 / 143 for SIGINT / SIGTERM.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, corrupt checkpoint): exit 2."""

    exit_code = 2


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

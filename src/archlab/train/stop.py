"""Stop signals of a training run: the first SIGINT/SIGTERM stops after the step and saves."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import Interrupted
from . import checkpoint as ckpt_mod

# ---- stop signals ----------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A repeat of the stop signal this soon after the first is the same request delivered twice
# (a terminal's Ctrl-C reaches the whole process group, and torchrun or `archlab compare`
# forward it again); a later one aborts.
REPEAT_WINDOW_S = 1.0


def _line_start() -> bytes:
    """On a terminal the cursor sits on the progress bar's line (after the terminal's ^C):
    return to its start and clear it, so the notice gets a line of its own and the bar
    redraws below it."""
    try:
        return b"\r\x1b[K" if os.isatty(2) else b""
    except OSError:
        return b""


class StopRequest:
    """SIGINT / SIGTERM handler: the first asks the loop to stop after the current optimizer
    step and save; a second one (after REPEAT_WINDOW_S) aborts at once.

    An abort raises Interrupted wherever the process is, also inside a checkpoint write:
    the atomic write then removes its temporary folder and the previous checkpoint stays.
    ``run_dir`` (set once the run has a folder) names the last checkpoint in that message;
    ``is_main``: only rank 0 prints.
    """

    def __init__(self, is_main: bool = True, run_dir: Path | None = None) -> None:
        self.is_main = is_main
        self.run_dir = run_dir
        self.signum: int | None = None
        self.at = 0.0
        self.aborting = False
        self._previous: dict[int, Any] = {}

    def vote(self) -> float:
        """This rank's stop vote: 0 (go on), 1 (SIGINT) or 1024 (SIGTERM). Votes are summed
        over ranks, and the sum still tells which signal (exact in float32 up to 16k ranks)."""
        return {None: 0.0, signal.SIGINT: 1.0}.get(self.signum, 1024.0)

    @staticmethod
    def signal_of(votes: float) -> int:
        """The signal a positive sum of votes stands for (SIGTERM wins)."""
        return signal.SIGTERM if votes >= 1024 else signal.SIGINT

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live on the main thread; an embedding caller keeps its own
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # e.g. SIGINT in a shell's background job: the launcher wants it ignored
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.at = signum, now
            if self.is_main:
                # os.write, not print: the handler may interrupt a print to stderr
                os.write(
                    2,
                    _line_start()
                    + f"archlab train: {name}: finishing the current step, then saving a "
                    f"checkpoint (send {name} again to abort without saving)\n".encode(),
                )
            return
        if now - self.at < REPEAT_WINDOW_S or self.aborting:
            return  # a duplicate, or the abort is already unwinding (let its cleanup finish)
        self.aborting = True
        last = ckpt_mod.latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        raise Interrupted(
            f"aborted by a second {name}; "
            + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written"),
            signum,
        )

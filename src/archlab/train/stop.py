"""Stop signals of a training run: the first SIGINT/SIGTERM stops after the step and saves."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import Interrupted
from . import checkpoint as ckpt_mod

if TYPE_CHECKING:
    from .trainer import Trainer

# ---- stop signals ----------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A repeat of the stop signal this soon after the first is the same request delivered twice
# (a terminal's Ctrl-C reaches the whole process group, and torchrun or `archlab compare`
# forward it again); a later one aborts.
REPEAT_WINDOW_S = 1.0


class StopRequest:
    """SIGINT / SIGTERM handler: the first asks the loop to stop after the current optimizer
    step and save; a second one (after REPEAT_WINDOW_S) aborts at once.

    An abort raises Interrupted wherever the process is, also inside a checkpoint write:
    the atomic write then removes its temporary folder and the previous checkpoint stays.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.signum: int | None = None
        self.at = 0.0
        self.aborting = False
        self._previous: dict[int, Any] = {}

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
        t = self.trainer
        if self.signum is None:
            self.signum, self.at = signum, now
            if t.dist.is_main:
                # os.write, not print: the handler may interrupt a print to stderr
                os.write(
                    2,
                    f"archlab train: {name}: finishing the current step, then saving a "
                    f"checkpoint (send {name} again to abort without saving)\n".encode(),
                )
            return
        if now - self.at < REPEAT_WINDOW_S or self.aborting:
            return  # a duplicate, or the abort is already unwinding (let its cleanup finish)
        self.aborting = True
        last = ckpt_mod.latest_checkpoint(t.run_dir) if t.run_dir is not None else None
        raise Interrupted(
            f"aborted by a second {name}; "
            + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written"),
            signum,
        )

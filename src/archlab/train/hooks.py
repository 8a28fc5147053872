"""Test-only fault injection for a training run (hidden CLI flags of ``archlab train``).

The interrupt, resume and divergence tests need a run to fail at a known point: a NaN loss
at given steps, a SIGKILL right after a step, a slow step or a slow checkpoint write so a
signal lands mid-way. The parts take the one setting they need, not this object.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass
class DebugHooks:
    """Test-only fault injection (hidden CLI flags): poison steps, kill the process."""

    nan_at_steps: frozenset[int] = frozenset()  # 1-based optimizer steps whose loss becomes NaN
    sigkill_at_step: int | None = None  # SIGKILL self right after this step (and its checkpoint)
    step_delay_s: float = 0.0  # sleep after every step (lets a test signal a run mid-way)
    save_delay_s: float = 0.0  # sleep inside every checkpoint write (a test aborts a save)
    flops_per_s: float | None = None  # the pre-run estimate's throughput, instead of timing it

    def after_step(self, step: int) -> None:
        """Called by the loop once step ``step`` (and its eval/checkpoint) is done."""
        if self.sigkill_at_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

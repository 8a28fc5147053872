"""The trainer's progress sink: start banner, a live bar per optimizer step, plain log lines.

The trainer calls it at its logging points only (start, every step, every log interval,
every evaluation, warnings, end), so the loop itself stays about training. What is shown:

- before the first step: the model summary (``archlab summary``'s format), the run folder
  and the step budget;
- on a terminal: a tqdm bar updated every optimizer step with steps, elapsed, ETA, loss,
  learning rate and tokens/s (``TrainProgress.step``);
- elsewhere: one line after the first step (a slow run shows it is alive and its ETA at
  once) and one per log interval, ``step 40/100 loss 5.1234 lr 1.00e-03 7,193 tok/s
  elapsed 00:12 eta 00:18`` (``archlab compare`` parses the ``step N/M `` prefix), and
  ``step 40: val loss 5.0000`` after each evaluation;
- with ``--quiet``: nothing but warnings (non-finite steps), which always print.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..progress import Progress, eta_seconds, format_duration, progress_mode


class TrainProgress:
    def __init__(
        self,
        *,
        total_steps: int,
        initial_step: int,
        tokens_per_step: int,
        desc: str,
        log_interval: int = 1,
        mode: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode if mode is not None else progress_mode(stream=self.stream)
        self.total = total_steps
        self.initial = initial_step
        self.tokens_per_step = tokens_per_step
        self.desc = desc
        self.log_interval = max(1, log_interval)
        self.t0 = time.monotonic()
        self.tok_s: float | None = None  # smoothed per-step tokens/s for the bar
        self.bar: Progress | None = None

    def start(self, model_summary: str, run_dir: Path | str | None, note: str = "") -> None:
        """The banner: model summary, run folder, budget; then the bar (terminal only)."""
        if self.mode == "off":
            return
        steps = self.total - self.initial
        lines = [model_summary, f"Run folder: {run_dir}"]
        budget = (
            f"Training: {steps:,} steps of {self.tokens_per_step:,} tokens "
            f"({steps * self.tokens_per_step:,} tokens)"
        )
        if self.initial:
            budget += f", resuming at step {self.initial:,} of {self.total:,}"
        lines.append(budget + (f"; {note}" if note else ""))
        self._print("\n".join(lines))
        self.t0 = time.monotonic()
        if self.mode == "bar" and steps > 0:
            self.bar = Progress(
                self.total,
                self.desc,
                "step",
                mode="bar",
                stream=self.stream,
                initial=self.initial,
                every_s=None,
            )

    def step(self, step: int, loss: float, lr: float, seconds: float) -> None:
        """After every optimizer step: redraw the bar (terminal). Plain mode prints the first
        step (unless log() will) and then waits for log()."""
        if self.mode == "plain" and step == self.initial + 1 and step % self.log_interval:
            if step != self.total:
                self._line(step, loss, lr, self.tokens_per_step / seconds if seconds > 0 else 0.0)
        if self.bar is None:
            return
        if seconds > 0:
            rate = self.tokens_per_step / seconds
            self.tok_s = rate if self.tok_s is None else 0.7 * self.tok_s + 0.3 * rate
        loss_s = f"{loss:.4f}" if math.isfinite(loss) else "nan"
        tok_s = f"{self.tok_s:,.0f}" if self.tok_s is not None else "?"
        self.bar.update(1, postfix=f"loss={loss_s}, lr={lr:.2e}, tok/s={tok_s}")

    def log(self, step: int, rec: dict[str, Any], lr: float) -> None:
        """At each log interval: one plain line (not on a terminal, where the bar shows it)."""
        if self.mode == "plain":
            self._line(step, rec["loss"], lr, rec["tokens_per_s"])

    def _line(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        elapsed = time.monotonic() - self.t0
        eta = eta_seconds(step - self.initial, self.total - step, elapsed)
        self._print(
            f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"{tokens_per_s:,.0f} tok/s elapsed {format_duration(elapsed)} "
            f"eta {format_duration(eta)}"
        )

    def eval(self, step: int, val_loss: float) -> None:
        self.message(f"step {step}: val loss {val_loss:.4f}", progress=True)

    def message(self, text: str, progress: bool = False) -> None:
        """A line above the bar; ``progress`` lines are silenced by --quiet, warnings not."""
        if self.mode == "off" and progress:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            self._print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

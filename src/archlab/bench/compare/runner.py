"""One comparison run as a child process, and the comparison's live progress.

Each run is ``python -m archlab train ...`` in its own process, so its peak memory is its own
and a crash ends only that run. ``run_child`` starts it with its log file, relays the child's
plain progress lines to ``CompareProgress`` (two bars on a terminal, throttled plain lines
elsewhere) and forwards SIGINT / SIGTERM to it, so that the child saves a checkpoint and the
comparison can be continued with --resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ...errors import Interrupted
from ...progress import Progress, eta_seconds, format_duration, parse_duration, progress_mode
from .plan import RunSpec

_PROGRESS = re.compile(r"^step \d+/\d+ ")
_TRACE_NOISE = re.compile(r"^(Traceback|\s+File |\s+\^|\s{4})")
_ESTIMATE = re.compile(r"^estimate: (\S+) for ([\d,]+) steps")  # train's pre-run line


class CompareProgress:
    """The comparison's progress: runs done / total with an ETA, and the current run's steps.

    On a terminal two live bars (overall, current run) fed by the children's plain progress
    lines; elsewhere one plain line at most every ``every_s`` seconds, ``[2/5 mamba] step
    40/100 loss ... | compare: 1/5 runs done, eta 03:10``; ``mode="off"`` (``--quiet``) shows
    no progress, only the messages (run started, done, failed).
    """

    _STEP = re.compile(r"^step (\d+)/(\d+)\s*(.*?)(?:\s+elapsed \S+(?:\s+eta \S+)?)?$")
    label = "compare"  # names the whole grid in the plain progress lines

    def __init__(
        self,
        stream: TextIO,
        n_runs: int = 0,
        steps_per_run: int = 0,
        runs_done: int = 0,
        mode: str | None = None,
        every_s: float | None = None,
    ) -> None:
        from ... import progress as progress_mod

        self.stream = stream
        self.mode = mode if mode is not None else progress_mode(stream=stream)
        self.every_s = progress_mod.PLAIN_INTERVAL_S if every_s is None else every_s
        self.last = 0.0
        self.n_runs, self.steps_per_run = n_runs, steps_per_run
        self.runs_done = runs_done
        self.t0 = time.monotonic()
        self.session_steps = 0  # steps trained by this comparison process (for its ETA)
        self.run_first: int | None = None  # first step reported by the current run
        self.run_step = 0
        self.step_estimate_s: float | None = None  # seconds per step, from a child's estimate
        self.overall: Any = None
        self.current: Any = None
        if self.mode == "bar" and n_runs:
            self.overall = Progress(
                n_runs * steps_per_run,
                "compare",
                "step",
                mode="bar",
                stream=stream,
                initial=runs_done * steps_per_run,
                position=0,
            )
            self.overall.set_postfix(self._runs_text())

    def _runs_text(self) -> str:
        return f"{self.runs_done}/{self.n_runs} runs done"

    def eta(self) -> float | None:
        """Until a run of this session has finished: the current run's pre-run estimate per
        step (train/estimate.py) times the steps left, not the rate of cold first steps;
        then the rate this session has measured."""
        done = self.session_steps + (self.run_step - (self.run_first or 0))
        left = self.n_runs * self.steps_per_run - self.runs_done * self.steps_per_run
        left -= self.run_step
        if self.session_steps == 0 and self.step_estimate_s is not None:
            return self.step_estimate_s * max(left, 0)
        return eta_seconds(done, max(left, 0), time.monotonic() - self.t0)

    def estimate(self, line: str) -> None:
        """A child's ``estimate: 04:37 for 200 steps ...`` line."""
        m = _ESTIMATE.match(line)
        seconds = parse_duration(m.group(1)) if m else None
        steps = int(m.group(2).replace(",", "")) if m else 0
        if seconds is not None and steps > 0:
            self.step_estimate_s = seconds / steps

    # ---- a run ----------------------------------------------------------------------------
    def begin_run(self, prefix: str) -> None:
        self.run_first, self.run_step = None, 0
        if self.mode == "bar" and self.steps_per_run:
            self.current = Progress(
                self.steps_per_run, prefix, "step", mode="bar", stream=self.stream,
                position=1, leave=False,
            )  # fmt: skip

    def status(self, prefix: str, line: str) -> None:
        """A child's progress line ``step N/M ...``."""
        m = self._STEP.match(line)
        if m:
            step = int(m.group(1))
            if self.run_first is None:
                self.run_first = step - 1 if step > 0 else 0
            self.run_step = step
        if self.mode == "off":
            return
        if self.mode == "bar":
            if self.current is not None and m:
                self.current.set(self.run_step, postfix=m.group(3))
            if self.overall is not None:
                eta = f"{self._runs_text()}, eta {format_duration(self.eta())}"
                self.overall.set(self.runs_done * self.steps_per_run + self.run_step, eta)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            tail = ""
            if self.n_runs:
                tail = f" | {self.label}: {self._runs_text()}, eta {format_duration(self.eta())}"
            self.stream.write(f"{prefix} {line}{tail}\n")
            self.stream.flush()
            self.last = now

    def end_run(self) -> None:
        self.session_steps += self.run_step - (self.run_first or 0)
        self.runs_done += 1
        self.run_first, self.run_step = None, 0
        if self.current is not None:
            self.current.close()
            self.current = None
        if self.overall is not None:
            self.overall.set(self.runs_done * self.steps_per_run, postfix=self._runs_text())

    def note(self, text: str) -> None:
        """A progress message (a child's validation loss): silenced by --quiet."""
        if self.mode != "off":
            self.message(text)

    def message(self, text: str) -> None:
        if self.overall is not None:
            self.overall.write(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        for bar in (self.current, self.overall):
            if bar is not None:
                bar.close()
        self.current = self.overall = None


def run_child(
    spec: RunSpec, log_path: Path, progress: CompareProgress, prefix: str
) -> tuple[int, str]:
    """Run one training process to its end; (return code, last meaningful stderr line).

    SIGINT / SIGTERM are passed on to the child, which then saves a checkpoint and exits;
    afterwards Interrupted says where it stopped and how to continue the comparison.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    last_line = ""
    received: list[int] = []
    with log_path.open("w") as log:
        log.write("$ " + shlex.join(spec.command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            spec.command, stdout=log, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        assert proc.stderr is not None

        def forward(signum: int, frame: Any) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)  # a second one makes the child abort its save

        previous = _install_handlers(forward)
        try:
            for raw in proc.stderr:
                log.write(raw)
                for piece in raw.replace("\r", "\n").splitlines():
                    line = piece.strip()
                    if not line:
                        continue
                    if _PROGRESS.match(line):
                        progress.status(prefix, line)
                    elif _ESTIMATE.match(line):
                        progress.estimate(line)
                        progress.note(f"{prefix} {line}")
                    elif line.startswith("step ") and "val loss" in line:
                        progress.note(f"{prefix} {line}")
                    elif not _TRACE_NOISE.match(piece):
                        last_line = line
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            _restore_handlers(previous)
    if received:
        raise Interrupted(_interrupt_message(spec, received[0], progress.label), received[0])
    return rc, last_line


def _install_handlers(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _interrupt_message(spec: RunSpec, signum: int, command: str = "compare") -> str:
    """Where the interrupted run stopped, read from its summary.json."""
    try:
        summary = json.loads((spec.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    where = (
        f"{spec.name} stopped at step {summary.get('steps')} (checkpoint {summary['checkpoint']})"
        if summary.get("checkpoint")
        else f"{spec.name} stopped before its first checkpoint"
    )
    what = "comparison" if command == "compare" else "study"
    return (
        f"{signal.Signals(signum).name}: {where}; continue the {what} with: archlab {command} "
        f"--resume --out-dir {shlex.quote(str(spec.run_dir.parent))}"
    )

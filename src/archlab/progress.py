"""Progress output shared by train, compare, prepare and eval.

Three modes, chosen once per command from ``--quiet`` and where standard error goes:

- ``bar``: stderr is a terminal; a tqdm bar redrawn in place (elapsed, ETA, rate, postfix).
- ``plain``: stderr is a file or pipe (CI, ``nohup``, logs); whole lines, never a carriage
  return, at the caller's interval (a step interval, or every ``every_s`` seconds).
- ``off``: ``--quiet``; nothing.

Messages that are not progress (warnings, results) are the caller's business; ``write``
prints a line without breaking a live bar.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

MODES = ("bar", "plain", "off")
# Plain mode: at most one line per this many seconds from tasks without their own interval
# (prepare, eval, compare's relay of its children); a task that ends sooner prints none.
PLAIN_INTERVAL_S = 10.0
_DEFAULT = -1.0  # every_s sentinel: PLAIN_INTERVAL_S at construction time


def progress_mode(quiet: bool = False, stream: TextIO | None = None) -> str:
    """``off`` when quiet, ``bar`` when ``stream`` (default stderr) is a terminal, else ``plain``."""
    if quiet:
        return "off"
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # closed or not a real stream
        return "plain"


def format_duration(seconds: float | None) -> str:
    """1:02:03 above an hour, else 02:03 (tqdm's format); ? when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def parse_duration(text: str) -> float | None:
    """format_duration's text back to seconds (1:02:03 or 02:03); None for anything else."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds


def format_count(n: float, scale: bool = False) -> str:
    """12,345 or, with ``scale``, 12.3k / 4.56M (for characters, bytes, tokens)."""
    if not scale:
        return f"{int(n):,}"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


def eta_seconds(done: float, remaining: float, elapsed: float) -> float | None:
    """Remaining time at the mean rate so far; None before any progress."""
    if done <= 0 or elapsed <= 0:
        return None
    return remaining * elapsed / done


class Progress:
    """One task's progress: a bar, throttled plain lines, or nothing (see module doc).

    ``update`` advances and may print a plain line (at most every ``every_s`` seconds, default
    PLAIN_INTERVAL_S, and never for a task that ends sooner; None: only through ``line``); ``line`` prints one now (plain mode only), for callers
    with their own interval. ``postfix`` is shown after the bar / at the end of the line.
    """

    def __init__(
        self,
        total: float | None,
        desc: str,
        unit: str = "it",
        *,
        mode: str | None = None,
        stream: TextIO | None = None,
        initial: float = 0,
        every_s: float | None = _DEFAULT,
        unit_scale: bool = False,
        leave: bool = True,
        position: int | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode if mode is not None else progress_mode(stream=self.stream)
        if self.mode not in MODES:
            raise ValueError(f"progress mode {self.mode!r} (allowed: {', '.join(MODES)})")
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.every_s = PLAIN_INTERVAL_S if every_s == _DEFAULT else every_s
        self.unit_scale = unit_scale
        self.postfix = ""
        self.t0 = self.last_line = time.monotonic()
        self.closed = False
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                dynamic_ncols=True,
                file=self.stream,
                leave=leave,
                position=position,
            )

    # ---- state --------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def eta(self) -> float | None:
        if self.total is None:
            return None
        return eta_seconds(self.n - self.initial, self.total - self.n, self.elapsed)

    def plain_text(self) -> str:
        """``desc 40/100 unit (40%) elapsed 00:12 eta 00:18 postfix``."""
        if self.total:
            count = (
                f"{format_count(self.n, self.unit_scale)}/"
                f"{format_count(self.total, self.unit_scale)} {self.unit}"
                f" ({100 * self.n / self.total:.0f}%)"
            )
        else:
            count = f"{format_count(self.n, self.unit_scale)} {self.unit}"
        text = f"{self.desc} {count} elapsed {format_duration(self.elapsed)}"
        if self.total:
            text += f" eta {format_duration(self.eta())}"
        return text + (f" {self.postfix}" if self.postfix else "")

    # ---- output -------------------------------------------------------------------------
    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.set_postfix(postfix)
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "plain" and self.every_s is not None:
            if time.monotonic() - self.last_line >= self.every_s:
                self.line()

    def set(self, n: float, postfix: str | None = None) -> None:
        """Jump to ``n`` done (a child process reported where it is)."""
        self.update(n - self.n, postfix)

    def line(self, text: str | None = None) -> None:
        """A plain progress line now (plain mode only; the bar shows it live)."""
        if self.mode == "plain":
            self._print(text if text is not None else self.plain_text())
            self.last_line = time.monotonic()

    def write(self, text: str) -> None:
        """A message line in bar and plain mode, above a live bar."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self._print(text)

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Ctrl-C while archlab starts (importing torch takes seconds) is one line, not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest


def _interrupt_after(cmd: list[str], delay: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a runner started as a background job ignores SIGINT, and so would its children
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("delay", [0.25, 0.7])
def test_ctrl_c_during_startup_is_one_line(delay):
    res = _interrupt_after([sys.executable, "-m", "archlab", "summary"], delay)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0]
    if delay < 0.5:  # torch is still importing (~1.5-2.5 s)
        assert lines[0] == "archlab: interrupted while starting; nothing was changed"


def test_a_library_import_leaves_ctrl_c_to_the_caller():
    """Only the command exits at once on Ctrl-C; `import archlab` keeps Python's handler."""
    code = (
        "import signal, archlab; "
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        # Python installs its handler only when SIGINT is not ignored, and a runner started as
        # a background job (`cmd &` in a script) ignores it: give the child the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("argv0", "orig_argv", "command"),
    [
        ("/venv/bin/archlab", ["/venv/bin/python", "/venv/bin/archlab", "train"], True),
        ("-m", ["python", "-m", "archlab", "summary"], True),
        # package workers never reach cli.main, so they keep Python's handler
        ("-m", ["python", "-m", "archlab.bench.recall.worker", "RUN"], False),
        ("-c", ["python", "-c", "import archlab"], False),
        ("/x/bench_layers.py", ["python", "/x/bench_layers.py"], False),
    ],
)
def test_which_starts_count_as_the_command(monkeypatch, argv0, orig_argv, command):
    import archlab

    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert archlab._started_as_command() is command

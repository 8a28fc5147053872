"""argparse front: one subcommand per module in archlab.commands.

Each command module defines ``register(subparsers)`` (cheap: argparse only) and
``run(args) -> int``. Errors become one line on stderr, never a traceback (``--debug`` or
``ARCHLAB_DEBUG=1`` shows it): a user error exits 2, a file-system failure (disk full,
read-only, no permission) 1, SIGINT 130 and SIGTERM 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

from ._version import __version__
from .commands.parser import DEBUG_HELP, ArgumentParser, add_common_flags
from .errors import Interrupted, UserError, is_out_of_memory, out_of_memory_line
from .fsutil import os_error_line
from .streams import RESULT_ON_STDOUT, guard_streams
from .values import install_checks

COMMANDS = (
    "train",
    "prepare",
    "summary",
    "compare",
    "scale",
    "bench",
    "generate",
    "chat",
    "eval",
    "export",
)


# What to lower when a command runs out of memory.
LOWER = {
    "": "try a smaller --batch-size, --seq-len or model (--model-size, --d-model, --n-layers)",
    "bench": "lower --seq-lens / --batch-size or the model's size (--d-model, --n-layers)",
    "generate": "lower --max-new-tokens or use a smaller model",
    "chat": "lower --max-new-tokens or use a smaller model",
    "eval": "lower --batch-size or --seq-len",
    "prepare": "lower the example counts (--mqar-train-examples, --sc-train-examples, ...), "
    "--num-stories or --max-tokens",
    "summary": "lower the model's size (--d-model, --n-layers, --num-experts)",
}


# Flags with two spellings: messages name the first; a user who typed the second sees it.
SPELLINGS = {"--expert-capacity": "--top-k"}


def respell(message: str, argv: list[str]) -> str:
    """Name a flag in a message the way the user typed it (--top-k, not --expert-capacity)."""
    for name, alias in SPELLINGS.items():
        typed = {a.split("=")[0] for a in argv}
        if alias in typed and name not in typed:
            message = re.sub(rf"{re.escape(name)}\b(?!-)", alias, message)
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="archlab",
        description="Train and compare small language-model architectures under one protocol.",
    )
    parser.add_argument("--version", action="version", version=f"archlab {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.commands.{name}":
                continue  # command not built in this checkout
            raise
        module.register(sub)
    add_common_flags(sub)
    install_checks(parser)  # every value: type, finiteness, range (values.py)
    return parser


def run_command(args: argparse.Namespace) -> int:
    module = importlib.import_module(f".commands.{args.command}", __package__)
    return int(module.run(args) or 0)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Interrupted("terminated", signum)


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (cleanup runs, exit 143) instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:  # somebody else (a test runner, an embedder) decides
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _checksum_policy(args: argparse.Namespace) -> Iterator[None]:
    """--skip-checksums as an environment variable (child processes inherit it), for the
    command's life only (an in-process caller's environment is given back)."""
    name = "ARCHLAB_SKIP_CHECKSUMS"
    if not getattr(args, "skip_checksums", False):
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def main(argv: list[str] | None = None) -> int:
    """The `archlab` command: its exit code; every failure is one line on stderr."""
    from . import _started_as_command

    command = next((a for a in (sys.argv[1:] if argv is None else argv) if a in COMMANDS), None)
    closed, restore = guard_streams(command)
    try:
        if 1 in closed and command in RESULT_ON_STDOUT:
            print(
                f"archlab {command}: error: standard output is closed; nothing could show the "
                "result (redirect it to a file instead)",
                file=sys.stderr,
            )
            return 1
        return _main(argv)
    finally:
        # Done: a late Ctrl-C (a storm of them) must not interrupt the exit handlers.
        if _started_as_command() and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        restore()


def _main(argv: list[str] | None) -> int:
    try:  # building the parser imports every command module
        from . import _end_of_startup

        _end_of_startup()
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("archlab: interrupted while starting; nothing was changed", file=sys.stderr)
        return 130
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get("ARCHLAB_DEBUG", "") not in (
        "",
        "0",
    )
    prefix = f"archlab {args.command}"

    typed = sys.argv[1:] if argv is None else argv

    def fail(message: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: {respell(message, typed)}", file=sys.stderr)
        return code

    try:
        with _sigterm_as_exception(), _checksum_policy(args):
            return run_command(args)
    except UserError as exc:
        if exc.exit_code == 0:  # NothingToDo: a notice, not an error
            print(f"{prefix}: {exc}", file=sys.stderr)
            return 0
        return fail(f"error: {exc}", exc.exit_code)
    except BrokenPipeError:
        # output piped into `head` and friends: not an error of ours
        with contextlib.suppress(OSError):
            sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            return fail(str(exc), exc.exit_code)
        return fail("interrupted", 130)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        return fail(f"error: {out_of_memory_line(exc, LOWER.get(args.command, LOWER['']))}", 2)
    except OSError as exc:  # last resort: the next unforeseen file-system case is one line too
        return fail(f"error: {os_error_line(exc)}", 1)


if __name__ == "__main__":
    sys.exit(main())

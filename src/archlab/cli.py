"""argparse front: one subcommand per module in archlab.commands.

Each command module defines ``register(subparsers)`` (cheap: argparse only) and
``run(args) -> int``. User errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

COMMANDS = (
    "train",
    "prepare",
    "summary",
    "compare",
    "bench",
    "generate",
    "chat",
    "eval",
    "export",
)


class ArgumentParser(argparse.ArgumentParser):
    """Unknown flags and bad values: one line, exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="archlab",
        description="Train and compare small language-model architectures under one protocol.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"archlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.commands.{name}":
                continue  # command not built in this checkout
            raise
        module.register(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    module = importlib.import_module(f".commands.{args.command}", __package__)
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return run_command(args)
    except UserError as exc:
        print(f"archlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # output piped into `head` and friends: not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"archlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            f"archlab {args.command}: error: out of memory; try a smaller --batch-size, "
            "--use-gradient-checkpointing or a smaller --model-size",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())

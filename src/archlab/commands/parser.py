"""The argparse pieces every command shares, below both ``cli.py`` and the command modules.

``cli.build_parser`` assembles the whole parser from the command modules; a command that needs
its own parser alone (``train`` reads its actions to apply ``--config``) builds it from these
same pieces instead of importing the CLI that imports it.
"""

from __future__ import annotations

import argparse

LOADS_CHECKPOINTS = ("train", "generate", "chat", "eval", "export")
DEBUG_HELP = "show the full Python traceback of an error (also: ARCHLAB_DEBUG=1)"


class ArgumentParser(argparse.ArgumentParser):
    """Unknown flags and bad values: one line, exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_flags(sub: argparse._SubParsersAction) -> None:
    """The flags every registered command gets after its own: --debug, and --skip-checksums
    for the commands that load checkpoints."""
    for command_parser in sub.choices.values():  # `archlab train ... --debug` works too
        command_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    for name in LOADS_CHECKPOINTS:
        if name in sub.choices:
            sub.choices[name].add_argument(
                "--skip-checksums",
                action="store_true",
                default=argparse.SUPPRESS,
                help="load a checkpoint that has no checksums.json without verifying its files",
            )

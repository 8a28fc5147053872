#!/usr/bin/env python3
"""The seed's entry point: same flags as `archlab train`. Runs from a checkout without
`pip install -e .` as long as archlab's dependencies (torch, numpy, ...) are installed."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

try:
    from archlab.cli import main
except ModuleNotFoundError as exc:  # a dependency, not archlab itself (it is on sys.path)
    sys.stderr.write(
        f"scripts/train.py: archlab's dependencies are not installed ({exc}); "
        "run `pip install -e .` in the checkout (README, Set up) and try again\n"
    )
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""The architecture registry: one line per architecture module, each ending in its SPEC.

Order here is the order of ``--architecture``'s choices, of ``compare``'s default list and of
every "applies to ..." message. Adding an architecture: write ``models/<name>.py`` ending in
``SPEC = ArchitectureSpec(...)`` (see ``spec.py``) and add its module name below.
"""

from __future__ import annotations

import importlib

from .spec import ArchitectureSpec

MODULES = (
    "dense",
    "hypermixer",
    "mamba",
    "moe",
    "hybrid",
    "gdn",
    "mamba2",
)

SPECS: dict[str, ArchitectureSpec] = {}
for _module in MODULES:
    _spec: ArchitectureSpec = importlib.import_module(f".{_module}", __package__).SPEC
    SPECS[_spec.name] = _spec
ALIASES: dict[str, str] = {alias: s.name for s in SPECS.values() for alias in s.aliases}
# The architecture the others are measured against where a benchmark needs one (the
# crossovers of `bench scaling`): full causal attention, the Transformer.
REFERENCE = "dense"


def get(name: str) -> ArchitectureSpec:
    """The spec of a canonical architecture name (see config.canonical_architecture)."""
    return SPECS[name]

"""`archlab train --config FILE`: a YAML or JSON mapping of flag names to values.

Every value is checked and converted as its flag would have been (the flag's checked type
from values.py, its choices, true/false for switches); flags given on the command line win
over the file; a key that is no flag (nor one of ``FILE_ONLY_KEYS``) is refused in one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..values import RANGES

# Config-file-only knobs (no flag of their own): TrainConfig fields, checked by their RANGES entry.
FILE_ONLY_KEYS = ("min_lr_ratio", "beta1", "beta2", "eval_seed")


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--config: {p} is a folder, not a YAML or JSON file")
    if not p.is_file():
        raise UserError(f"--config: {p} not found")
    raw = p.read_bytes()
    if b"\0" in raw:
        raise UserError(f"--config: {p} is a binary file, not a YAML or JSON file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"--config: {p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json/yaml parse errors
        msg = " ".join(str(exc).split())[:160]
        raise UserError(f"--config: cannot parse {p} ({msg})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {p} must hold a mapping of flag names to values")
    return data


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """Check/convert one config-file value the way the flag would have."""
    where = f"--config {path}: {key}"
    if isinstance(action, argparse.BooleanOptionalAction) or (
        action.nargs == 0 and action.const is True
    ):
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            value = value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false (got {value!r})")
        return value
    if action.dest == "resume":
        return value if isinstance(value, bool) or value is None else str(value)
    if action.type is not None and value is not None:
        try:
            value = action.type(value)  # the flag's checked type (values.py)
        except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise UserError(f"{where}: {value!r} is not one of {allowed}")
    return value


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> set[str]:
    """Fill values the command line left unset from --config; returns the keys the file set."""
    data = _load_config_file(args.config)
    actions = {
        a.dest: a
        for a in parser._actions
        if a.dest not in ("help", "config", "debug") and a.help != argparse.SUPPRESS
    }
    set_keys: set[str] = set()
    unknown = []
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        key = {"hybrid_local_window": "local_window", "expert_capacity": "top_k"}.get(key, key)
        if key in FILE_ONLY_KEYS:
            if getattr(args, key, None) is None and value is not None:
                try:
                    setattr(args, key, RANGES[key](value))
                except argparse.ArgumentTypeError as exc:
                    raise UserError(f"--config {args.config}: {raw_key}: {exc}") from None
                set_keys.add(key)
            continue
        if key not in actions:
            unknown.append(str(raw_key))
            continue
        if getattr(args, key, None) is None:  # flags override the file
            setattr(args, key, _coerce(actions[key], key, value, args.config))
            set_keys.add(key)
    if unknown:
        raise UserError(f"--config {args.config}: unknown keys {', '.join(sorted(unknown))}")
    return set_keys

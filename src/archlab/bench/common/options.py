"""Parsing helpers shared by the compare, bench and eval commands."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

from ...config import ALIASES, ARCHITECTURES, MODEL_SIZES, canonical_architecture
from ...errors import UserError


def parse_architectures(text: str | None, flag: str = "--architectures") -> list[str]:
    """'dense,ssm,moe' -> ['dense', 'mamba', 'moe']; unknown names and repeats are errors."""
    if text is None or text.strip().lower() == "all":
        return list(ARCHITECTURES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"{flag}: empty list")
    out: list[str] = []
    for name in names:
        key = ALIASES.get(name.lower(), name.lower())
        if key not in ARCHITECTURES:
            allowed = ", ".join(list(ARCHITECTURES) + list(ALIASES))
            raise UserError(f"{flag}: unknown architecture {name!r} (allowed: {allowed})")
        key = canonical_architecture(key)
        if key in out:
            raise UserError(f"{flag}: {name!r} is listed twice")
        out.append(key)
    return out


def parse_sizes(text: str | None, flag: str = "--model-size") -> list[str]:
    names = [t.strip() for t in (text or "nano").split(",") if t.strip()]
    for n in names:
        if n not in MODEL_SIZES:
            raise UserError(f"{flag}: unknown size {n!r} (allowed: {', '.join(MODEL_SIZES)})")
    if not names:
        raise UserError(f"{flag}: empty list")
    return names


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers (got {text!r})") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag}: expected positive integers (got {text!r})")
    return sorted(set(values))


def timestamped_dir(prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{prefix}-{stamp}"


def check_learning_rates(rates: list[float], flag: str = "--learning-rates") -> list[float]:
    """A learning-rate grid: non-empty, every rate positive and finite, no rate twice (to
    the 6 significant digits that name its run folders). Kept in the order given."""
    if not rates:
        raise UserError(f"{flag}: empty list (give rates like 3e-4,1e-3,3e-3)")
    seen: dict[str, float] = {}
    for r in rates:
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise UserError(f"{flag}: every rate must be a positive number (got {r!r})")
        key = f"{r:g}"
        if key in seen:
            raise UserError(f"{flag}: {r:g} is listed twice")
        seen[key] = float(r)
    return [float(r) for r in rates]


def parse_learning_rates(text: str | None, flag: str = "--learning-rates") -> list[float] | None:
    """'3e-4,1e-3,3e-3' -> [0.0003, 0.001, 0.003]; None stays None (no sweep).

    Empty, non-numeric, non-positive and repeated rates are user errors (one line, exit 2).
    """
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",")]
    if not any(parts):
        raise UserError(f"{flag}: empty list (give rates like 3e-4,1e-3,3e-3)")
    rates: list[float] = []
    for part in parts:
        if not part:
            raise UserError(f"{flag}: empty entry in {text!r}")
        try:
            rates.append(float(part))
        except ValueError:
            raise UserError(f"{flag}: {part!r} is not a number") from None
    return check_learning_rates(rates, flag)

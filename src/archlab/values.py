"""Every value a user types, checked once: type, finiteness and range, with the flag's name.

``cli.build_parser`` gives every flag of every command its checked type here
(``install_checks``), and ``--config`` files go through the same types, so a value from a
flag and from a file is refused with the same one line:

* ``type=int`` becomes ``Int``: an integer (an integral float such as YAML's ``1e3`` too),
  within int64 and the flag's range;
* ``type=float`` becomes ``Float``: a finite number within the flag's range (no nan/inf);
* a token count (``parse_count``) becomes ``Count``: "2M", "5e5", bounded like ``Int``;
* a text flag (no type, no choices) becomes ``Text``: not empty, not a list or a number.

How a new flag declares its range: give it ``type=int`` / ``type=float`` as usual and add
its destination to ``RANGES`` below (``"dest"`` for every command, ``"command.dest"`` for
one). Or pass a checked type directly: ``type=values.Int(min=1)``. A flag absent from
``RANGES`` is still checked for type, finiteness and int64. Text flags that may be empty
(a prompt, a stop string) are named in ``MAY_BE_EMPTY``.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import Any

INT64 = 2**63 - 1
SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds below 2**32

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


class ValueCheckError(argparse.ArgumentTypeError):
    """A value of the wrong type or outside its range (argparse adds the flag's name)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value: Any) -> str:
    return {list: "a list", dict: "a mapping", bool: "true/false"}.get(type(value), "a number")


@dataclass(frozen=True)
class Int:
    """An integer in [min, max] (both inclusive; None: int64's bound)."""

    min: int | None = None
    max: int | None = None

    def __call__(self, value: Any) -> int:
        n = self._parse(value)
        lo = -INT64 - 1 if self.min is None else self.min
        hi = INT64 if self.max is None else self.max
        if not lo <= n <= hi:
            raise ValueCheckError(f"must be {self.describe()} (got {_shown(value)})")
        return n

    def _parse(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueCheckError(f"expected an integer (got {_type_name(value)})")
        if isinstance(value, int):
            return value
        x = value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            if re.fullmatch(r"[+-]?\d+", text):
                return int(text)
            try:
                x = float(text)
            except ValueError:
                raise ValueCheckError(f"expected an integer (got {_shown(value)})") from None
        if not math.isfinite(x) or x != int(x) or abs(x) > INT64:
            raise ValueCheckError(f"must be {self.describe()} (got {_shown(value)})")
        return int(x)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"an integer >= {self.min}"
        if self.max is not None:
            return f"an integer <= {self.max}"
        return "an integer of at most 19 digits"


@dataclass(frozen=True)
class Float:
    """A finite number in its range; ``open_min``: strictly above ``min``."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def __call__(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueCheckError(f"expected a number (got {_type_name(value)})")
        try:
            x = float(value)
        except (ValueError, OverflowError):
            raise ValueCheckError(f"expected a number (got {_shown(value)})") from None
        ok = math.isfinite(x)
        if ok and self.min is not None:
            ok = x > self.min if self.open_min else x >= self.min
        if ok and self.max is not None:
            ok = x < self.max if self.open_max else x <= self.max
        if not ok:
            raise ValueCheckError(f"must be {self.describe()} (got {_shown(value)})")
        return x

    def describe(self) -> str:
        if self.min is None and self.max is None:
            return "a finite number"
        if self.max is None:
            return f"a finite number {'>' if self.open_min else '>='} {self.min:g}"
        if self.min is None:
            return f"a finite number {'<' if self.open_max else '<='} {self.max:g}"
        return (
            f"a number in {'(' if self.open_min else '['}{self.min:g}, "
            f"{self.max:g}{')' if self.open_max else ']'}"
        )


@dataclass(frozen=True)
class Count:
    """A token count: '2000000', '2_000_000', '2e6', '2M', '500k' -> int >= min."""

    min: int = 1

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueCheckError(f"expected a token count (got {_type_name(value)})")
        s = str(value).strip().lower().replace("_", "").replace(",", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)([kmbgt]?)", s)
        if not m:
            raise ValueCheckError(f"not a token count: {_shown(value)} (e.g. 2000000, 2e6, 2M)")
        x = float(m.group(1)) * _SUFFIX.get(m.group(2), 1)
        if not math.isfinite(x) or x > INT64 or round(x) < self.min:
            raise ValueCheckError(
                f"must be a token count in [{self.min}, {INT64}] (got {_shown(value)})"
            )
        return int(round(x))


@dataclass(frozen=True)
class Text:
    """A non-empty string (a path, a name); numbers and lists from a config file refused."""

    may_be_empty: bool = False

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueCheckError(f"expected text (got {_type_name(value)} {_shown(value)})")
        if not self.may_be_empty and not value.strip():
            raise ValueCheckError("empty value")
        if "\0" in value:
            raise ValueCheckError("contains a NUL byte")
        return value


CHECKED = (Int, Float, Count, Text)

_POSITIVE = Int(min=1)
_NONNEG = Int(min=0)
_SEED = Int(0, SEED_MAX)
_FRACTION = Float(0.0, 1.0, open_min=True, open_max=True)

# Ranges by destination ("dest" for every command, "command.dest" for one command).
RANGES: dict[str, Any] = {
    # seeds
    "seed": _SEED,
    "eval_seed": _SEED,
    # sizes and counts: at least 1
    **{
        k: _POSITIVE
        for k in (
            "batch_size",
            "gradient_accumulation_steps",
            "seq_len",
            "num_epochs",
            "steps_per_epoch",
            "eval_steps",
            "log_interval",
            "keep_checkpoints",
            "max_nan_steps",
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "max_seq_len",
            "state_size",
            "conv_size",
            "expand",
            "num_experts",
            "top_k",
            "local_window",
            "seeds",
            "steps",
            "num_train",
            "num_val",
            "num_test",
            "new_tokens",
            "repeats",
            "max_new_tokens",
            "num_stories",
            "mqar_pairs",
            "mqar_seq_len",
            "mqar_train_examples",
            "mqar_val_examples",
            "sc_vocab_size",
            "sc_tokens",
            "sc_seq_len",
            "sc_train_examples",
            "sc_val_examples",
            "max_tokens",
            "mqar_vocab_size",
            "test_factor",
        )
    },  # fmt: skip
    # 0 disables or means "none"
    **{
        k: _NONNEG
        for k in (
            "warmup_steps",
            "eval_interval",
            "checkpoint_interval",
            "num_fewshot",
            "warmup",
            "hypernetwork_hidden_dim",
            "max_documents",
        )
    },  # fmt: skip
    "gdn_head_dim": _POSITIVE,
    "gdn_expand_v": _POSITIVE,
    "gdn_chunk_size": _POSITIVE,
    "gdn_attention_every": _NONNEG,  # 0: no attention layer
    "width_per_depth": _POSITIVE,
    "head_dim": _POSITIVE,
    "bootstrap": _POSITIVE,
    "decay_fraction": Float(0.0, 1.0),
    # more threads than this only crashes OpenMP (--num-threads 100000: a segmentation fault)
    "num_threads": Int(1, 1024),
    "threads": Int(1, 1024),
    "learning_rate": Float(0.0, open_min=True),
    "weight_decay": Float(0.0),
    "grad_clip": Float(0.0),
    "dropout": Float(0.0, 1.0, open_max=True),
    "capacity_factor": Float(0.0),
    "temperature": Float(0.0),
    "top_p": Float(0.0, 1.0, open_min=True),
    "val_fraction": _FRACTION,
    "min_lr_ratio": Float(0.0, 1.0),
    "beta1": Float(0.0, 1.0, open_max=True),
    "beta2": Float(0.0, 1.0, open_max=True),
    "power_a": Float(0.0, open_min=True),
    "mqar_power_a": Float(0.0, open_min=True),
    "eval.limit": Float(0.0, 1e9, open_min=True),
    "eval.max_tokens": _POSITIVE,
    "prepare.vocab_size": Int(1, 2**32 - 1),  # the largest id a uint32 token file holds
}

# Text flags where an empty string is a meaningful value.
MAY_BE_EMPTY = frozenset({"stop", "system"})


def checked_type(command: str, action: argparse.Action) -> Any:
    """The checked type for one flag of ``command`` (its current type if already checked)."""
    current = action.type
    if isinstance(current, CHECKED):
        return current
    rule = RANGES.get(f"{command}.{action.dest}", RANGES.get(action.dest))
    name = getattr(current, "__name__", "")
    if current is int:
        return rule if isinstance(rule, Int) else Int()
    if current is float:
        return rule if isinstance(rule, Float) else Float()
    if name == "parse_count":
        return Count()
    if current is None and action.choices is None and action.nargs != 0:
        if isinstance(action.default, str) and not action.default.strip():
            return None  # argparse runs the type on a string default: "" is that flag's own
        return Text(may_be_empty=action.dest in MAY_BE_EMPTY)
    return current


def install_checks(parser: argparse.ArgumentParser, command: str = "") -> None:
    """Give every flag of ``parser`` (and its sub-commands) its checked type."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                install_checks(sub, f"{command}.{name}" if command else name)
            continue
        if not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            action.type = checked_type(command.split(".")[0], action)

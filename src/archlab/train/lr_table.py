"""The shipped peak learning rates: one per (architecture, size, recipe), swept or derived.

``lr_table.json`` (beside this file; ``ARCHLAB_LR_TABLE`` names another) holds the swept
entries: per recipe, architecture and size the chosen rate, the sweep's grid and seeds, the
final val loss of every (rate, seed) and the command that reproduces it
(``scripts/sweep_learning_rates.py``). A size without a swept entry gets a rate *derived* by a
stated rule from the architecture's swept entry: inverse in the model width, as muP-style
transfer does for Adam's hidden-layer rate (rate x d_model_swept / d_model, from the nearest
swept width below; a model narrower than every swept width keeps the narrowest rate). An
architecture/recipe with no swept entry at all is a one-line error naming the row to sweep:
never a silent constant; an architecture swept under one recipe only takes that rate under
the other too, labelled "derived: the <recipe> recipe's rate", until its own sweep is in.

The rule is checked, not only stated: ``rule_checks`` in the table holds, per (recipe,
architecture, size) checked, a one-seed sweep of three rates around the derived one (derived / 3,
derived, derived x 3; ``scripts/check_lr_rule.py``). The derived rate passes when it is the best
of the three or within ``RULE_TOLERANCE`` nats of the best; a derived rate's label says how its
check came out.

Rules of a sweep (checked when the table is read): the chosen rate is the one with the lowest
mean final val loss over seeds among the rates run with every seed of the sweep where no seed
failed (a rate may be screened out with the first seed alone), and it must not sit at the
edge of its grid (a best rate at the edge means the optimum may lie outside).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import MODEL_SIZES, ModelConfig, canonical_architecture, size_fields
from ..errors import UserError

TABLE_PATH = Path(__file__).with_name("lr_table.json")
ENV_TABLE = "ARCHLAB_LR_TABLE"
SWEEP_COMMAND = (
    "python scripts/sweep_learning_rates.py --architectures ARCH --recipes modern,classic"
)
RULE = "inverse in width (muP-style): rate = swept rate x d_model_swept / d_model"
RULE_TOLERANCE = 0.05  # nats: how far above the check's best the derived rate may end


@dataclass(frozen=True)
class LearningRateChoice:
    """A peak learning rate and where it came from (shown in summaries and reports)."""

    rate: float
    source: str  # e.g. "swept at nano (grid 3e-4..3e-2, 2 seeds)" or "derived: ..."
    kind: str = "swept"  # "swept", "derived" or "given"

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "source": self.source, "kind": self.kind}


@dataclass(frozen=True)
class SweptEntry:
    """One swept row of the table."""

    recipe: str
    architecture: str
    size: str
    d_model: int
    rate: float
    grid: tuple[float, ...]
    seeds: tuple[int, ...]
    # rate -> {seed: final val loss (None: the seed failed)}; a seed absent at a rate was not
    # run there (a rate screened out with the first seed alone)
    losses: dict[float, dict[int, float | None]]
    command: str
    notes: str = ""

    @property
    def at_edge(self) -> bool:
        return self.rate in (min(self.grid), max(self.grid))

    def mean_loss(self, rate: float) -> float | None:
        """Mean over every seed of the sweep; None when a seed failed or was not run here."""
        values = self.losses.get(rate, {})
        if set(values) != set(self.seeds):
            return None
        if any(v is None or not math.isfinite(v) for v in values.values()):
            return None
        return sum(values.values()) / len(values)  # type: ignore[arg-type]

    def best_rate(self) -> float | None:
        """The lowest mean loss among the rates run with every seed, none of which failed."""
        means = {r: self.mean_loss(r) for r in self.grid}
        ok = {r: m for r, m in means.items() if m is not None}
        return min(ok, key=lambda r: ok[r]) if ok else None

    def label(self) -> str:
        lo, hi = min(self.grid), max(self.grid)
        n = len(self.seeds)
        seeds = f"{n} seed{'s' if n > 1 else ''}"
        full = sum(1 for r in self.grid if set(self.losses.get(r, {})) == set(self.seeds))
        if n > 1 and full < len(self.grid):  # the later seeds only at the best rates
            seeds += f" at {full} of them"
        return (
            f"swept at {self.size} ({self.recipe} recipe; grid {len(self.grid)} rates "
            f"{lo:g}..{hi:g}, {seeds})"
        )


@dataclass(frozen=True)
class RuleCheck:
    """A check of the width rule at one size: one seed at derived / f, derived, derived x f."""

    recipe: str
    architecture: str
    size: str
    derived_rate: float
    losses: dict[float, float | None]  # rate -> final val loss (None: the run failed)
    command: str
    notes: str = ""

    @classmethod
    def from_row(cls, raw: dict[str, Any]) -> RuleCheck:
        """A ``rule_checks`` row of the table (as scripts/check_lr_rule.py writes it)."""
        return cls(
            recipe=str(raw["recipe"]),
            architecture=str(raw["architecture"]),
            size=str(raw["size"]),
            derived_rate=float(raw["derived_rate"]),
            losses={float(r): None if v is None else float(v) for r, v in raw["losses"].items()},
            command=str(raw["command"]),
            notes=str(raw.get("notes", "")),
        )

    def best(self) -> tuple[float, float] | None:
        ok = {r: v for r, v in self.losses.items() if v is not None and math.isfinite(v)}
        return min(ok.items(), key=lambda kv: kv[1]) if ok else None

    def gap(self) -> float | None:
        """Nats the derived rate ended above the best of the check (0: it is the best)."""
        best, derived = self.best(), self.losses.get(self.derived_rate)
        if best is None or derived is None or not math.isfinite(derived):
            return None
        return derived - best[1]

    @property
    def passed(self) -> bool:
        gap = self.gap()
        return gap is not None and gap <= RULE_TOLERANCE

    def verdict(self) -> str:
        """One phrase for labels and reports."""
        grid = ", ".join(f"{r:g}" for r in sorted(self.losses))
        gap, best = self.gap(), self.best()
        if gap is None or best is None:
            return f"rule check at {self.size} failed to run at the derived rate (grid {grid})"
        if gap == 0:
            return f"rule checked at {self.size}: the derived rate was the best of {grid}"
        ok = "within" if gap <= RULE_TOLERANCE else "MISSED: more than"
        return (
            f"rule checked at {self.size}: the derived rate ended {gap:.3f} nats above the "
            f"best, {best[0]:g} ({ok} {RULE_TOLERANCE:g}; grid {grid})"
        )


def table_path() -> Path:
    return Path(os.environ.get(ENV_TABLE) or TABLE_PATH)


def _fail(path: Path, why: str) -> UserError:
    return UserError(f"learning-rate table {path}: {why}")


def _parse_entry(path: Path, i: int, raw: Any) -> SweptEntry:
    where = f"entry {i}"
    try:
        grid = tuple(sorted(float(r) for r in raw["grid"]))
        losses = {
            float(r): {int(k): None if v is None else float(v) for k, v in per_seed.items()}
            for r, per_seed in raw["losses"].items()
        }
        entry = SweptEntry(
            recipe=str(raw["recipe"]),
            architecture=str(raw["architecture"]),
            size=str(raw["size"]),
            d_model=int(raw["d_model"]),
            rate=float(raw["rate"]),
            grid=grid,
            seeds=tuple(int(s) for s in raw["seeds"]),
            losses=losses,
            command=str(raw["command"]),
            notes=str(raw.get("notes", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _fail(path, f"{where} is malformed ({type(exc).__name__}: {exc})") from None
    name = f"{where} ({entry.recipe}, {entry.architecture}, {entry.size})"
    if len(grid) < 2 or entry.rate not in grid or set(losses) != set(grid):
        raise _fail(path, f"{name}: its rate must be one of its grid, with losses for each rate")
    if entry.d_model < 1 or not all(r > 0 and math.isfinite(r) for r in grid):
        raise _fail(path, f"{name}: rates and d_model must be positive numbers")
    if any(not set(v) <= set(entry.seeds) or not v for v in losses.values()):
        raise _fail(path, f"{name}: every rate needs losses of the entry's seeds")
    best = entry.best_rate()
    if best is None or best != entry.rate:
        raise _fail(path, f"{name}: rate {entry.rate:g} is not its sweep's best ({best})")
    return entry


def _parse_check(path: Path, i: int, raw: Any) -> RuleCheck:
    try:
        check = RuleCheck.from_row(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _fail(path, f"rule check {i} is malformed ({type(exc).__name__}: {exc})") from None
    if check.derived_rate not in check.losses:
        raise _fail(path, f"rule check {i}: its derived rate is not one of its rates")
    return check


def load_rule_checks(path: Path | None = None) -> dict[tuple[str, str, str], RuleCheck]:
    """The table's checks of the width rule keyed by (recipe, architecture, size)."""
    return _read(path)[1]


_Keyed = dict[tuple[str, str, str], Any]


@lru_cache(maxsize=8)
def _load(path_str: str, mtime: float) -> tuple[_Keyed, _Keyed]:
    """(swept entries, rule checks) of one read of the file, each keyed by (recipe,
    architecture, size)."""
    path = Path(path_str)
    try:
        doc = json.loads(path.read_text())
        rows, check_rows = doc["entries"], doc.get("rule_checks", [])
        if not isinstance(rows, list):
            raise TypeError("'entries' is not a list")
        if not isinstance(check_rows, list):
            raise TypeError("'rule_checks' is not a list")
    except FileNotFoundError:
        raise _fail(path, "not found") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    table: dict[tuple[str, str, str], SweptEntry] = {}
    for i, raw in enumerate(rows):
        entry = _parse_entry(path, i, raw)
        key = (entry.recipe, entry.architecture, entry.size)
        if key in table:
            raise _fail(path, f"entry {i} repeats ({', '.join(key)})")
        table[key] = entry
    checks = [_parse_check(path, i, raw) for i, raw in enumerate(check_rows)]
    return table, {(c.recipe, c.architecture, c.size): c for c in checks}


def _read(path: Path | None) -> tuple[_Keyed, _Keyed]:
    path = path or table_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        raise _fail(path, "not found") from None
    return _load(str(path), mtime)


def load_table(path: Path | None = None) -> dict[tuple[str, str, str], SweptEntry]:
    """The swept entries keyed by (recipe, architecture, size); a bad file is one line."""
    return _read(path)[0]


def _rows(arch: str, recipe: str, path: Path | None) -> list[SweptEntry]:
    rows = [e for (r, a, _), e in load_table(path).items() if r == recipe and a == arch]
    return sorted(rows, key=lambda e: e.d_model)


def _swept_for(architecture: str, recipe: str, path: Path | None) -> tuple[list[SweptEntry], str]:
    """The architecture's swept rows under ``recipe``; when that recipe has none, the other
    recipe's (the rule: a rate transfers across recipes until its own sweep is in; labelled).
    An architecture with no row at all is a one-line error naming the sweep to run."""
    from ..recipes import RECIPES, check_recipe

    recipe = check_recipe(recipe)
    arch = canonical_architecture(architecture)
    rows = _rows(arch, recipe, path)
    if rows:
        return rows, ""
    for other in RECIPES:
        if other != recipe and (rows := _rows(arch, other, path)):
            return rows, f"derived: the {other} recipe's rate (no {recipe} sweep of {arch} yet); "
    where = path or table_path()
    raise UserError(
        f"learning-rate table {where}: no swept entry for {arch} ({recipe} recipe); sweep "
        f"it with: {SWEEP_COMMAND.replace('ARCH', arch)} (or pass --learning-rate)"
    )


def check_rows(architecture: str, recipe: str, path: Path | None = None) -> None:
    """Fail early (one line) when the table is unreadable or has no row for this pair."""
    _swept_for(architecture, recipe, path)


def rate_for_width(
    architecture: str,
    recipe: str,
    d_model: int,
    path: Path | None = None,
    narrower: str = "keep",
) -> LearningRateChoice:
    """The rate for a width between (or beyond) the swept sizes: the swept entry at that width
    if there is one, else the rule (inverse in width) from the nearest swept width below it.
    A width narrower than every swept one keeps the narrowest swept rate (``narrower="keep"``)
    or, with ``narrower="inverse"`` (`archlab scale`'s narrow rungs), takes the same rule
    downwards, capped at the largest rate that entry's sweep ran (no rate beyond the sweep's
    evidence). Measured on the stories (1,024-token BPE), d_model 16, one layer, 97 steps:
    dense 5.27 nats at the kept 3e-3, 3.32 at 1e-2, 2.22 at 3e-2 (the rule: 2.4e-2)."""
    rows, transfer = _swept_for(architecture, recipe, path)
    for e in rows:
        if e.d_model == d_model:
            return _choice(e.rate, e.label(), transfer)
    below = [e for e in rows if e.d_model < d_model]
    if not below and narrower == "inverse":
        ref = rows[0]
        scaled = ref.rate * ref.d_model / d_model
        cap = max(ref.grid)
        rate = min(scaled, cap)
        capped = f", capped at its grid's largest {cap:g}" if scaled > cap else ""
        return _choice(
            rate,
            f"{ref.size} rate {ref.rate:g} x d_model {ref.d_model} / {d_model} (muP-style 1/width "
            f"below the narrowest swept width{capped}; {ref.label()})",
            transfer or "derived: ",
        )
    if not below:  # narrower than every swept width: the rule is not extrapolated upwards
        ref = rows[0]
        return _choice(
            ref.rate,
            f"{ref.size} rate {ref.rate:g} unchanged (d_model {d_model} is narrower than the "
            f"swept {ref.d_model}; {ref.label()})",
            transfer or "derived: ",
        )
    ref = below[-1]
    return _choice(
        ref.rate * ref.d_model / d_model,
        f"{ref.size} rate {ref.rate:g} x d_model {ref.d_model} / {d_model} (muP-style 1/width; "
        f"{ref.label()})",
        transfer or "derived: ",
    )


def _choice(rate: float, text: str, prefix: str) -> LearningRateChoice:
    """A swept rate as is; a derived one labelled "derived: ..." (its rule first)."""
    if not prefix:
        return LearningRateChoice(rate, text, "swept")
    return LearningRateChoice(rate, prefix + text, "derived")


def table_learning_rate(
    architecture: str, size: str, recipe: str, path: Path | None = None
) -> LearningRateChoice:
    """The shipped rate of a size preset: swept at that size, or derived by width."""
    from ..recipes import check_recipe

    if size not in MODEL_SIZES:
        raise UserError(f"--model-size: unknown size {size!r} (allowed: {', '.join(MODEL_SIZES)})")
    arch = canonical_architecture(architecture)
    rows, transfer = _swept_for(arch, recipe, path)
    for e in rows:
        if e.size == size:
            return _choice(e.rate, e.label(), transfer)
    choice = rate_for_width(arch, recipe, int(size_fields(arch, size)["d_model"]), path)
    check = load_rule_checks(path).get((check_recipe(recipe), arch, size))
    if check is not None and math.isclose(check.derived_rate, choice.rate, rel_tol=1e-6):
        return LearningRateChoice(choice.rate, f"{choice.source}; {check.verdict()}", choice.kind)
    return choice


class SweepEntryError(ValueError):
    """A sweep that cannot give a table row (best at the grid's edge, every rate failed)."""


def entry_from_runs(
    recipe: str,
    architecture: str,
    size: str,
    d_model: int,
    runs: list[dict[str, Any]],
    command: str,
    notes: str = "",
) -> dict[str, Any]:
    """A table row from finished runs of one architecture (dicts with learning_rate, seed,
    status, final_val_loss). A run that did not finish or ended with a non-finite loss is a
    failed seed (None); the seeds of the entry are every seed that ran anywhere."""
    grid = sorted({float(r["learning_rate"]) for r in runs})
    seeds = sorted({int(r["seed"]) for r in runs})
    losses: dict[str, dict[str, float | None]] = {}
    for rate in grid:
        row: dict[str, float | None] = {}
        for r in runs:
            if float(r["learning_rate"]) != rate:
                continue
            loss = r.get("final_val_loss")
            ok = r.get("status") == "ok" and isinstance(loss, (int, float))
            row[str(int(r["seed"]))] = float(loss) if ok and math.isfinite(loss) else None
        losses[repr(rate)] = dict(sorted(row.items()))
    name = f"{architecture} ({recipe}, {size})"
    if len(grid) < 2:
        raise SweepEntryError(f"{name}: a sweep needs at least two rates")
    entry = SweptEntry(
        recipe,
        architecture,
        size,
        d_model,
        0.0,
        tuple(grid),
        tuple(seeds),
        {float(k): {int(s): v for s, v in per.items()} for k, per in losses.items()},
        command,
    )
    best = entry.best_rate()
    if best is None:
        raise SweepEntryError(f"{name}: no rate ran with every seed without a failure")
    if best in (grid[0], grid[-1]):
        raise SweepEntryError(f"{name}: the best rate {best:g} is at the grid's edge; widen --grid")
    row = {
        "recipe": recipe,
        "architecture": architecture,
        "size": size,
        "d_model": d_model,
        "rate": best,
        "grid": grid,
        "seeds": seeds,
        "losses": losses,
        "command": command,
    }
    if notes:
        row["notes"] = notes
    return row


def rate_for_model(
    cfg: ModelConfig, model_size: str | None, recipe: str, path: Path | None = None
) -> LearningRateChoice:
    """The default rate of a run: the table's at its size preset when the model has that
    preset's width, else by width (a preset such as rustgpt, or an explicit --d-model)."""
    if cfg.preset is None:
        size = model_size or "nano"
        if cfg.d_model == int(size_fields(cfg.architecture, size)["d_model"]):
            return table_learning_rate(cfg.architecture, size, recipe, path)
    return rate_for_width(cfg.architecture, recipe, cfg.d_model, path)

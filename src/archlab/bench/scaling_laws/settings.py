"""What a scaling study is: its settings, the default ladder, the checks, --resume.

The ladder itself (the one dial, each architecture's size rule, budgets and rates) is
ladder.py. Each run trains for ``tokens_per_param`` x its (active) parameters, rounded up to
whole optimizer steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ...errors import UserError

# The default ladder: three rungs of one dial (d_model 16, 32, 48) at 10 tokens per active
# parameter, the low end of the Chinchilla range (its compute-optimal ratio is about 20), two
# seeds, on the stories corpus with a 1,024-token BPE (a small vocabulary keeps the embedding
# from being all of a small model). Sized for about 30 minutes on 2 CPU cores with the seven
# registered architectures: 42 runs, 2.1e13 training FLOPs, 1,890 CPU-seconds on one thread by
# benchmarks/bench_scale_budget.py (an estimate from timed steps; README, "Scaling laws").
# What the budget costs: a fourth rung (d_model 64) alone would take 33 more minutes, so
# three compute values per architecture; two seeds at each make six runs, enough to fit E
# with three degrees of freedom left and to bootstrap over seeds. Intervals stay wide and
# the predictions at the seed sizes are extrapolations over 6-8 decades.
DEFAULT_DEPTHS = (1, 2, 3)
DEFAULT_RATIO = 10.0
DEFAULT_SEEDS = 2
DEFAULT_WIDTH_PER_DEPTH = 16
DEFAULT_HEAD_DIM = 16
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_VOCAB = 1024
DEFAULT_RECIPE = "modern"
FLAG_NAMES = {
    "architectures": "--architectures",
    "depths": "--depths",
    "tokens_per_param": "--tokens-per-param",
    "width_per_depth": "--width-per-depth",
    "head_dim": "--head-dim",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "learning_rate": "--learning-rate",
    "recipe": "--recipe",
    "eval_steps": "--eval-steps",
    "use_amp": "--use-amp",
    "device": "--device",
    "num_threads": "--num-threads",
    "seed": "--seed",
    "seeds": "--seeds",
    "bootstrap": "--bootstrap",
    "data": "--data",
    "compare_results": "--compare-results",
}


@dataclass
class ScaleSettings:
    """Everything that defines a study; stored in scale.json, checked on --resume."""

    architectures: list[str]
    depths: list[int] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    tokens_per_param: float = DEFAULT_RATIO
    width_per_depth: int = DEFAULT_WIDTH_PER_DEPTH
    head_dim: int = DEFAULT_HEAD_DIM
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float | None = None  # None: the learning-rate table's rate per width
    recipe: str = DEFAULT_RECIPE
    eval_steps: int = 4
    use_amp: bool = False
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    seeds: int = DEFAULT_SEEDS
    bootstrap: int = 1000  # bootstrap draws of every fit
    data: str = ""  # the prepared folder every run reads
    # an `archlab compare` results.json whose ranking the largest rung's is checked against
    # (a report setting: it may change on --resume)
    compare_results: str = ""

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScaleSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def settings_from_flags(raw: dict[str, Any]) -> ScaleSettings:
    """Defaults for what the user left unset and every check that needs no data."""
    given = {k: v for k, v in raw.items() if v is not None}
    depths = given.get("depths")
    if depths is not None:
        if any(d < 1 for d in depths):
            raise UserError(f"--depths: every depth must be >= 1 (got {_ints(depths)})")
        if len(set(depths)) != len(depths):
            raise UserError(f"--depths: {_ints(depths)} repeats a depth")
        if len(depths) < 2:
            raise UserError(
                f"--depths {_ints(depths)}: a ladder of one size cannot fit a scaling law; "
                "give two or more depths (three or more to fit the irreducible loss E)"
            )
        given["depths"] = sorted(depths)
    ratio = given.get("tokens_per_param")
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        raise UserError(f"--tokens-per-param: must be a positive number (got {ratio})")
    for key in ("width_per_depth", "head_dim", "seq_len", "batch_size", "eval_steps", "seeds"):
        if given.get(key) is not None and given[key] < 1:
            raise UserError(f"{FLAG_NAMES[key]}: must be >= 1 (got {given[key]})")
    if given.get("num_threads") is not None and given["num_threads"] < 1:
        raise UserError(f"--num-threads: must be >= 1 (got {given['num_threads']})")
    if given.get("bootstrap") is not None and given["bootstrap"] < 100:
        raise UserError(f"--bootstrap: at least 100 draws (got {given['bootstrap']})")
    lr = given.get("learning_rate")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--learning-rate: must be a positive number (got {lr})")
    if "recipe" in given:
        given["recipe"] = check_recipe(given["recipe"])
    if given.get("compare_results"):
        compare_ranking(given["compare_results"])  # readable, or one line now
    return ScaleSettings(**given)


def compare_ranking(path: str) -> dict[str, Any]:
    """An `archlab compare` results.json: its architectures by mean final val loss (lowest
    first) and its protocol; anything else is one line naming --compare-results."""
    where = Path(path)
    if where.is_dir():
        where = where / "results.json"
    try:
        doc = json.loads(where.read_text())
        losses = [
            (a["architecture"], a["stats"]["final_val_loss"]["mean"]) for a in doc["architectures"]
        ]
        settings = doc.get("settings", {})
    except FileNotFoundError:
        raise UserError(f"--compare-results: {where} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"--compare-results: {where} is not an archlab compare results.json ({exc})"
        ) from None
    ranked = sorted((loss, arch) for arch, loss in losses if isinstance(loss, (int, float)))
    return {
        "path": str(where),
        "ranking": [(arch, loss) for loss, arch in ranked],
        "model_size": settings.get("model_size"),
        "max_tokens": settings.get("max_tokens"),
    }


def _ints(values: list[int]) -> str:
    return ",".join(map(str, values))


def check_recipe(recipe: str) -> str:
    """The recipe name (helper of archlab.recipes where it exists)."""
    try:
        from ...recipes import check_recipe as check
    except ImportError:  # no recipes in this checkout: the trainer's defaults
        if recipe not in ("modern", "classic"):
            raise UserError(
                f"--recipe: unknown recipe {recipe!r} (allowed: modern, classic)"
            ) from None
        return recipe
    return check(recipe)


# ---- saved settings and --resume ----------------------------------------------------------
def load_saved_settings(out_dir: Path) -> ScaleSettings:
    path = out_dir / "scale.json"
    if not path.exists():
        raise UserError(f"--resume: {out_dir} is not an archlab scale folder (no scale.json)")
    try:
        return ScaleSettings.from_dict(json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: cannot read {path} ({exc})") from None


def check_resume_flags(saved: ScaleSettings, raw: dict[str, Any]) -> None:
    """Explicit flags given with --resume must agree with the saved study."""
    for key, value in raw.items():
        if value is None or key in ("data", "compare_results"):
            continue
        mine = getattr(saved, key)
        if key == "depths":
            value = sorted(value)
        if mine != value:
            shown = _ints(value) if isinstance(value, list) and key == "depths" else value
            if isinstance(value, list) and key == "architectures":
                shown = ",".join(value)
            raise UserError(
                f"--resume: {FLAG_NAMES[key]} {shown} differs from this study's "
                f"{mine} (scale.json); drop the flag or use a new --out-dir"
            )

"""What the fitted laws say: one fit per architecture, the table of exponents, the predicted
loss at the seed documents' sizes, the curves the plot draws, and the largest rung's ranking
(against a compare run's when one is given). report.py writes them out."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from ..common.results import RunResult, Stat
from . import fit as fitting
from .ladder import Rung
from .settings import ScaleSettings

SEED_SIZES = ("tiny", "medium", "large")
EXTRAPOLATE = 100.0  # the plot's dashed curves reach 100x the largest measured compute


def fit_all(s: ScaleSettings, runs: list[RunResult]) -> list[fitting.Fit]:
    """One law per architecture over its finished runs that learned: a run whose final val
    loss is not below the data's unigram baseline (compare's "did not learn") is left out of
    the fit, as it wins nothing in compare, and the fit's note names how many."""
    out = []
    for arch in s.architectures:
        ok = [r for r in runs if r.architecture == arch and r.ok and r.train_flops]
        learned = [r for r in ok if r.learned is not False]
        f = fitting.fit_power_law(
            [r.train_flops for r in learned],
            [r.final_val_loss for r in learned],
            arch,
            draws=s.bootstrap,
            seed=s.seed,
        )
        if len(learned) < len(ok):
            left = f"{len(ok) - len(learned)} run(s) that did not learn left out"
            f.note = left + (f"; {f.note}" if f.note else "")
        out.append(f)
    return out


def seed_size_compute(s: ScaleSettings, arch: str) -> dict[str, float]:
    """The compute of a run at each seed size (its preset, 32k vocabulary, its context) at the
    study's tokens per parameter: where the fitted laws are asked to predict."""
    return {
        size: flops * s.tokens_per_param * params
        for size, (flops, params) in _seed_size_costs(arch).items()
    }


@lru_cache(maxsize=64)
def _seed_size_costs(arch: str) -> dict[str, tuple[float, int]]:
    """Size -> (training FLOPs per token, active parameters); built once per process (a
    meta-device build of `large` takes a second or two)."""
    from ...config import preset_config
    from ...models import build_model
    from ...train.flops import flops_per_token

    out = {}
    for size in SEED_SIZES:
        cfg = preset_config(arch, model_size=size)
        model = build_model(cfg, device="meta")
        out[size] = (flops_per_token(model, cfg.max_seq_len), int(model.num_active_parameters()))
    return out


def interval(iv: tuple[float, float] | None, fmt: str) -> str:
    return "no interval (too wide to call)" if iv is None else f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def fits_rows(fits: list[fitting.Fit]) -> list[list[str]]:
    rows = []
    for f in fits:
        if f.law is None:
            rows.append([f.architecture, "-", "-", "-", str(f.n_points), f.note])
            continue
        a_iv, e_iv = f.interval("alpha"), f.interval("E")
        width = (a_iv[1] - a_iv[0]) if a_iv else math.inf
        note = f.note or ("too wide to call" if width > f.law.alpha else "")
        rows.append(
            [
                f.architecture,
                f"{f.law.alpha:.3f} {interval(a_iv, '.3f')}",
                f"{f.law.E:.3f} {interval(e_iv, '.3f')}",
                f"{f.law.A:.3g}",
                str(f.n_points),
                note,
            ]
        )
    return rows


def predictions(s: ScaleSettings, fits: list[fitting.Fit]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in fits:
        if f.law is None:
            continue
        out[f.architecture] = {}
        for size, c in seed_size_compute(s, f.architecture).items():
            value, iv = f.predict(c)
            out[f.architecture][size] = {
                "compute": c,
                "loss": value,
                "interval": None if iv is None else list(iv),
                "decades_beyond_measured": math.log10(c / f.c_max),
            }
    return out


def fitted_curves(fits: list[fitting.Fit]) -> dict[str, Any]:
    from ..common.plots import FittedCurve

    out = {}
    for f in fits:
        if f.law is None:
            continue
        xs = np.geomspace(min(f.compute) / 2, f.c_max * EXTRAPOLATE, 80)
        xs = np.unique(np.append(xs, f.c_max))
        ys = f.law(xs)
        if f.draws is not None:
            d = f.draws
            band = d[:, :1] + d[:, 1:2] * np.power(xs[None], -d[:, 2:3])
            lo, hi = np.quantile(band, [(1 - fitting.LEVEL) / 2, (1 + fitting.LEVEL) / 2], 0)
        else:
            lo = hi = ys
        out[f.architecture] = FittedCurve(
            list(xs), list(ys), list(lo), list(hi), f.c_max, f.architecture
        )
    return out


def top_rung_ranking(
    s: ScaleSettings, rungs: list[Rung], results: dict[str, list[RunResult]]
) -> tuple[list[tuple[str, float]], str]:
    """Architectures by mean final val loss at the largest depth (lowest first), and the
    leader's significance over seeds (compare's Welch test, bench/stats.py)."""
    from ..common import stats

    top = max(s.depths)
    losses = {
        r.architecture: [x.final_val_loss for x in results.get(r.name, []) if x.ok]
        for r in rungs
        if r.depth == top
    }
    scored = sorted((Stat.of(v).mean, a) for a, v in losses.items() if Stat.of(v).mean is not None)
    decision = stats.decide({a: v for a, v in losses.items() if v}, lower_is_better=True)
    return [(a, loss) for loss, a in scored], stats.describe(decision)


def versus_compare(s: ScaleSettings, ranking: list[tuple[str, float]]) -> dict[str, Any]:
    """Whether the largest rung ranks the architectures as an `archlab compare` run did (over
    the architectures both have); without --compare-results, says how to ask."""
    from .settings import compare_ranking

    if not s.compare_results:
        return {
            "same_order": None,
            "line": "not compared with a compare ranking (pass --compare-results "
            "<compare folder>, e.g. the default `archlab compare`'s)",
        }
    other = compare_ranking(s.compare_results)
    mine = [a for a, _ in ranking]
    theirs = [a for a, _ in other["ranking"]]
    common = [a for a in mine if a in theirs]
    mine_c, theirs_c = common, [a for a in theirs if a in common]
    same = len(common) >= 2 and mine_c == theirs_c
    where = (
        f"compare {other['path']} (model size {other['model_size']}, {other['max_tokens']} tokens)"
    )
    if len(common) < 2:
        line = f"fewer than two architectures in common with {where}: nothing to compare"
    elif same:
        line = f"same order as {where} over {len(common)} architectures: {' < '.join(mine_c)}"
    else:
        line = f"differs from {where}: here {' < '.join(mine_c)}; there {' < '.join(theirs_c)}"
    return {
        "same_order": same if len(common) >= 2 else None,
        "line": line,
        "compare_results": other["path"],
        "compare_ranking": [{"architecture": a, "final_val_loss": v} for a, v in other["ranking"]],
        "common": common,
    }

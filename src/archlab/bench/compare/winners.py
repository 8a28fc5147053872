"""The comparison's winners: one outcome per criterion, named only on a significant lead.

A leader by mean is crowned only when Welch's t-test over seeds (``common/stats.py``) puts it
ahead of every other candidate (p < 0.05) by at least ``MIN_EFFECT``; otherwise a tie, and with
one seed a leader without significance. Rows that did not learn, or lost a seed, are excluded
where the criterion would flatter them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..common import stats
from ..common.results import ArchResult

MIB = 1024.0 * 1024.0

CRITERIA = ("fastest", "least memory", "best loss", "most stable")
ONE_SEED = "one seed: no significance can be claimed"
# The smallest lead that crowns a winner, beside p < 0.05 (a significant but tiny difference
# is a tie): nats/token for the loss, a fraction of the other's value for the rest.
MIN_EFFECT = {
    "best loss": (0.02, False),
    "fastest": (0.05, True),
    "least memory": (0.05, True),
    "most stable": (0.2, True),
}


@dataclass
class Winner:
    """One criterion's outcome. ``architecture`` is None when nobody wins (a tie, or no
    candidate); ``tied`` then names the tied architectures; ``p_value`` is the Welch p the
    decision rests on (None with one seed, where no significance can be claimed)."""

    criterion: str  # "fastest" | "least memory" | "best loss" | "most stable"
    architecture: str | None
    detail: str
    tied: list[str] = field(default_factory=list)
    p_value: float | None = None
    kind: str = "winner"  # "winner" | "only" | "tie" | "unproven" | "none"

    def line(self) -> str:
        if self.kind == "tie":
            return f"{self.criterion}: tie: {', '.join(self.tied)} ({self.detail})"
        who = self.architecture or "none"
        return f"{self.criterion}: {who} ({self.detail})"

    def headline(self) -> str:
        """The line as printed: "Winner" only for a significant, large enough lead."""
        if self.kind == "winner":
            return f"Winner, {self.line()}"
        if self.kind == "unproven":
            return f"Leader ({ONE_SEED}), {self.line()}"
        if self.kind == "only":
            return f"Only candidate, {self.line()}"
        return f"No winner, {self.line()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "architecture": self.architecture,
            "detail": self.detail,
            "kind": self.kind,
            "headline": self.headline(),
            "tied": self.tied,
            "p_value": self.p_value,
        }


def _values(a: ArchResult, metric: str) -> list[float]:
    stat = a.stats.get(metric)
    return list(stat.values) if stat is not None else []


def _significance_winner(
    criterion: str,
    cands: list[ArchResult],
    metric: str,
    lower_is_better: bool,
    show: Any,
    excluded: str,
) -> Winner:
    """Leader by mean; named only when Welch's test (p < 0.05) puts it ahead of every other
    candidate by at least MIN_EFFECT; a tie otherwise; with one seed, a leader for which no
    significance can be claimed."""
    values = {a.architecture: _values(a, metric) for a in cands}
    effect, relative = MIN_EFFECT[criterion]
    d = stats.decide(values, lower_is_better, effect, relative)
    if d.kind == "none":
        return Winner(criterion, None, "no data" + excluded, kind="none")
    by_name = {a.architecture: a for a in cands}
    what = show(by_name[d.leader].mean(metric))
    sig = stats.describe(d)
    if d.kind == "tie":
        p = max(d.p_values[k] for k in d.tied[1:])
        shown = ", ".join(f"{k} {show(by_name[k].mean(metric))}" for k in d.tied[1:])
        detail = f"{d.leader} {what} vs {shown}: {sig}"
        return Winner(criterion, None, detail + excluded, d.tied, p, "tie")
    p = max(d.p_values.values()) if d.p_values else None
    if d.kind in ("unproven", "only"):
        sig = ""  # the headline says it
    detail = what + (f"; {sig}" if sig else "")
    return Winner(criterion, d.leader, detail + excluded, [], p, d.kind)


def _excluded(groups: list[tuple[str, list[str]]]) -> str:
    return "".join(f"; excluded, {why}: {', '.join(names)}" for why, names in groups if names)


def winners(archs: list[ArchResult]) -> list[Winner]:
    """One outcome per criterion among the architectures that finished a seed and learned
    (a row whose final val loss is not below the unigram baseline by the stated margin wins
    nothing). An architecture with a failed seed (diverged, stopped by the NaN guard, a
    non-finite loss) cannot win "best loss" or "most stable": its survivors are the lucky
    seeds.

    fastest: highest tokens/s. least memory: lowest model memory (peak minus the process
    before the model; the peak where that is unknown). best loss: lowest final validation
    loss. most stable: lowest training-loss roughness (std of step-to-step loss change over
    the second half) among the rows with the fewest NaN/skipped steps. Each names a winner
    only when Welch's t-test over seeds puts it ahead of every other candidate (p < 0.05) by
    at least MIN_EFFECT; otherwise a tie; with one seed a leader without significance.
    """
    ok = [a for a in archs if a.ok_runs]
    if not ok:
        return [Winner(c, None, "every run failed", kind="none") for c in CRITERIA]
    cands = [a for a in ok if a.learned is not False]
    dropped = [a.architecture for a in ok if a.learned is False]
    if not cands:
        return [
            Winner(c, None, "no run learned: none below the unigram baseline", kind="none")
            for c in CRITERIA
        ]
    failed = [a.architecture for a in cands if a.status != "ok"]
    whole = [a for a in cands if a.status == "ok"]
    not_learned = ("did not learn", dropped)
    excluded = _excluded([not_learned])
    excluded_failed = _excluded([not_learned, ("a seed failed", failed)])

    mem_metric = (
        "model_mem_bytes"
        if all(a.mean("model_mem_bytes") is not None for a in cands)
        else "peak_mem_bytes"
    )
    mem_label = "MiB model memory" if mem_metric == "model_mem_bytes" else "MiB peak"
    out = [
        _significance_winner(
            "fastest", cands, "tokens_per_s", False, lambda v: f"{v:,.0f} tokens/s", excluded
        ),
        _significance_winner(
            "least memory",
            cands,
            mem_metric,
            True,
            lambda v: f"{v / MIB:.1f} {mem_label}",
            excluded,
        ),
    ]
    if not whole:
        why = "every candidate had a failed seed" + excluded_failed
        out += [Winner(c, None, why, kind="none") for c in ("best loss", "most stable")]
        return out
    out.append(
        _significance_winner(
            "best loss",
            whole,
            "final_val_loss",
            True,
            lambda v: f"final val loss {v:.4f}",
            excluded_failed,
        )
    )
    out.append(_most_stable(whole, excluded_failed))
    return out


def _most_stable(cands: list[ArchResult], excluded: str) -> Winner:
    """Fewest NaN/skipped steps first (every seed's count); among those, the roughness
    decided by the same test as the other criteria, or no crown."""
    nan = {a.architecture: a.mean("nan_count") or 0.0 for a in cands}
    fewest = min(nan.values())
    more = [k for k, v in nan.items() if v > fewest]
    pool = [a for a in cands if nan[a.architecture] == fewest]
    excluded += _excluded([("more NaN/skipped steps", more)])
    has_rough = [a for a in pool if _values(a, "roughness")]
    if not has_rough:
        detail = f"{fewest:.0f} NaN/skipped steps; no train-loss roughness measured"
        return Winner("most stable", None, detail + excluded, kind="none")
    w = _significance_winner(
        "most stable",
        has_rough,
        "roughness",
        True,
        lambda v: f"train-loss roughness {v:.4f}, {fewest:.0f} NaN/skipped steps",
        excluded,
    )
    return w

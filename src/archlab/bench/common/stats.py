"""Significance for the comparison: Welch's t-test between seeds, 95% confidence intervals,
and the rule that turns "lowest mean" into a winner only when the data supports it.

Why Welch (unequal variances): two architectures rarely have the same seed-to-seed spread
(a MoE's routing adds variance a dense model does not have), and Student's pooled test
would then be too eager. With n seeds per side the test has few degrees of freedom, so a
tie is the honest answer more often than a lowest mean suggests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

ALPHA = 0.05  # a winner needs p < ALPHA against every other candidate


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (scipy.stats.ttest_ind, equal_var=False).

    None with fewer than two values on either side (no variance estimate). When both sides
    have zero spread the t statistic is undefined: equal means give p = 1, different means
    p = 0 (every seed agrees on the order).
    """
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.pvariance(a) == 0.0 and statistics.pvariance(b) == 0.0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    from scipy.stats import ttest_ind

    p = float(ttest_ind(list(a), list(b), equal_var=False).pvalue)
    return p if math.isfinite(p) else 1.0


def ci95_halfwidth(values: Sequence[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean (Student t, n - 1 dof)."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n))


def format_p(p: float) -> str:
    """p = 0.031, p = 4.2e-05 (small values stay readable)."""
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


@dataclass
class Decision:
    """The outcome of one criterion among candidates (each a list of per-seed values).

    kind: "winner" (significant against every other candidate), "only" (a single candidate:
    nothing to compare it with),
    "tie" (the leader and everyone not significantly worse), "unproven" (the leader, but
    some candidate has one seed: no significance can be claimed), "none" (no candidates).
    """

    kind: str
    leader: str | None
    tied: list[str] = field(default_factory=list)  # leader first; only for "tie"
    p_values: dict[str, float] = field(default_factory=dict)  # other candidate -> p vs leader
    runner_up: str | None = None
    # tied candidates whose difference is significant but below the minimum effect:
    # candidate -> its difference to the leader
    small: dict[str, float] = field(default_factory=dict)
    min_effect: str = ""  # the minimum effect in words, for the line

    @property
    def p_runner_up(self) -> float | None:
        return self.p_values.get(self.runner_up) if self.runner_up else None


def decide(
    candidates: dict[str, Sequence[float]],
    lower_is_better: bool,
    min_effect: float = 0.0,
    relative: bool = False,
) -> Decision:
    """Leader by mean; a winner only if Welch's test puts it ahead of each other candidate
    at p < ALPHA *and* by at least ``min_effect`` (absolute, or a fraction of the other
    candidate's mean when ``relative``). Candidates with no values are ignored."""
    cands = {k: list(v) for k, v in candidates.items() if v}
    if not cands:
        return Decision("none", None)
    sign = 1.0 if lower_is_better else -1.0
    order = sorted(cands, key=lambda k: sign * statistics.fmean(cands[k]))
    leader = order[0]
    effect = (f"{100 * min_effect:g}%" if relative else f"{min_effect:g}") if min_effect else ""
    if len(order) == 1:
        return Decision("only", leader, min_effect=effect)
    runner_up = order[1]
    if any(len(cands[k]) < 2 for k in order):
        return Decision("unproven", leader, runner_up=runner_up, min_effect=effect)
    p_values = {k: welch_p(cands[leader], cands[k]) for k in order[1:]}
    p_values = {k: (1.0 if p is None else p) for k, p in p_values.items()}
    lead = statistics.fmean(cands[leader])
    small = {}
    for k in order[1:]:
        diff = abs(statistics.fmean(cands[k]) - lead)
        need = min_effect * abs(statistics.fmean(cands[k])) if relative else min_effect
        if p_values[k] < ALPHA and diff < need:
            small[k] = diff
    tied = [leader] + [k for k in order[1:] if p_values[k] >= ALPHA or k in small]
    if len(tied) == 1:
        return Decision("winner", leader, p_values=p_values, runner_up=runner_up, min_effect=effect)
    return Decision(
        "tie",
        leader,
        tied=tied,
        p_values=p_values,
        runner_up=runner_up,
        small=small,
        min_effect=effect,
    )


def describe(d: Decision) -> str:
    """The significance part of a winner line."""
    if d.kind == "none":
        return ""
    if d.kind == "unproven":
        return "one seed: no significance can be claimed"
    if d.kind == "only":
        return "the only candidate: nothing to compare it with"
    if d.kind == "winner":
        # the weakest of its wins (usually the runner-up's) is the one to quote
        closest = max(d.p_values, key=lambda k: d.p_values[k])
        text = f"Welch's t-test vs {closest}: p = {format_p(d.p_values[closest])}"
        return text + (
            f", ahead by at least the minimum effect {d.min_effect}" if d.min_effect else ""
        )
    parts = []
    for k in d.tied[1:]:
        if k in d.small:
            parts.append(
                f"{k} p = {format_p(d.p_values[k])} but difference {d.small[k]:.3g} below the "
                f"minimum effect {d.min_effect}"
            )
        else:
            parts.append(f"{k} p = {format_p(d.p_values[k])}")
    what = "not significant or too small" if d.small else "not significant"
    return f"{what} vs {d.leader} ({', '.join(parts)})"


__all__ = ["ALPHA", "Decision", "ci95_halfwidth", "decide", "describe", "format_p", "welch_p"]

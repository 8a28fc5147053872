"""Fitting L(C) = E + A * C^-alpha to (compute, final loss) points, with bootstrap intervals.

The fit: compute is scaled to c = C / C_ref (C_ref the geometric mean of the points) so the
numbers stay well conditioned; for a fixed alpha the model is linear in (E, A), solved by
non-negative least squares (E >= 0, A >= 0: a loss floor and a loss that falls with compute);
alpha is found on a fine log grid (ALPHA_RANGE) refined by a parabola, then the three
parameters are polished together with ``scipy.optimize.least_squares``. With fewer than three
distinct compute values, or no more runs than three, E is not identifiable (the curve would
pass through every point) and is fixed at 0 (a pure power law, two parameters), said so.

The intervals: a residual bootstrap over seeds and points. Every run (a seed at a rung) is a
point; each draw adds residuals resampled with replacement from all runs (scaled by
sqrt(n / (n - k)) for the k fitted parameters) to the fitted curve and refits. Percentile
intervals at ``LEVEL``. tests/test_scaling_laws_fit.py measures their coverage over repeated
synthetic draws.

Crossovers: the compute at which two fitted curves cross, searched on a log grid from
CROSS_RANGE below the smallest to CROSS_RANGE above the largest measured compute; its interval
comes from pairing the two architectures' bootstrap draws. A crossover is "too wide to call"
unless at least CALL_FRACTION of the paired draws cross in the searched range and its interval
spans less than CALL_DECADES decades.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LEVEL = 0.90  # the intervals' nominal coverage
ALPHA_RANGE = (0.005, 3.0)
_GRID = np.geomspace(*ALPHA_RANGE, 241)
CROSS_RANGE = 1e3  # crossovers searched from 1e-3 x the smallest to 1e3 x the largest compute
CALL_FRACTION = 0.9
CALL_DECADES = 2.0


@dataclass
class PowerLaw:
    """L(C) = E + A * C^-alpha in the caller's compute units."""

    E: float
    A: float
    alpha: float

    def __call__(self, c: Any) -> Any:
        return self.E + self.A * np.power(np.asarray(c, dtype=float), -self.alpha)


def _nnls_sums(n, sx, sxx, sy, sxy, syy):  # noqa: ANN001, ANN202 (broadcasting arrays)
    """min ||E + A x - y||^2 with E, A >= 0 from the sums of x, x^2, y, x y, y^2 (arrays of
    any common shape): (E, A, SSE). The free optimum where it is feasible, else the better
    boundary (E = 0, or A = 0)."""
    det = n * sxx - sx * sx
    safe = np.where(np.abs(det) < 1e-300, 1.0, det)
    A = np.where(np.abs(det) < 1e-300, np.nan, (n * sxy - sx * sy) / safe)
    E = np.where(np.abs(det) < 1e-300, np.nan, (sxx * sy - sx * sxy) / safe)
    A0 = np.maximum(sxy / sxx, 0.0)  # E = 0
    E1 = np.maximum(sy / n, 0.0) + 0.0 * A0  # A = 0

    def sse(e, a):  # noqa: ANN001, ANN202
        return syy - 2 * e * sy - 2 * a * sxy + n * e * e + 2 * e * a * sx + a * a * sxx

    ok = (E >= 0) & (A >= 0) & np.isfinite(E) & np.isfinite(A)
    cands = [(np.where(ok, E, 0.0), np.where(ok, A, 0.0)), (0.0 * A0, A0), (E1, 0.0 * A0)]
    sses = np.stack([np.where(ok, sse(*cands[0]), np.inf), sse(*cands[1]), sse(*cands[2])])
    pick = np.argmin(sses, axis=0)
    Es = np.choose(pick, [c[0] for c in cands])
    As = np.choose(pick, [c[1] for c in cands])
    return Es, As, np.min(sses, axis=0)


def _fit_fixed_alpha(x: np.ndarray, y: np.ndarray, free_e: bool):  # noqa: ANN202
    """(E, A, SSE) for features x and draws y broadcast over their leading axes (last: n)."""
    n = x.shape[-1]
    sx, sxx = x.sum(-1), (x * x).sum(-1)
    sy, sxy, syy = y.sum(-1), (x * y).sum(-1), (y * y).sum(-1)
    if free_e:
        return _nnls_sums(n, sx, sxx, sy, sxy, syy)
    A = np.maximum(sxy / sxx, 0.0)
    return 0.0 * A, A, syy - 2 * A * sxy + A * A * sxx


def _grid_fit(c: np.ndarray, y: np.ndarray, free_e: bool) -> np.ndarray:
    """(B, 3) rows (E, A, alpha) in scaled units for every draw y: (B, n)."""
    x = np.power(c[None, :], -_GRID[:, None])  # (G, n)
    _, _, S = _fit_fixed_alpha(x[None], y[:, None, :], free_e)  # (B, G)
    k = np.argmin(S, axis=1)
    # a parabola through the best grid point and its neighbours, in log alpha
    logs = np.log(_GRID)
    kk = np.clip(k, 1, len(_GRID) - 2)
    rows = np.arange(len(k))
    s0, s1, s2 = S[rows, kk - 1], S[rows, kk], S[rows, kk + 1]
    denom = s0 - 2 * s1 + s2
    shift = np.where(denom > 0, 0.5 * (s0 - s2) / np.where(denom > 0, denom, 1.0), 0.0)
    alpha = np.exp(logs[kk] + np.clip(shift, -1, 1) * (logs[1] - logs[0]))
    alpha = np.where((k == 0) | (k == len(_GRID) - 1), _GRID[k], alpha)
    E, A, _ = _fit_fixed_alpha(np.power(c[None, :], -alpha[:, None]), y, free_e)
    return np.stack([E, A, alpha], axis=1)


@dataclass
class Fit:
    """One architecture's fitted law, its intervals and what the points were."""

    architecture: str
    law: PowerLaw | None
    compute: list[float]  # every run's compute (FLOPs) and loss, the points fitted
    loss: list[float]
    free_e: bool = True
    draws: np.ndarray | None = field(default=None, repr=False)  # (B, 3): E, A, alpha
    note: str = ""

    @property
    def n_points(self) -> int:
        return len(self.compute)

    @property
    def c_max(self) -> float:
        return max(self.compute)

    def interval(self, name: str) -> tuple[float, float] | None:
        if self.draws is None or not len(self.draws):
            return None
        col = {"E": 0, "A": 1, "alpha": 2}[name]
        lo, hi = np.quantile(self.draws[:, col], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        return float(lo), float(hi)

    def predict(self, c: float) -> tuple[float, tuple[float, float] | None]:
        """Loss at compute c and its interval (from the bootstrap draws)."""
        assert self.law is not None
        value = float(self.law(c))
        if self.draws is None or not len(self.draws):
            return value, None
        d = self.draws
        ys = d[:, 0] + d[:, 1] * np.power(c, -d[:, 2])
        lo, hi = np.quantile(ys, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        return value, (float(lo), float(hi))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "n_points": self.n_points,
            "free_E": self.free_e,
            "note": self.note,
            "level": LEVEL,
            "bootstrap_draws": 0 if self.draws is None else int(len(self.draws)),
        }
        if self.law is not None:
            out |= {k: v for k, v in asdict(self.law).items()}
            for name in ("E", "A", "alpha"):
                iv = self.interval(name)
                out[f"{name}_interval"] = None if iv is None else list(iv)
        return out


def fit_power_law(
    compute: list[float], loss: list[float], architecture: str = "", draws: int = 1000,
    seed: int = 0,
) -> Fit:  # fmt: skip
    """Fit L = E + A C^-alpha to the points (one per run) and bootstrap its parameters."""
    from scipy.optimize import least_squares

    c_raw = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(c_raw) & np.isfinite(y) & (c_raw > 0)
    c_raw, y = c_raw[keep], y[keep]
    distinct = len(np.unique(c_raw))
    fit = Fit(architecture, None, c_raw.tolist(), y.tolist())
    if distinct < 2:
        fit.note = "fewer than two compute values: no fit"
        return fit
    # E is fitted only from three compute values and more runs than the three parameters
    # (else the curve passes through every point and there is nothing left to bootstrap)
    free_e = distinct >= 3 and len(y) > 3
    if not free_e:
        fit.free_e = False
        fit.note = f"{len(y)} runs at {distinct} compute values: E fixed at 0 (a pure power law)"
    c_ref = float(np.exp(np.mean(np.log(c_raw))))
    c = c_raw / c_ref
    E, A, alpha = _grid_fit(c, y[None], free_e)[0]

    def resid(p: np.ndarray) -> np.ndarray:
        e = p[0] if free_e else 0.0
        return e + p[1] * np.power(c, -p[2]) - y

    lo = [0.0, 0.0, ALPHA_RANGE[0]]
    hi = [np.inf, np.inf, ALPHA_RANGE[1]]
    p0 = np.clip([E, max(A, 1e-12), alpha], np.add(lo, 1e-12), np.subtract(hi, 1e-12))
    try:
        polished = least_squares(resid, p0, bounds=(lo, hi), method="trf").x
        if np.sum(resid(polished) ** 2) <= np.sum(resid(p0) ** 2):
            E, A, alpha = polished
    except ValueError:
        pass
    E = float(E) if free_e else 0.0
    fit.law = PowerLaw(E, float(A) * c_ref ** float(alpha), float(alpha))
    k = 3 if free_e else 2
    n = len(y)
    if n <= k:
        fit.note += "; as many runs as parameters: exact, no interval"
        return fit
    fitted = E + A * np.power(c, -alpha)
    r = (y - fitted) * math.sqrt(n / (n - k))
    rng = np.random.default_rng(seed)
    ys = fitted[None] + r[rng.integers(0, n, size=(draws, n))]
    boot = _grid_fit(c, ys, free_e)
    boot[:, 1] = boot[:, 1] * np.power(c_ref, boot[:, 2])  # A back in FLOP units
    fit.draws = boot
    return fit


# ---- crossovers -----------------------------------------------------------------------------
@dataclass
class Crossover:
    """Where two architectures' fitted curves cross, and whether that can be called."""

    first: str
    second: str
    compute: float | None  # the point estimate (None: the fitted curves do not cross)
    interval: tuple[float, float] | None
    fraction_crossing: float  # of the paired bootstrap draws
    callable: bool
    below: str | None = None  # the architecture with the lower loss beyond the crossover
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = None if self.interval is None else list(self.interval)
        return d


def _crossing(p: np.ndarray, q: np.ndarray, grid: np.ndarray, last: bool = True) -> np.ndarray:
    """For (B, 3) parameter rows p and q: the last (or first) compute on ``grid`` where they
    cross (log-linear interpolation of the difference), NaN where they do not. Two laws
    E + A C^-alpha can cross twice (the steeper one passes the other, then the lower E wins
    back): the last crossing decides which is lower at scale."""
    fp = p[:, :1] + p[:, 1:2] * np.power(grid[None], -p[:, 2:3])
    fq = q[:, :1] + q[:, 1:2] * np.power(grid[None], -q[:, 2:3])
    diff = fp - fq  # (B, G)
    sign = np.sign(diff)
    change = (sign[:, :-1] * sign[:, 1:]) < 0  # (B, G - 1)
    has = change.any(axis=1)
    if last:
        k = change.shape[1] - 1 - np.argmax(change[:, ::-1], axis=1)
    else:
        k = np.argmax(change, axis=1)
    rows = np.arange(len(k))
    d0, d1 = diff[rows, k], diff[rows, np.minimum(k + 1, grid.size - 1)]
    lg = np.log(grid)
    t = np.where(has & (d0 != d1), d0 / np.where(d0 != d1, d0 - d1, 1.0), 0.0)
    t = np.clip(t, 0.0, 1.0)
    at = np.exp(lg[k] + t * (lg[1] - lg[0]))
    return np.where(has, at, np.nan)


def crossover(f: Fit, g: Fit) -> Crossover:
    """The compute at which f's and g's curves cross, with its interval and verdict."""
    if f.law is None or g.law is None:  # (an architecture whose runs all failed has no points)
        return Crossover(f.architecture, g.architecture, None, None, 0.0, False,
                         verdict="no fit for one of them")  # fmt: skip
    lo = min(min(f.compute), min(g.compute)) / CROSS_RANGE
    hi = max(f.c_max, g.c_max) * CROSS_RANGE
    grid = np.geomspace(lo, hi, 2001)
    where = f"between {lo:.2e} and {hi:.2e} FLOPs"
    law = lambda fit: np.array([[fit.law.E, fit.law.A, fit.law.alpha]])  # noqa: E731
    point = float(_crossing(law(f), law(g), grid)[0])
    point_or_none = None if math.isnan(point) else point
    first = float(_crossing(law(f), law(g), grid, last=False)[0])
    also = (
        f" (the fitted curves also cross earlier, at {first:.2e} FLOPs)"
        if point_or_none is not None and first < point * (1 - 1e-9)
        else ""
    )
    below = None
    if point_or_none is not None:
        beyond = point * 10
        below = f.architecture if f.law(beyond) < g.law(beyond) else g.architecture
    if f.draws is None or g.draws is None:
        verdict = "too wide to call (no bootstrap interval: too few points)"
        return Crossover(f.architecture, g.architecture, point_or_none, None, 0.0, False, below,
                         verdict)  # fmt: skip
    n = min(len(f.draws), len(g.draws))
    at = _crossing(f.draws[:n], g.draws[:n], grid)
    frac = float(np.mean(np.isfinite(at)))
    interval = None
    if np.isfinite(at).sum() >= 2:
        lo_q, hi_q = np.quantile(at[np.isfinite(at)], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        interval = (float(lo_q), float(hi_q))
    decades = math.log10(interval[1] / interval[0]) if interval else math.inf
    ok = point_or_none is not None and frac >= CALL_FRACTION and decades < CALL_DECADES
    if ok:
        verdict = f"{below} is lower beyond {point:.2e} FLOPs{also}"
    elif point_or_none is None and frac <= 1 - CALL_FRACTION:
        ahead = f.architecture if f.law(f.c_max) < g.law(f.c_max) else g.architecture
        verdict = f"no crossover {where}: {ahead} stays lower"
        ok = True
    else:
        verdict = f"too wide to call: {100 * frac:.0f}% of bootstrap draws cross {where}" + (
            f", interval spans {decades:.1f} decades" if interval else ""
        )
    return Crossover(f.architecture, g.architecture, point_or_none, interval, frac, ok, below,
                     verdict)  # fmt: skip

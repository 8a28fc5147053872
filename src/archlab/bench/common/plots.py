"""Plots for compare and bench, drawn with matplotlib's Agg backend (no display needed).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state) and returned, so
tests can inspect the plotted lines. Each data line carries a ``gid`` naming what it shows
(``"val:<arch>"``, ``"train:<arch>"``, ``"fwd:<arch>"``, ...).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ...models import registry  # noqa: E402
from .results import ArchResult, Curve, RunResult  # noqa: E402

# matplotlib's tab10 cycle. Each registered architecture keeps the colour of its place in
# the registry in every figure (dense C0, hypermixer C1, ...), whichever subset a figure shows;
# any other series (a label such as "dense (nano)") takes the cycle colour of its position.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def color_of(name: str, index: int) -> str:
    """The colour of architecture ``name`` (its registry place), else of position ``index``."""
    names = list(registry.SPECS)
    if name in names:
        return PALETTE[names.index(name) % len(PALETTE)]
    return f"C{index % 10}"


@dataclass
class MeanCurve:
    """A curve averaged over seeds, aligned by record index (same protocol, same steps)."""

    x_tokens: list[float] = field(default_factory=list)
    x_time: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


def mean_curve(curves: Sequence[Curve]) -> MeanCurve:
    curves = [c for c in curves if c.loss]
    out = MeanCurve()
    if not curves:
        return out
    n = min(len(c.loss) for c in curves)
    for i in range(n):
        ys = [c.loss[i] for c in curves]
        out.x_tokens.append(statistics.fmean(c.tokens[i] for c in curves))
        out.x_time.append(statistics.fmean(c.elapsed_s[i] for c in curves))
        out.mean.append(statistics.fmean(ys))
        out.std.append(statistics.stdev(ys) if len(ys) > 1 else 0.0)
    return out


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average with bias correction (as in TensorBoard smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


REFERENCE_STYLES = {
    "unigram": ("dimgray", "-."),
    "bigram": ("gray", ":"),
    "entropy floor": ("black", "--"),
}


def draw_references(ax, references: Sequence[tuple[str, float]]) -> None:
    """Horizontal baselines (unigram, bigram, entropy floor), gid ``ref:<label>``."""
    for i, (label, value) in enumerate(references):
        if value is None or not math.isfinite(value):
            continue
        color, style = REFERENCE_STYLES.get(label, (f"C{i}", "--"))
        ax.axhline(
            value,
            color=color,
            linestyle=style,
            linewidth=1.0,
            gid=f"ref:{label}",
            label=f"{label} ({value:.3f})",
        )


def loss_figure(
    runs_by_arch: dict[str, list[RunResult]],
    x: str,
    entropy_floor: float | None = None,
    title: str = "",
    references: Sequence[tuple[str, float]] = (),
) -> Figure:
    """Validation loss (solid, one line per architecture, mean over seeds with a ±std band)
    and smoothed training loss (dotted, thin) against tokens (x="tokens") or seconds
    (x="time"), with the data's baselines as horizontal lines (``references``: (label,
    nats/token); ``entropy_floor`` alone is the older spelling of one such line)."""
    if x not in ("tokens", "time"):
        raise ValueError(f"x must be 'tokens' or 'time', got {x!r}")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (arch, runs) in enumerate(runs_by_arch.items()):
        ok = [r for r in runs if r.ok] or runs
        color = color_of(arch, i)
        train = mean_curve([r.train_curve for r in ok])
        if train.mean:
            tx = train.x_tokens if x == "tokens" else train.x_time
            ax.plot(
                tx,
                ema(train.mean),
                color=color,
                linewidth=0.8,
                alpha=0.45,
                linestyle=":",
                gid=f"train:{arch}",
                label="_nolegend_",
            )
        val = mean_curve([r.val_curve for r in ok])
        if not val.mean:
            continue
        vx = val.x_tokens if x == "tokens" else val.x_time
        label = arch if len(ok) == 1 else f"{arch} (mean of {len(ok)} seeds)"
        ax.plot(
            vx,
            val.mean,
            color=color,
            linewidth=2.0,
            marker="o",
            markersize=3,
            gid=f"val:{arch}",
            label=label,
        )
        if len(ok) > 1:
            lo = [m - s for m, s in zip(val.mean, val.std, strict=True)]
            hi = [m + s for m, s in zip(val.mean, val.std, strict=True)]
            ax.fill_between(vx, lo, hi, color=color, alpha=0.15, linewidth=0)
    refs = list(references)
    if entropy_floor is not None and not any(lab == "entropy floor" for lab, _ in refs):
        refs.append(("entropy floor", entropy_floor))
    draw_references(ax, refs)
    ax.set_xlabel("training tokens" if x == "tokens" else "wall time (s)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or ("validation loss vs " + ("tokens" if x == "tokens" else "time")))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(
            loc="upper right", fontsize=8, title="solid: val, dotted: train (EMA)", title_fontsize=7
        )
    fig.tight_layout()
    return fig


def lr_sweep_figure(
    grid_by_arch: dict[str, list[ArchResult]],
    title: str = "",
    references: Sequence[tuple[str, float]] = (),
) -> Figure:
    """Final validation loss against the learning rate (log x), one line per architecture
    (gid ``lr:<arch>``; mean over seeds, 95% interval as error bars), its best rate ringed
    (gid ``best:<arch>``), with the data's baselines as horizontal lines."""
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (arch, points) in enumerate(grid_by_arch.items()):
        pts = [
            (p.learning_rate, p.stats["final_val_loss"])
            for p in points
            if p.learning_rate is not None
            and p.stats.get("final_val_loss") is not None
            and p.stats["final_val_loss"].mean is not None
        ]
        if not pts:
            continue
        pts.sort(key=lambda q: q[0])
        color = color_of(arch, i)
        xs = [lr for lr, _ in pts]
        ys = [st.mean for _, st in pts]
        ax.plot(xs, ys, color=color, marker="o", linewidth=2.0, gid=f"lr:{arch}", label=arch)
        err = [st.ci95 or 0.0 for _, st in pts]
        if any(err):
            ax.errorbar(xs, ys, yerr=err, color=color, linestyle="none", capsize=3)
        best = min(pts, key=lambda q: q[1].mean)
        ax.plot(
            [best[0]],
            [best[1].mean],
            marker="o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor=color,
            linestyle="none",
            gid=f"best:{arch}",
            label="_nolegend_",
        )
    draw_references(ax, references)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title or "final validation loss vs learning rate")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8, title="ringed: best rate", title_fontsize=7)
    fig.tight_layout()
    return fig


def loglog_figure(
    panels: list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]],
    xlabel: str,
    title: str = "",
) -> Figure:
    """Side-by-side log-log panels; each panel is (key, ylabel, {name: (xs, ys)}).

    The line for name ``n`` in the panel keyed ``k`` gets gid ``"k:n"``.
    """
    fig = Figure(figsize=(5 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for p, (key, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        for i, (name, (xs, ys)) in enumerate(series.items()):
            pts = [(a, b) for a, b in zip(xs, ys, strict=True) if b is not None and b > 0]
            if not pts:
                continue
            arch = name.split(" ")[0]
            ax.plot(
                [a for a, _ in pts],
                [b for _, b in pts],
                marker="o",
                markersize=3,
                color=color_of(arch, i),
                gid=f"{key}:{name}",
                label=name,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (compute, loss) points no other point beats on both: by rising compute, each one
    lower than every cheaper point (ties in compute: the lowest loss)."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not out or y < out[-1][1]:
            if out and out[-1][0] == x:
                continue
            out.append((x, y))
    return out


@dataclass
class FittedCurve:
    """A fitted loss-vs-compute curve to draw: inside the measured range (solid) and beyond
    it (dashed), each with its confidence band (lo, hi per x)."""

    x: list[float]
    y: list[float]
    lo: list[float]
    hi: list[float]
    x_max_measured: float  # beyond it the curve is an extrapolation
    label: str = ""


def loss_vs_flops_figure(
    points: dict[str, list[tuple[float, float]]],
    title: str = "",
    references: Sequence[tuple[str, float]] = (),
    fits: dict[str, FittedCurve] | None = None,
    frontier: bool = True,
) -> Figure:
    """Final validation loss against training FLOPs (log x): one marker per run (gid
    ``points:<arch>``), the Pareto frontier over all runs (``frontier:all``) and, for a
    scaling study, each architecture's fitted curve (``fit:<arch>`` solid where measured,
    ``extrapolation:<arch>`` dashed beyond) with its shaded interval (``band:<arch>``)."""
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    everything: list[tuple[float, float]] = []
    for i, (arch, pts) in enumerate(points.items()):
        pts = [(x, y) for x, y in pts if x and x > 0 and y is not None and math.isfinite(y)]
        if not pts:
            continue
        everything += pts
        color = color_of(arch, i)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none",
                color=color, gid=f"points:{arch}", label=arch)  # fmt: skip
        fit = (fits or {}).get(arch)
        if fit is None:
            continue
        inside = [k for k, x in enumerate(fit.x) if x <= fit.x_max_measured * (1 + 1e-9)]
        beyond = [k for k, x in enumerate(fit.x) if x >= fit.x_max_measured * (1 - 1e-9)]
        for keys, style, gid in ((inside, "-", "fit"), (beyond, "--", "extrapolation")):
            if len(keys) < 2:
                continue
            ax.plot([fit.x[k] for k in keys], [fit.y[k] for k in keys], linestyle=style,
                    color=color, linewidth=1.4, gid=f"{gid}:{arch}")  # fmt: skip
        band = ax.fill_between(fit.x, fit.lo, fit.hi, color=color, alpha=0.15, linewidth=0)
        band.set_gid(f"band:{arch}")
    if frontier and len(everything) > 1:
        front = pareto_frontier(everything)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="black", linewidth=1.0,
                linestyle=":", drawstyle="steps-post", gid="frontier:all",
                label="Pareto frontier")  # fmt: skip
    draw_references(ax, references)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (forward + backward, train/flops.py)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title or "final validation loss vs training compute", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a PNG atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def data_lines(fig: Figure, prefix: str) -> dict[str, object]:
    """{name: Line2D} of the lines whose gid starts with ``prefix:``."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            gid = line.get_gid() or ""
            if gid.startswith(prefix + ":"):
                out[gid.split(":", 1)[1]] = line
    return out

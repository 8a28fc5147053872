"""`archlab bench lengths` (formerly `bench scaling`): the analysis and outputs of a sweep.

From the points that ``measure.run_sweep`` measured: the fitted exponent p of time ~ T^p per
architecture (least squares on log-log over the whole sweep), and where each architecture
whose token mixing is linear in T (``ArchitectureSpec.linear_in_length``: hypermixer, mamba,
hybrid) becomes cheaper than the reference (``registry.REFERENCE``, dense): the T where the
log-log time curves cross, interpolated between measured points. Then the markdown table,
the log-log figure and ``scaling.json`` / ``scaling.md`` / ``scaling.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...models import registry
from .measure import MODES, Point, ScalingSettings


def challengers() -> tuple[str, ...]:
    """The architectures whose crossover against the reference the analysis looks for."""
    return tuple(s.name for s in registry.SPECS.values() if s.linear_in_length)


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): y ~ x^p. None with fewer than two points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


@dataclass
class Crossover:
    architecture: str
    model_size: str
    mode: str
    seq_len: float | None  # T from which the challenger stays cheaper than the reference
    kind: str  # "crossing" | "range" | "throughout" | "none" | "undecided"
    low: float | None = None  # the measured T below the crossing (crossing, range)

    def describe(self) -> str:
        what = "forward" if self.mode == "fwd" else "forward+backward"
        head = f"{self.architecture} vs {registry.REFERENCE} ({what}, {self.model_size})"
        if self.kind == "none":
            return f"{head}: none in range"
        if self.kind == "undecided":
            return f"{head}: undecided (the spreads overlap at the largest T)"
        if self.kind == "throughout":
            return f"{head}: cheaper at every measured T (from T={self.seq_len:.0f})"
        if self.kind == "range":
            return (
                f"{head}: cheaper from somewhere between T={self.low:.0f} and "
                f"T={self.seq_len:.0f} (the spreads leave the points between undecided)"
            )
        around = float(f"{self.seq_len:.2g}")  # two figures: the points are noisy
        span = f" (between T={self.low:.0f} and the next measured T)" if self.low else ""
        return f"{head}: cheaper from T ~ {around:.0f}{span}"


def crossover(
    seq_lens: list[int], t_dense: list[float | None], t_other: list[float | None]
) -> tuple[float | None, str]:
    """The T beyond which ``other`` is cheaper than dense for the rest of the sweep.

    Interpolates linearly in log T between the last measured point where other was not
    cheaper and the next one, on the log of the time ratio. ("none" when it is not cheaper at
    the largest T, "throughout" when it is cheaper at every T.)
    """
    pts = [
        (T, math.log(o / d))
        for T, d, o in zip(seq_lens, t_dense, t_other, strict=True)
        if d and o and d > 0 and o > 0
    ]
    if not pts or pts[-1][1] >= 0:
        return None, "none"
    last_bad = max((i for i, (_, r) in enumerate(pts) if r >= 0), default=None)
    if last_bad is None:
        return float(pts[0][0]), "throughout"
    (t0, r0), (t1, r1) = pts[last_bad], pts[last_bad + 1]
    frac = r0 / (r0 - r1)  # r0 >= 0 > r1
    return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), "crossing"


def verdict(dense: tuple[float, float] | None, other: tuple[float, float] | None) -> int:
    """-1: other cheaper beyond the spread (its upper quartile below dense's lower one);
    +1: dense cheaper beyond it; 0: the spreads overlap (or are unknown)."""
    if dense is None or other is None:
        return 0
    if other[1] < dense[0]:
        return -1
    if other[0] > dense[1]:
        return 1
    return 0


def crossover_with_spread(
    seq_lens: list[int],
    t_dense: list[float | None],
    t_other: list[float | None],
    verdicts: list[int],
) -> tuple[float | None, str, float | None]:
    """(T, kind, lower T): a crossover only where the spreads decide both sides of it.

    The challenger must be cheaper beyond the spread at the largest T and every T after the
    crossing. Adjacent decided points (dense cheaper, then other cheaper) are interpolated as
    in ``crossover``; undecided points between them give a range instead of a value."""
    if not verdicts or verdicts[-1] != -1:
        kind = "none" if verdicts and verdicts[-1] == 1 else "undecided"
        return None, kind, None
    j = len(verdicts) - 1
    while j > 0 and verdicts[j - 1] == -1:
        j -= 1
    if j == 0:
        return float(seq_lens[0]), "throughout", None
    if verdicts[j - 1] == 1:
        pair = slice(j - 1, j + 1)
        T, _ = crossover(seq_lens[pair], t_dense[pair], t_other[pair])
        return T, "crossing", float(seq_lens[j - 1])
    low = max((i for i in range(j) if verdicts[i] == 1), default=None)
    return float(seq_lens[j]), "range", float(seq_lens[low if low is not None else 0])


def analyse(points: list[Point]) -> dict[str, Any]:
    """Exponents per (architecture, size, mode) and crossovers against the reference."""
    exponents: dict[str, dict[str, Any]] = {}
    series: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        series.setdefault((p.architecture, p.model_size), []).append(p)
    for (arch, size), pts in series.items():
        pts = sorted(pts, key=lambda p: p.seq_len)
        key = f"{arch}/{size}"
        exponents[key] = {"architecture": arch, "model_size": size}
        for mode in MODES:
            ts = [getattr(p, f"{mode}_s") for p in pts]
            ok = [(p.seq_len, t) for p, t in zip(pts, ts, strict=True) if t]
            exponents[key][mode] = fit_exponent([a for a, _ in ok], [b for _, b in ok])
            tail = ok[-2:]
            exponents[key][f"{mode}_last_pair"] = (
                fit_exponent([a for a, _ in tail], [b for _, b in tail]) if len(tail) == 2 else None
            )
    crossovers: list[Crossover] = []
    linear = challengers()
    for (arch, size), pts in series.items():
        if arch not in linear or (registry.REFERENCE, size) not in series:
            continue
        dense = {p.seq_len: p for p in series[(registry.REFERENCE, size)]}
        mine = {p.seq_len: p for p in pts}
        common = sorted(set(dense) & set(mine))
        for mode in MODES:
            t_dense = [getattr(dense[t], f"{mode}_s") for t in common]
            t_other = [getattr(mine[t], f"{mode}_s") for t in common]
            if all(dense[t].spread(mode) and mine[t].spread(mode) for t in common):
                verdicts = [verdict(dense[t].spread(mode), mine[t].spread(mode)) for t in common]
                T, kind, low = crossover_with_spread(common, t_dense, t_other, verdicts)
            else:  # points without their repeats (older scaling.json): medians only
                (T, kind), low = crossover(common, t_dense, t_other), None
            crossovers.append(Crossover(arch, size, mode, T, kind, low))
    return {"exponents": exponents, "crossovers": crossovers}


# ---- output ------------------------------------------------------------------------------
def table(points: list[Point]) -> str:
    header = (
        "| Architecture | Size | T | Params | Fwd (ms) [IQR] | Fwd+bwd (ms) [IQR] "
        "| Fwd+bwd us/token | Fwd mem (MiB) | Fwd+bwd mem (MiB) |"
    )
    lines = [header, "|" + "---|" * 9]

    def f(v: float | None, scale: float, fmt: str) -> str:
        return "-" if v is None else format(v * scale, fmt)

    def ms(p: Point, mode: str) -> str:
        text = f(getattr(p, f"{mode}_s"), 1e3, ".2f")
        spread = p.spread(mode)
        if spread is not None and len(getattr(p, f"{mode}_samples")) > 1:
            text += f" [{spread[0] * 1e3:.2f}, {spread[1] * 1e3:.2f}]"
        return text

    for p in points:
        per_tok = None if p.fwd_bwd_s is None else p.fwd_bwd_s / (p.seq_len * p.batch_size)
        row = [
            p.architecture,
            p.model_size,
            str(p.seq_len),
            f"{p.total_params:,}",
            ms(p, "fwd"),
            ms(p, "fwd_bwd"),
            f(per_tok, 1e6, ".1f"),
            f(p.fwd_mem_bytes, 1 / 2**20, ".1f"),
            f(p.fwd_bwd_mem_bytes, 1 / 2**20, ".1f"),
        ]
        if p.error:
            row[-1] += f" ({p.error})"
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def exponent_table(analysis: dict[str, Any]) -> str:
    lines = [
        "| Architecture | Size | Fwd exponent | Fwd+bwd exponent | Fwd+bwd exponent (last two T) |",
        "|---|---|---|---|---|",
    ]
    for e in analysis["exponents"].values():

        def g(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| {e['architecture']} | {e['model_size']} | {g(e['fwd'])} | {g(e['fwd_bwd'])} "
            f"| {g(e['fwd_bwd_last_pair'])} |"
        )
    return "\n".join(lines)


def figure(points: list[Point]):
    from ..common.plots import loglog_figure

    def series(attr: str, scale: float = 1.0) -> dict[str, tuple[list[float], list[float]]]:
        out: dict[str, tuple[list[float], list[float]]] = {}
        sizes = {p.model_size for p in points}
        for p in points:
            name = p.architecture if len(sizes) == 1 else f"{p.architecture} ({p.model_size})"
            xs, ys = out.setdefault(name, ([], []))
            xs.append(p.seq_len)
            value = getattr(p, attr)
            ys.append(None if value is None else value * scale)
        return out

    panels = [
        ("fwd", "forward time (s)", series("fwd_s")),
        ("fwd_bwd", "forward+backward time (s)", series("fwd_bwd_s")),
    ]
    if any(p.fwd_bwd_mem_bytes for p in points):
        panels.append(
            (
                "mem",
                "fwd+bwd peak memory above weights (MiB)",
                series("fwd_bwd_mem_bytes", 1 / 2**20),
            )
        )
    return loglog_figure(panels, xlabel="sequence length T", title="archlab bench scaling")


def write_outputs(
    out_dir: Path, settings: ScalingSettings, points: list[Point], command: str
) -> dict[str, Path]:
    from ..common.hardware import hardware_info, hardware_lines
    from ..common.plots import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(points)
    hw = hardware_info()
    doc = {
        "command": command,
        "settings": asdict(settings),
        "hardware": hw,
        "points": [asdict(p) for p in points],
        "exponents": analysis["exponents"],
        "crossovers": [asdict(c) | {"text": c.describe()} for c in analysis["crossovers"]],
    }
    paths = {
        "json": out_dir / "scaling.json",
        "png": out_dir / "scaling.png",
        "md": out_dir / "scaling.md",
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    save_figure(figure(points), paths["png"])
    md = [
        "# archlab bench scaling",
        "",
        table(points),
        "",
        "Fitted exponent p of time ~ T^p (least squares on log-log over the sweep):",
        "",
        exponent_table(analysis),
        "",
        f"Crossovers (where the challenger becomes cheaper than {registry.REFERENCE}):",
        "",
    ]
    md += [f"- {c.describe()}" for c in analysis["crossovers"]] or [
        f"- (needs {registry.REFERENCE} and at least one of {', '.join(challengers())} in the "
        "sweep)"
    ]
    md += ["", "![scaling](scaling.png)", "", "## Settings", ""]
    md += [f"- `{k}`: {v}" for k, v in asdict(settings).items()]
    md += ["", "## Rerun", "", "```", command, "```", "", "## Machine", ""]
    md += hardware_lines(hw)
    md += [
        "",
        "Time: median of the repeats after warm-up, this process, with the interquartile "
        "range [IQR] of the repeats. A crossover is named only where the IQRs do not overlap "
        "on either side of it; otherwise a range, or undecided. Memory: one fresh process "
        "per point and mode; the peak above the memory held before the step (CPU: resident "
        "set high-water mark; CUDA: max allocated), after a tiny first step whose one-time "
        "memory (kernels loaded or compiled) is listed below, apart.",
        "",
    ]
    md += setup_lines(points)
    paths["md"].write_text("\n".join(md))
    return paths


def setup_lines(points: list[Point]) -> list[str]:
    """The one-time memory of a fresh process's first step, per architecture (MiB, max over
    its points), kept out of the table's memory columns."""
    per: dict[str, float] = {}
    for p in points:
        for v in (p.fwd_setup_bytes, p.fwd_bwd_setup_bytes):
            if v is not None:
                per[p.architecture] = max(per.get(p.architecture, 0.0), v)
    if not per:
        return []
    cells = ", ".join(f"{a} {v / 2**20:.1f} MiB" for a, v in per.items())
    return [f"First-step setup memory (not in the table): {cells}.", ""]

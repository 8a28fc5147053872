"""`archlab bench generate`: per-token decoding latency and state size against context length.

For each architecture and context length C: fill a fresh cache with a random prompt of C
tokens (``model(prompt, cache=cache)``), then time single-token steps
(``model(tok, cache=cache)``), warm-up first, median over the timed steps. The state size is
the bytes of every tensor the cache holds after the prompt: attention's KV cache grows with
C (the hybrid's sliding window caps it), Mamba's recurrent state does not.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common.models import _build, _sync, bench_config, resolve_device


@dataclass
class DecodeSettings:
    architectures: list[str]
    model_size: str = "nano"
    contexts: list[int] = field(default_factory=lambda: [16, 64, 256, 1024, 2048])
    new_tokens: int = 16  # timed single-token steps per context
    warmup: int = 3
    batch_size: int = 1
    device: str = "cpu"
    threads: int | None = None
    vocab_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class DecodePoint:
    architecture: str
    context: int
    total_params: int
    prefill_s: float | None = None
    token_s: float | None = None  # median latency of one decoding step
    state_bytes: int | None = None  # cache tensors after the prompt
    state_bytes_end: int | None = None  # after the timed steps
    error: str | None = None


def state_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from a cache (dicts, lists, dataclasses)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(state_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


def measure_point(model: Any, ctx: int, settings: DecodeSettings, device: str) -> DecodePoint:
    import torch

    cfg = model.cfg
    pt = DecodePoint(model.cfg.architecture, ctx, model.num_parameters())
    g = torch.Generator().manual_seed(settings.seed + ctx)
    n_steps = settings.warmup + settings.new_tokens
    toks = torch.randint(0, cfg.vocab_size, (settings.batch_size, ctx + n_steps), generator=g)
    toks = toks.to(device)
    with torch.no_grad():
        cache = model.init_cache()
        _sync(device)
        t0 = time.perf_counter()
        model(toks[:, :ctx], cache=cache)
        _sync(device)
        pt.prefill_s = time.perf_counter() - t0
        pt.state_bytes = state_bytes(cache.layers)
        times = []
        for i in range(n_steps):
            tok = toks[:, ctx + i : ctx + i + 1]  # (B, 1)
            t0 = time.perf_counter()
            model(tok, cache=cache)
            _sync(device)
            if i >= settings.warmup:
                times.append(time.perf_counter() - t0)
        pt.token_s = statistics.median(times)
        pt.state_bytes_end = state_bytes(cache.layers)
    return pt


def run_decode_bench(settings: DecodeSettings, progress=print) -> list[DecodePoint]:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    max_len = max(settings.contexts) + settings.warmup + settings.new_tokens
    points: list[DecodePoint] = []
    for arch in settings.architectures:
        cfg = bench_config(
            arch, settings.model_size, max_len, settings.vocab_size, settings.overrides
        )
        model = _build(cfg, device, settings.seed).eval()
        with torch.no_grad():  # lazy initialisation (kernels, allocator) outside the timings
            model(torch.zeros(1, 8, dtype=torch.long, device=device), cache=model.init_cache())
        for ctx in settings.contexts:
            try:
                pt = measure_point(model, ctx, settings, device)
            except (RuntimeError, MemoryError) as exc:
                pt = DecodePoint(
                    arch, ctx, model.num_parameters(), error=str(exc).strip().splitlines()[0][:200]
                )
            points.append(pt)
            progress(point_line(pt))
        del model
    return points


def point_line(pt: DecodePoint) -> str:
    if pt.error:
        return f"{pt.architecture:<10} C={pt.context:<6} [{pt.error}]"
    return (
        f"{pt.architecture:<10} C={pt.context:<6} {pt.token_s * 1e3:.3f} ms/token  "
        f"state {pt.state_bytes / 1024:.1f} KiB"
    )


def table(points: list[DecodePoint]) -> str:
    lines = [
        "| Architecture | Context | Params | ms/token | tokens/s | Prefill (ms) | State (KiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.error:
            lines.append(
                f"| {p.architecture} | {p.context} | {p.total_params:,} | "
                f"- | - | - | - ({p.error}) |"
            )
            continue
        lines.append(
            f"| {p.architecture} | {p.context} | {p.total_params:,} | {p.token_s * 1e3:.3f} | "
            f"{1 / p.token_s:,.0f} | {p.prefill_s * 1e3:.1f} | {p.state_bytes / 1024:.1f} |"
        )
    return "\n".join(lines)


def figure(points: list[DecodePoint]):
    from ..common.plots import loglog_figure

    def series(attr: str, scale: float) -> dict[str, tuple[list[float], list[float]]]:
        out: dict[str, tuple[list[float], list[float]]] = {}
        for p in points:
            xs, ys = out.setdefault(p.architecture, ([], []))
            xs.append(p.context)
            value = getattr(p, attr)
            ys.append(None if value is None else value * scale)
        return out

    return loglog_figure(
        [
            ("latency", "ms per generated token", series("token_s", 1e3)),
            ("state", "decode state (KiB)", series("state_bytes", 1 / 1024)),
        ],
        xlabel="context length",
        title="archlab bench generate",
    )


def write_outputs(
    out_dir: Path, settings: DecodeSettings, points: list[DecodePoint], command: str
) -> dict[str, Path]:
    from ..common.hardware import hardware_info, hardware_lines
    from ..common.plots import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    hw = hardware_info()
    paths = {
        "json": out_dir / "generate.json",
        "png": out_dir / "generate.png",
        "md": out_dir / "generate.md",
    }
    doc = {
        "command": command,
        "settings": asdict(settings),
        "hardware": hw,
        "points": [asdict(p) for p in points],
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    save_figure(figure(points), paths["png"])
    md = [
        "# archlab bench generate",
        "",
        table(points),
        "",
        "![generate](generate.png)",
        "",
        "## Settings",
        "",
    ]
    md += [f"- `{k}`: {v}" for k, v in asdict(settings).items()]
    md += ["", "## Rerun", "", "```", command, "```", "", "## Machine", ""]
    md += hardware_lines(hw)
    md += [
        "",
        "Latency: median over the timed single-token steps after warm-up, cache filled with "
        "the context first. State: bytes of all tensors in the cache after the context.",
        "",
    ]
    paths["md"].write_text("\n".join(md))
    return paths

"""A model for a measurement: its config, its device, built from a seed; device sync.

Shared by the timing benches (``lengths/``, ``decode/``) and ``eval/`` (the device flag).
"""

from __future__ import annotations

from typing import Any

from ...config import ModelConfig, preset_config
from ...errors import UserError


def bench_config(
    architecture: str,
    model_size: str,
    max_seq_len: int,
    vocab_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelConfig:
    """The size preset, stretched to ``max_seq_len`` positions, with explicit overrides."""
    kw = dict(overrides or {})
    kw["max_seq_len"] = max(max_seq_len, kw.get("max_seq_len") or 0)
    return preset_config(architecture, model_size=model_size, vocab_size=vocab_size, **kw)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device: unknown device {name!r} (allowed: auto, cpu, cuda, mps)")
    return name


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _build(cfg: ModelConfig, device: str, seed: int):
    import torch

    from ...models import build_model

    torch.manual_seed(seed)
    return build_model(cfg).to(device)

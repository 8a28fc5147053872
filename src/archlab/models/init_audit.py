"""Init audit: each residual branch's output scale vs the stream it is added to, at init.

A residual model starts as (nearly) the identity on its embedding stream only when every
branch adds something small next to it. A branch whose output dwarfs the stream at init (the
HyperMixer's layer-normalised mixer did, at ~50x the token embeddings) buries the token's
identity before training starts, and the model must first learn to undo it.

Measured with forward hooks on every block's ``mixer`` and ``ffn`` (the skeleton's names), so
it works for every architecture and preset without knowing their internals. RMS is over all
elements, ``sqrt(mean(x^2))``; the reference is the embedding stream entering block 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class BranchScale:
    layer: int
    branch: str  # "mixer" | "ffn"
    block: str  # the block's class name
    out_rms: float  # RMS of the branch's output
    stream_rms: float  # RMS of the stream it is added to (pre-norm) / fed with (post-norm)
    embed_rms: float  # RMS of the embedding stream entering block 0

    @property
    def ratio_to_embed(self) -> float:
        return self.out_rms / self.embed_rms

    @property
    def ratio_to_stream(self) -> float:
        return self.out_rms / self.stream_rms


def _rms(t: Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


@torch.no_grad()
def branch_scales(model: nn.Module, idx: Tensor) -> list[BranchScale]:
    """One row per residual branch of ``model`` (a LanguageModel) on the tokens ``idx`` (B, T).

    For pre-norm blocks ``x + mixer(N(x)); x + ffn(N(x))`` the stream of ``mixer`` is the block
    input and that of ``ffn`` the block input plus the mixer's output. For post-norm blocks
    (RustGPT: ``LN(x + mixer(x))``, ``LN(h + ffn(h))``) it is the branch's own input.
    """
    was_training = model.training
    model.eval()
    seen: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}  # (layer, branch) -> (input, output)
    block_in: dict[int, Tensor] = {}
    handles = []

    def keep_block_input(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            block_in[i] = args[0]

        return hook

    def keep_branch(i: int, name: str):
        def hook(_m: nn.Module, args: tuple, out: object) -> None:
            y = out[0] if isinstance(out, tuple) else out
            seen[(i, name)] = (args[0], y)  # type: ignore[index]

        return hook

    blocks = list(model.blocks)  # type: ignore[attr-defined]
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(keep_block_input(i)))
        for name in ("mixer", "ffn"):
            sub = getattr(block, name, None)
            if isinstance(sub, nn.Module):
                handles.append(sub.register_forward_hook(keep_branch(i, name)))
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    post_norm = getattr(model, "rustgpt", False)
    embed = _rms(block_in[0])
    rows = []
    for i, block in enumerate(blocks):
        x = block_in[i]
        for name in ("mixer", "ffn"):
            if (i, name) not in seen:
                continue
            inp, out = seen[(i, name)]
            if post_norm:
                stream = inp
            elif name == "mixer":
                stream = x
            else:
                stream = x + seen[(i, "mixer")][1] if (i, "mixer") in seen else x
            rows.append(BranchScale(i, name, type(block).__name__, _rms(out), _rms(stream), embed))
    return rows


def format_scales(rows: list[BranchScale]) -> str:
    """A small table: layer, branch, output RMS, stream RMS, ratios."""
    lines = [f"{'layer':>5} {'branch':<6} {'block':<24} {'out rms':>9} {'stream':>9} "
             f"{'/stream':>8} {'/embed':>8}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r.layer:>5} {r.branch:<6} {r.block:<24} {r.out_rms:>9.4f} {r.stream_rms:>9.4f} "
            f"{r.ratio_to_stream:>8.2f} {r.ratio_to_embed:>8.2f}"
        )
    return "\n".join(lines)


def worst_ratio(rows: list[BranchScale]) -> float:
    return max((r.ratio_to_embed for r in rows), default=math.nan)

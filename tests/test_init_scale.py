"""Init audit: no residual branch's output dwarfs the embedding stream at initialisation.

Bound: every branch's output RMS <= 3x the RMS of the embedding stream entering block 0. The
healthy branches of every architecture measure 0.07-1.7x (the largest: the MLP of the hybrid
and of dense at micro, whose fan-in grows with d_ff; RustGPT's post-norm blocks ~2.2x, their
stream being layer-normalised to RMS 1 after block 0); HyperMixer's layer-normalised mixer
measured 35x (and 110-690x without its output norm) before its branch started at zero. 3x
leaves room above the healthy ones and is an order of magnitude below the defect.
"""

from __future__ import annotations

import pytest
import torch

from archlab.config import preset_config
from archlab.models import build_model
from archlab.models.init_audit import branch_scales, format_scales, worst_ratio

BOUND = 3.0
ARCHS = ["dense", "hypermixer", "mamba", "moe", "hybrid", "gdn", "mamba2"]

CASES = [pytest.param(a, s, None, {}, id=f"{a}-{s}") for s in ("nano", "micro") for a in ARCHS]
CASES += [
    pytest.param("dense", None, "rustgpt", {}, id="rustgpt-dense"),
    pytest.param("hypermixer", None, "rustgpt", {}, id="rustgpt-hypermixer"),
    pytest.param("hypermixer", "nano", None, {"hypermixer_layer_norm": False}, id="hm-nonorm"),
    pytest.param("hypermixer", "nano", None, {"hypermixer_tied": True}, id="hm-tied"),
    pytest.param(
        "dense", "nano", None, {"use_rope": True, "use_rmsnorm": True}, id="dense-rope-rms"
    ),
    pytest.param("hypermixer", "nano", None, {"use_rmsnorm": True}, id="hm-rmsnorm"),
    pytest.param("dense", "micro", None, {"mlp": "swiglu"}, id="dense-swiglu-micro"),
    pytest.param("moe", "nano", None, {"mlp": "swiglu"}, id="moe-swiglu"),
]


def build(arch, size, preset, kw, seed=0):
    torch.manual_seed(seed)
    vocab = 533 if preset else 1441
    cfg = preset_config(arch, model_size=size, preset=preset, vocab_size=vocab, **(
        {"extra": kw} if any(k.startswith("hypermixer") for k in kw) else kw))  # fmt: skip
    model = build_model(cfg)
    T = 80 if preset else 128
    idx = torch.randint(0, vocab, (4, T), generator=torch.Generator().manual_seed(1))
    return model, idx


@pytest.mark.parametrize("arch,size,preset,kw", CASES)
def test_no_residual_branch_dwarfs_the_embedding_stream(arch, size, preset, kw):
    model, idx = build(arch, size, preset, kw)
    rows = branch_scales(model, idx)
    n_branches = {"mamba": 1, "mamba2": 1}.get(arch, 2) * model.cfg.n_layers
    assert len(rows) == n_branches
    assert all(r.out_rms == r.out_rms for r in rows)  # no NaN
    assert worst_ratio(rows) <= BOUND, "\n" + format_scales(rows)
    # every branch but HyperMixer's zero-started mixer contributes something at init
    live = [r for r in rows if not (arch == "hypermixer" and not preset and r.branch == "mixer")]
    assert min(r.out_rms for r in live) > 1e-4, "\n" + format_scales(rows)


def test_hypermixer_mixer_starts_at_zero_and_its_gain_learns():
    model, idx = build("hypermixer", "nano", None, {})
    rows = branch_scales(model, idx)
    assert all(r.out_rms == 0.0 for r in rows if r.branch == "mixer")
    # the output-norm gain gets a gradient at init, so the mixer switches on at step one
    model.train()
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for block in model.blocks:
        assert block.mixer.out_norm.weight.grad.abs().sum() > 0


def test_the_audit_catches_the_old_hypermixer_init():
    """The bound fails on the pre-fix scale (output-norm gain 1): ~35x the embeddings."""
    model, idx = build("hypermixer", "nano", None, {})
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.out_norm.weight.fill_(1.0)
    rows = branch_scales(model, idx)
    assert worst_ratio(rows) > 10 * BOUND
    first = rows[0]
    assert first.branch == "mixer" and first.out_rms == pytest.approx(1.0, rel=1e-3)
    # the embedding stream: GPT-2 init, std 0.02 (+ learned positions, also 0.02)
    assert first.embed_rms == pytest.approx(0.02 * 2**0.5, rel=0.1)


def test_stream_columns_follow_the_block_layout():
    """Pre-norm: the FFN's stream is the block input plus the mixer's output."""
    model, idx = build("dense", "nano", None, {})
    rows = branch_scales(model, idx)
    assert rows[0].stream_rms == pytest.approx(rows[0].embed_rms)
    assert rows[1].stream_rms > rows[0].stream_rms  # mixer output added
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
        y = x + model.blocks[0].mixer(model.blocks[0].norm1(x))
    assert rows[1].stream_rms == pytest.approx(float(y.pow(2).mean().sqrt()), rel=1e-5)

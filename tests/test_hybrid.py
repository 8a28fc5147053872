"""Hybrid (Mamba + sliding-window attention): layout, causality, windowed cache, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab import ConfigError, build_model, count_parameters, preset_config
from archlab.models.hybrid import HybridAttentionBlock, HybridMambaBlock
from archlab.models.mamba import MambaMixer

V = 53


def _cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, d_ff=64, local_window=5)
    base.update(kw)
    return preset_config("hybrid", "nano", **base)


def test_layer_layout_and_names():
    model = build_model(_cfg())
    kinds = [type(b) for b in model.blocks]
    assert kinds == [HybridMambaBlock, HybridAttentionBlock] * 2
    for block in model.blocks:
        assert {"norm1", "mixer", "norm2", "ffn"} <= set(dict(block.named_children()))
    assert isinstance(model.blocks[0].mixer, MambaMixer)
    attn = model.blocks[1].mixer
    assert attn.window == 5 and attn.rope is not None
    assert model.pos_emb is None  # positions come from the Mamba layers and RoPE
    bd = model.parameter_breakdown()
    assert bd["token_mixing"] > 0 and bd["channel_mixing"] > 0


def test_summary_says_the_attention_layers_use_rope(capsys):
    """`archlab summary --architecture hybrid`: RoPE on the attention layers (always, with or
    without --use-rope), order from the recurrence on the Mamba layers; the counts as before."""
    from archlab.cli import main

    line = "Positions: rope (attention layers) + recurrent (Mamba layers)"
    for flags in ([], ["--use-rope"]):
        assert main(["summary", "--architecture", "hybrid", *flags]) == 0
        out = capsys.readouterr().out
        assert line in out.splitlines() and "none (recurrent)" not in out
        assert "Total Parameters: 1,413,760" in out  # nano, vocabulary 4096
    model = build_model(preset_config("hybrid", "nano"))
    ropes = [b.mixer.rope for b in model.blocks if isinstance(b, HybridAttentionBlock)]
    assert len(ropes) == 2 and all(r is not None for r in ropes) and model.pos_emb is None


def test_attention_block_sees_only_its_window():
    """Changing the input `window` positions back leaves the attention block's output unchanged."""
    torch.manual_seed(0)
    block = HybridAttentionBlock(_cfg(), 1).eval()
    x = torch.randn(2, 16, 32)
    y, _ = block(x)
    for t, far in [(12, 7), (9, 4)]:  # window 5: position t sees t-4 .. t
        x2 = x.clone()
        x2[:, far] += torch.randn(2, 32)  # random: a constant shift would vanish in LayerNorm
        y2, _ = block(x2)
        assert (y2[:, t] - y[:, t]).abs().max() < 1e-6
        x3 = x.clone()
        x3[:, far + 1] += torch.randn(2, 32)  # just inside the window
        y3, _ = block(x3)
        assert (y3[:, t] - y[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("t", [0, 6, 15])
def test_hybrid_model_is_causal(t):
    torch.manual_seed(1)
    model = build_model(_cfg()).eval()
    idx = torch.randint(0, V, (2, 20))
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(2)) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-5
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("chunks", [[1] * 19, [3, 1, 7, 1, 1, 6], [6, 13], [19]])
def test_hybrid_cached_decoding_matches_full_forward(chunks):
    """The window (5) is shorter than the sequence (19): the cache must drop old keys."""
    torch.manual_seed(2)
    model = build_model(_cfg()).eval()
    idx = torch.randint(0, V, (2, sum(chunks)))
    with torch.no_grad():
        full = model(idx)
        cache = model.init_cache()
        outs, p = [], 0
        for c in chunks:
            outs.append(model(idx[:, p : p + c], cache=cache))
            p += c
            assert cache.layers[1]["k"].shape[2] == min(p, 5)  # sliding-window KV cache
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-4
    assert set(cache.layers[0]) == {"conv", "ssm"}


def test_window_changes_the_model():
    """Same weights, window 5 vs window 64: identical up to position 4, different later."""
    torch.manual_seed(3)
    small = build_model(_cfg()).eval()
    large = build_model(_cfg(local_window=64)).eval()
    large.load_state_dict(small.state_dict())
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        a, b = small(idx), large(idx)
    assert (a[:, :5] - b[:, :5]).abs().max() < 1e-5
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def test_hybrid_every_parameter_gets_a_gradient():
    torch.manual_seed(4)
    model = build_model(_cfg())
    idx = torch.randint(0, V, (2, 12))
    logits = model(idx)
    F.cross_entropy(logits.reshape(-1, V), torch.roll(idx, -1, 1).reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_hybrid_exact_parameter_count():
    d, L, ff, N, K = 32, 4, 64, 16, 4
    cfg = _cfg(d_model=d, n_layers=L, d_ff=ff)
    di, R = 2 * d, math.ceil(d / 16)
    norm = d  # RMSNorm weight (the hybrid always uses RMSNorm, as Samba)
    mlp = d * ff + ff * d  # no biases
    mamba = d * 2 * di + di * K + di + di * (R + 2 * N) + R * di + di + di * N + di + di * d
    attn = d * 3 * d + d * d
    expected = V * d + (L // 2) * (mamba + attn + 2 * mlp + 4 * norm) + norm
    assert count_parameters(cfg) == (expected, expected)


def test_odd_head_dimension_is_a_config_error():
    with pytest.raises(ConfigError, match="--n-heads"):
        build_model(_cfg(d_model=30, n_heads=2))  # head dim 15 cannot take RoPE

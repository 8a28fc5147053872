"""Mamba: chunked scan == sequential reference, causality, cached decoding, init, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab import build_model, count_parameters, preset_config
from archlab.models import scan as scan_mod
from archlab.models.mamba import MambaBlock, MambaMixer
from archlab.models.scan import selective_scan_chunked, selective_scan_sequential, selective_step


def _scan_inputs(B: int, T: int, D: int, N: int, with_state: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=g)
    inputs = dict(
        u=torch.randn(B, T, D, **kw),
        delta=torch.randn(B, T, D, **kw),
        A=-torch.rand(D, N, **kw) * 4 - 0.05,
        B=torch.randn(B, T, N, **kw),
        C=torch.randn(B, T, N, **kw),
        D=torch.randn(D, **kw),
        z=torch.randn(B, T, D, **kw),
        delta_bias=torch.randn(D, **kw) * 0.5,
    )
    if with_state:
        inputs["initial_state"] = torch.randn(B, D, N, **kw)
    for t in inputs.values():
        t.requires_grad_(True)
    return inputs


def _run(fn, inputs, **kw):
    out, last = fn(**inputs, delta_softplus=True, return_last_state=True, **kw)
    # weight both outputs with fixed, non-uniform cotangents so every gradient path counts
    gy = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    gl = torch.cos(torch.arange(last.numel(), dtype=out.dtype)).view_as(last)
    grads = torch.autograd.grad((out * gy).sum() + (last * gl).sum(), list(inputs.values()))
    return out, last, dict(zip(inputs, grads, strict=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    "T,chunk,with_state,block_elements",
    [
        (37, 5, False, None),  # 7 full chunks + a ragged chunk
        (37, 5, True, None),  # continuing from a carried state
        (64, 8, False, None),  # exact multiple of the chunk
        (50, 7, True, 300),  # several channel blocks (tiny blocks forced)
        (41, None, False, 300),  # default chunk size (~sqrt(T)), several blocks
        (9, 16, True, None),  # chunk longer than the sequence
        (1, None, True, None),  # one step
    ],
)
def test_chunked_scan_matches_sequential_float64(T, chunk, with_state, block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(scan_mod, "_BLOCK_ELEMENTS", block_elements)
    inputs = _scan_inputs(2, T, 5, 4, with_state)
    y1, last1, g1 = _run(selective_scan_chunked, inputs, chunk_size=chunk)
    y2, last2, g2 = _run(selective_scan_sequential, inputs)
    assert y1.dtype == torch.float64
    assert _rel(y1, y2) < 1e-8
    assert _rel(last1, last2) < 1e-8
    assert set(g1) == set(g2) and len(g1) == (9 if with_state else 8)
    for name in g1:
        assert _rel(g1[name], g2[name]) < 1e-8, name


def test_chunked_scan_stable_for_strong_decay():
    """Large delta * |A| (decays ~ exp(-200)) must not overflow: no exp of positive numbers."""
    inputs = _scan_inputs(2, 40, 3, 4, with_state=True, seed=1)
    with torch.no_grad():
        inputs["A"].mul_(50.0)  # |A| up to 200
        inputs["delta"].add_(2.0)
    y1, last1, g1 = _run(selective_scan_chunked, inputs, chunk_size=8)
    y2, last2, g2 = _run(selective_scan_sequential, inputs)
    assert torch.isfinite(y1).all() and all(torch.isfinite(g).all() for g in g1.values())
    assert _rel(y1, y2) < 1e-8 and _rel(last1, last2) < 1e-8
    for name in g1:
        assert _rel(g1[name], g2[name]) < 1e-8, name


def test_chunked_scan_float32_and_second_backward():
    """float32 agrees with the float64 reference; retain_graph backward twice is identical."""
    inputs = _scan_inputs(2, 30, 4, 3, with_state=False, seed=2)
    ref = selective_scan_sequential(**inputs, delta_softplus=True)
    f32 = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    out = selective_scan_chunked(**f32, delta_softplus=True, chunk_size=4)
    assert out.dtype == torch.float32
    assert _rel(out.double(), ref) < 1e-5
    loss = (out * out).sum()
    first = torch.autograd.grad(loss, list(f32.values()), retain_graph=True)
    second = torch.autograd.grad(loss, list(f32.values()))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_selective_step_matches_scan():
    inputs = _scan_inputs(3, 6, 5, 4, with_state=True, seed=3)
    x = {k: v.detach() for k, v in inputs.items()}
    full, last = selective_scan_sequential(**x, delta_softplus=True, return_last_state=True)
    h = x["initial_state"]
    delta = F.softplus(x["delta"] + x["delta_bias"])
    for t in range(6):
        y, h = selective_step(
            h, x["u"][:, t], delta[:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"], x["z"][:, t]
        )
        torch.testing.assert_close(y, full[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, last, rtol=1e-12, atol=1e-12)


# ---- the mixer and the model ------------------------------------------------------------
def _cfg(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=2, max_seq_len=64)
    base.update(kw)
    return preset_config("mamba", "nano", **base)


def test_mixer_matches_reference_composition():
    """The mixer equals the reference math written out with the sequential scan."""
    torch.manual_seed(0)
    cfg = _cfg()
    mixer = MambaMixer(cfg).double()
    x = torch.randn(2, 13, cfg.d_model, dtype=torch.float64)
    xi, z = mixer.in_proj(x).chunk(2, dim=-1)
    K = cfg.conv_size
    w = mixer.conv1d.weight.squeeze(1)  # (d_inner, K)
    padded = F.pad(xi, (0, 0, K - 1, 0))  # zeros before t = 0
    conv = sum(padded[:, k : k + 13] * w[:, k] for k in range(K)) + mixer.conv1d.bias
    xc = F.silu(conv)
    dt, B, C = mixer.x_proj(xc).split([mixer.dt_rank, cfg.state_size, cfg.state_size], -1)
    delta = F.softplus(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
    A = -torch.exp(mixer.A_log)
    y = selective_scan_sequential(xc, delta, A, B, C, mixer.D, z)
    expected = mixer.out_proj(y)
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [0, 7, 18])
def test_mamba_model_is_causal(t):
    torch.manual_seed(1)
    model = build_model(_cfg()).eval()
    idx = torch.randint(0, 61, (2, 24))
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(2)) % 61
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-5
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4  # the change is visible at t + 1


@pytest.mark.parametrize("chunks", [[1] * 21, [4, 1, 1, 9, 2, 3, 1], [21], [2, 19]])
def test_mamba_cached_decoding_matches_full_forward(chunks):
    torch.manual_seed(2)
    model = build_model(_cfg(n_layers=3)).eval()
    idx = torch.randint(0, 61, (3, sum(chunks)))
    with torch.no_grad():
        full = model(idx)
        cache = model.init_cache()
        outs, p = [], 0
        for c in chunks:
            outs.append(model(idx[:, p : p + c], cache=cache))
            p += c
    assert cache.pos == idx.shape[1]
    state = cache.layers[0]
    assert state["conv"].shape == (3, 64, 3) and state["ssm"].shape == (3, 64, 16)
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-4


def test_mamba_every_parameter_gets_a_gradient():
    torch.manual_seed(3)
    model = build_model(_cfg())
    idx = torch.randint(0, 61, (2, 20))
    logits = model(idx)
    F.cross_entropy(logits.reshape(-1, 61), torch.roll(idx, -1, 1).reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_mamba_init_values():
    torch.manual_seed(4)
    model = build_model(_cfg(d_model=48))  # generic init, then special_init
    mixer = model.blocks[1].mixer
    di, N, R = 96, 16, 3
    assert mixer.A_log.shape == (di, N) and mixer.dt_proj.weight.shape == (di, R)
    expected = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(di, N)
    torch.testing.assert_close(mixer.A_log.data, expected)
    assert torch.equal(mixer.D.data, torch.ones(di))
    dt = F.softplus(mixer.dt_proj.bias.data)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.std() > 0  # sampled, not constant
    # log-uniform: the mean of log dt is near the middle of [log 1e-3, log 1e-1]
    assert abs(dt.log().mean().item() - math.log(1e-2)) < 0.6
    bound = R**-0.5
    w = mixer.dt_proj.weight.data
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    # GPT-2 scaled init of the residual output projection: std 0.02 / sqrt(2 L)
    assert mixer.out_proj.weight.std().item() < 0.02 / math.sqrt(2 * 2) * 1.2
    assert isinstance(model.blocks[0], MambaBlock)
    assert type(model.blocks[0].norm1).__name__ == "RMSNorm"


def _mamba_block_params(d: int, expand: int, N: int, K: int, R: int) -> int:
    di = expand * d
    return (
        d  # RMSNorm weight
        + d * 2 * di  # in_proj
        + di * K + di  # depthwise conv weight + bias
        + di * (R + 2 * N)  # x_proj
        + R * di + di  # dt_proj weight + bias
        + di * N  # A_log
        + di  # D
        + di * d  # out_proj
    )  # fmt: skip


@pytest.mark.parametrize("d,layers,N,K,vocab", [(32, 2, 16, 4, 61), (40, 3, 8, 3, 100)])
def test_mamba_exact_parameter_count(d, layers, N, K, vocab):
    cfg = preset_config(
        "mamba", "nano", vocab_size=vocab, d_model=d, n_layers=layers, state_size=N, conv_size=K
    )
    R = math.ceil(d / 16)
    expected = vocab * d + layers * _mamba_block_params(d, 2, N, K, R) + d  # tied head, final norm
    total, active = count_parameters(cfg)
    assert total == active == expected
    assert build_model(cfg).num_parameters() == expected

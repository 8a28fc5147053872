"""Fused CPU HyperMixing (numba) == today's chunked torch implementation; fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from archlab.models import kernels
from archlab.models.hypermixer import causal_hypermix, resolve_hypermix_impl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not kernels.fused_available("hypermix"), reason="no numba")


def _inputs(B, T, M, D, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w1, x, w2 = (torch.randn(B, T, k, generator=g, dtype=dtype) * scale for k in (M, D, M))
    s0 = torch.randn(B, M, D, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (w1, x, w2, s0)]


def _run(impl, args, start):
    out, s = causal_hypermix(*args, start=start, impl=impl)
    g = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    return [out, s, *torch.autograd.grad((out * g).sum(), args)]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


SHAPES = [
    (2, 45, 5, 7, 0),  # T not a multiple of the 32-step checkpoint chunk, D < 16 lanes
    (1, 100, 64, 40, 3),  # B = 1 (channel groups split the backward), 40 = 2.5 blocks
    (3, 32, 16, 16, 0),  # exactly one chunk and one block
    (2, 70, 8, 33, 1000),  # a continuation far into the sequence
]


@pytest.mark.parametrize("B,T,M,D,start", SHAPES)
def test_fused_equals_chunked_float64(B, T, M, D, start):
    args = _inputs(B, T, M, D, torch.float64)
    fused, ref = _run("fused", args, start), _run("chunked", args, start)
    for name, a, b in zip(["out", "S", "dw1", "dx", "dw2", "dS0"], fused, ref, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("B,T,M,D,start", SHAPES)
def test_fused_float32_equals_float64(B, T, M, D, start):
    """float32 fused (vectorised GELU) against the float64 torch implementation."""
    args64 = _inputs(B, T, M, D, torch.float64, scale=1.5)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    fused, ref = _run("fused", args32, start), _run("chunked", args64, start)
    for name, a, b in zip(["out", "S", "dw1", "dx", "dw2", "dS0"], fused, ref, strict=True):
        assert a.dtype == torch.float32, name
        assert _rel(a, b) < 1e-5, name


def test_fused_inference_path_and_continuation():
    args = [t.detach() for t in _inputs(2, 50, 12, 20, torch.float32, seed=4)]
    with torch.enable_grad():
        a = [t.clone().requires_grad_() for t in args]
        out_grad, s_grad = causal_hypermix(*a, impl="fused")
    with torch.no_grad():
        out, s = causal_hypermix(*args, impl="fused")
    assert torch.equal(out, out_grad.detach()) and torch.equal(s, s_grad)
    w1, x, w2, s0 = args
    pieces, state, t0 = [], s0, 0
    for n in (1, 20, 1, 28):
        sl = slice(t0, t0 + n)
        o, state = causal_hypermix(w1[:, sl], x[:, sl], w2[:, sl], state, t0, impl="fused")
        pieces.append(o)
        t0 += n
    torch.testing.assert_close(torch.cat(pieces, 1), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, s, rtol=1e-5, atol=1e-5)


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ARCHLAB_HYPERMIX", raising=False)
    assert resolve_hypermix_impl(cpu) == "fused"
    assert resolve_hypermix_impl(torch.device("meta")) == "chunked"
    monkeypatch.setenv("ARCHLAB_HYPERMIX", "chunked")
    assert resolve_hypermix_impl(cpu) == "chunked"
    monkeypatch.setenv("ARCHLAB_HYPERMIX", "nope")
    with pytest.raises(ValueError, match="ARCHLAB_HYPERMIX"):
        resolve_hypermix_impl(cpu)


_FALLBACK = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from archlab import build_model, preset_config
    from archlab.models.hypermixer import resolve_hypermix_impl
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = preset_config("hypermixer", "nano", vocab_size=50, d_model=32, n_layers=2,
                        max_seq_len=32)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 50, (4, 33))
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 50), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("IMPL", resolve_hypermix_impl(torch.device("cpu")))
    print("LOSS", losses[0], losses[-1])
    """
)


def test_fallback_with_kernels_off_trains_and_notices_once():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), ARCHLAB_KERNELS="off")
    env.pop("ARCHLAB_HYPERMIX", None)
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln[:4] in ("IMPL", "LOSS"))
    assert lines["IMPL"] == "chunked"
    first, last = map(float, lines["LOSS"].split())
    assert last < first - 0.3
    notices = [ln for ln in proc.stderr.splitlines() if "fused CPU kernel unavailable" in ln]
    assert len(notices) == 1 and "HyperMixing" in notices[0] and "ARCHLAB_KERNELS=off" in notices[0]


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_fused_hypermixer_decode_step_equals_torch_path(monkeypatch, tied, bias):
    from archlab import preset_config
    from archlab.models.hypermixer import CausalHyperMixing

    torch.manual_seed(6)
    cfg = preset_config("hypermixer", "nano", vocab_size=40, d_model=24, n_layers=1)
    cfg.extra["hypermixer_tied"] = tied
    cfg.bias = bias
    mixer = CausalHyperMixing(cfg).double().eval()
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        fused_state, torch_state = {}, {}
        mixer(x[:, :3], fused_state, 0)
        mixer(x[:, :3], torch_state, 0)
        for t in range(3, 12):
            a = mixer(x[:, t : t + 1], fused_state, t)
            with monkeypatch.context() as m:
                m.setattr(mixer, "_fused_step", lambda *_: None)
                b = mixer(x[:, t : t + 1], torch_state, t)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a[:, 0], full[:, t], rtol=1e-10, atol=1e-12)
    assert fused_state["count"] == torch_state["count"] == 12
    torch.testing.assert_close(fused_state["S"], torch_state["S"], rtol=1e-10, atol=1e-12)


def test_fused_under_inference_mode_first_use(monkeypatch):
    from archlab.models.kernels import hypermix_cpu

    monkeypatch.setattr(hypermix_cpu, "_warm", set())
    args = [t.detach() for t in _inputs(1, 20, 4, 8, torch.float32)]
    with torch.inference_mode():
        out, _ = causal_hypermix(*args, impl="fused")
    assert kernels.fused_available("hypermix")
    ref, _ = causal_hypermix(*args, impl="chunked")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

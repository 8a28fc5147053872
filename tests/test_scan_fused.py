"""Fused CPU selective scan (numba) == the sequential reference; dispatch and fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from archlab.models import kernels
from archlab.models.scan import (
    resolve_scan_impl,
    selective_scan,
    selective_scan_chunked,
    selective_scan_sequential,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not kernels.fused_available("scan"), reason="numba unavailable")


def _inputs(B, T, D, N, dtype, strong=False, seed=0, optional=True):
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, generator=g)
    x = dict(
        u=torch.randn(B, T, D, **kw),
        delta=torch.randn(B, T, D, **kw) + (2.0 if strong else -1.0),
        # strong: |A| up to 60 with delta ~ softplus(2 +- 1): decays down to exp(-300)
        A=-(torch.rand(D, N, **kw) * (60.0 if strong else 3.0) + 0.05),
        B=torch.randn(B, T, N, **kw),
        C=torch.randn(B, T, N, **kw),
    )
    if optional:
        x.update(
            D=torch.randn(D, **kw),
            z=torch.randn(B, T, D, **kw),
            delta_bias=torch.randn(D, **kw) * 0.5,
            initial_state=torch.randn(B, D, N, **kw),
        )
    for t in x.values():
        t.requires_grad_(True)
    return x


def _run(fn, x, **kw):
    out, last = fn(**x, delta_softplus=True, return_last_state=True, **kw)
    gy = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    gl = torch.cos(torch.arange(last.numel(), dtype=out.dtype)).view_as(last)
    grads = torch.autograd.grad((out * gy).sum() + (last * gl).sum(), list(x.values()))
    return [out, last, *grads]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


SHAPES = [
    (2, 70, 20, 16, False),  # T not a multiple of the 64-step checkpoint chunk; 20 = 16 + 4 lanes
    (1, 33, 5, 1, False),  # B = 1, N = 1
    (3, 129, 16, 4, False),  # two checkpoints and one step
    (2, 64, 17, 17, False),  # N = 17, exactly one chunk
    (1, 150, 24, 16, True),  # strong decays (exp(delta A) down to ~1e-130)
    (2, 7, 3, 17, True),
]


@pytest.mark.parametrize("B,T,D,N,strong", SHAPES)
def test_fused_matches_sequential_float64(B, T, D, N, strong):
    x = _inputs(B, T, D, N, torch.float64, strong)
    fused = _run(lambda **k: selective_scan(**k, impl="fused"), x)
    ref = _run(selective_scan_sequential, x)
    names = ["out", "last", *x]
    assert len(fused) == 11
    for name, a, b in zip(names, fused, ref, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("B,T,D,N,strong", SHAPES)
def test_fused_float32_matches_float64_reference(B, T, D, N, strong):
    x64 = _inputs(B, T, D, N, torch.float64, strong)
    x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
    fused = _run(lambda **k: selective_scan(**k, impl="fused"), x32)
    ref = _run(selective_scan_sequential, x64)
    for name, a, b in zip(["out", "last", *x64], fused, ref, strict=True):
        assert a.dtype == torch.float32, name
        assert _rel(a, b) < 1e-5, name


def test_fused_without_optional_inputs_and_without_softplus():
    """D, z, delta_bias, initial_state all absent; plain delta (no softplus)."""
    x = _inputs(2, 45, 19, 6, torch.float64, optional=False)
    with torch.no_grad():
        x["delta"].copy_(torch.rand_like(x["delta"]) * 0.5)

    def run(fn, **kw):
        out, last = fn(**x, return_last_state=True, **kw)
        g = torch.autograd.grad((out * out.detach().sin()).sum() + last.sum(), list(x.values()))
        return [out, last, *g]

    for a, b in zip(run(selective_scan, impl="fused"), run(selective_scan_sequential), strict=True):
        assert _rel(a, b) < 1e-10


def test_fused_continues_a_scan_and_is_deterministic():
    """Two halves carried through the returned state equal one scan; repeated calls bit-equal."""
    x = {k: v.detach() for k, v in _inputs(2, 90, 33, 16, torch.float32).items()}
    full, last = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="fused")
    again = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="fused")
    assert torch.equal(full, again[0]) and torch.equal(last, again[1])
    cut = 41
    first = {k: (v[:, :cut] if v.dim() == 3 and k != "initial_state" else v) for k, v in x.items()}
    second = {k: (v[:, cut:] if v.dim() == 3 and k != "initial_state" else v) for k, v in x.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True, return_last_state=True, impl="fused")
    second["initial_state"] = h1
    y2, h2 = selective_scan(**second, delta_softplus=True, return_last_state=True, impl="fused")
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2, last, rtol=1e-5, atol=1e-6)


def test_dispatch_default_env_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ARCHLAB_SCAN", raising=False)
    assert resolve_scan_impl(cpu) == "fused"
    assert resolve_scan_impl(torch.device("meta")) == "chunked"  # off CPU: the torch scan
    for impl in ("chunked", "sequential", "fused"):
        monkeypatch.setenv("ARCHLAB_SCAN", impl)
        assert resolve_scan_impl(cpu) == impl
    monkeypatch.setenv("ARCHLAB_SCAN", "fast")
    with pytest.raises(ValueError, match="ARCHLAB_SCAN"):
        resolve_scan_impl(cpu)
    # the forced implementation is the one that runs: chunked and fused agree but differ in bits
    monkeypatch.setenv("ARCHLAB_SCAN", "chunked")
    x = {k: v.detach() for k, v in _inputs(1, 50, 8, 4, torch.float32).items()}
    forced = selective_scan(**x, delta_softplus=True)
    assert torch.equal(forced, selective_scan_chunked(**x, delta_softplus=True))


_FALLBACK = textwrap.dedent(
    """
    import sys
    sys.modules["numba"] = None  # numba cannot be imported: the kernels are unavailable
    import torch
    import torch.nn.functional as F
    from archlab import build_model, preset_config
    from archlab.models.scan import resolve_scan_impl
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = preset_config("hybrid", "nano", vocab_size=50, d_model=32, n_layers=2, max_seq_len=32)
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
    print("IMPL", resolve_scan_impl(torch.device("cpu")))
    print("LOSS", losses[0], losses[-1])
    """
)


def test_fallback_without_numba_trains_and_notices_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("ARCHLAB_SCAN", None)
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln[:4] in ("IMPL", "LOSS"))
    assert lines["IMPL"] == "chunked"
    first, last = map(float, lines["LOSS"].split())
    assert last < first - 0.3  # it trained
    notices = [ln for ln in proc.stderr.splitlines() if "fused CPU kernel unavailable" in ln]
    assert len(notices) == 1, proc.stderr
    assert "selective scan" in notices[0] and "import of numba" in notices[0]


def test_fused_mamba_decode_step_equals_torch_step(monkeypatch):
    """The one-call decode step (conv, projections, scan step, gate) equals the torch ops."""
    from archlab import preset_config
    from archlab.models.mamba import MambaMixer

    torch.manual_seed(5)
    cfg = preset_config("mamba", "nano", vocab_size=40, d_model=24, n_layers=1, state_size=5)
    mixer = MambaMixer(cfg).double().eval()
    with torch.no_grad():
        mixer.D.normal_()
        mixer.A_log.add_(torch.rand_like(mixer.A_log))
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    fused_state, torch_state = {}, {}
    with torch.no_grad():
        for t in range(9):
            a = mixer(x[:, t : t + 1], fused_state)
            with monkeypatch.context() as m:
                m.setattr(mixer, "_fused_step", lambda *_: None)
                b = mixer(x[:, t : t + 1], torch_state)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        full = mixer(x)
    torch.testing.assert_close(a[:, 0], full[:, -1], rtol=1e-10, atol=1e-12)
    for key in ("conv", "ssm"):
        torch.testing.assert_close(fused_state[key], torch_state[key], rtol=1e-10, atol=1e-12)


def test_fused_under_inference_mode_first_use(monkeypatch):
    """Generation runs under torch.inference_mode: the first use (compile/warm-up) must work."""
    from archlab.models.kernels import scan_cpu

    monkeypatch.setattr(scan_cpu, "_warm", set())
    x = {k: v.detach() for k, v in _inputs(1, 20, 8, 4, torch.float32).items()}
    with torch.inference_mode():
        assert resolve_scan_impl(torch.device("cpu")) == "fused"
        out = selective_scan(**x, delta_softplus=True)
    assert kernels.fused_available("scan")
    torch.testing.assert_close(out, selective_scan_sequential(**x, delta_softplus=True))


def test_fused_threads_split_is_bit_identical():
    """Several threads taking pieces of the work (kernels/_numba.parallel_for) give exactly the
    single-thread result, forward and backward (every item writes only its own outputs)."""
    x = _inputs(5, 100, 130, 16, torch.float32)  # 5 x 3 items of 64 channels, > 1 piece each
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_run(lambda **k: selective_scan(**k, impl="fused"), x))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)

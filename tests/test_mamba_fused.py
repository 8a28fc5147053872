"""Fused CPU Mamba mixer node (kernels/mamba_cpu.py) == the op-by-op graph, values and grads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from archlab import preset_config
from archlab.models import kernels
from archlab.models.mamba import MambaMixer

pytestmark = pytest.mark.skipif(not kernels.fused_available("scan"), reason="numba unavailable")


def _mixer(d_model, state_size, conv_size, dtype, seed=0):
    torch.manual_seed(seed)
    cfg = preset_config(
        "mamba", "nano", vocab_size=40, d_model=d_model, n_layers=1, state_size=state_size,
        conv_size=conv_size,
    )  # fmt: skip
    mixer = MambaMixer(cfg).to(dtype)
    with torch.no_grad():  # away from the initialisation's symmetric values (D = 1, zero bias)
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return mixer


def _value_and_grads(mixer, x, impl, monkeypatch):
    monkeypatch.setenv("ARCHLAB_SCAN", impl)
    mixer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = mixer(x)
    gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    (y * gy).sum().backward()
    return {"y": y.detach(), "x": x.grad, **{n: p.grad for n, p in mixer.named_parameters()}}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


SHAPES = [  # (B, T, d_model, N, conv K); d_inner = 2 d_model, not a multiple of the 32 lanes
    (2, 70, 20, 16, 4),
    (1, 7, 12, 1, 4),  # T < 64, B = 1, N = 1
    (3, 150, 24, 17, 2),  # two checkpoints, N = 17, K = 2
    (1, 3, 8, 4, 5),  # T shorter than the conv window
]


def _count_node(monkeypatch):
    from archlab.models.kernels import mamba_cpu

    mamba_cpu.warm_up_inner(torch.float32)  # its tiny warm-up node is not counted
    mamba_cpu.warm_up_inner(torch.float64)
    calls = []
    orig = mamba_cpu._MambaInner.apply
    monkeypatch.setattr(mamba_cpu._MambaInner, "apply", lambda *a: calls.append(1) or orig(*a))
    return calls


@pytest.mark.parametrize("B,T,d,N,K", SHAPES)
def test_fused_mixer_node_matches_op_by_op_float64(B, T, d, N, K, monkeypatch):
    mixer = _mixer(d, N, K, torch.float64)
    x = torch.randn(B, T, d, dtype=torch.float64)
    calls = _count_node(monkeypatch)
    fused = _value_and_grads(mixer, x, "fused", monkeypatch)
    assert len(calls) == 1  # the fused node ran (not the op-by-op graph)
    ref = _value_and_grads(mixer, x, "sequential", monkeypatch)
    assert len(calls) == 1  # ARCHLAB_SCAN=sequential runs the op-by-op graph
    assert fused.keys() == ref.keys() and len(fused) == 11  # y, x and 9 parameters
    for name in ref:
        assert fused[name] is not None and fused[name].shape == ref[name].shape, name
        assert _rel(fused[name], ref[name]) < 1e-10, name


@pytest.mark.parametrize("B,T,d,N,K", SHAPES[:3])
def test_fused_mixer_node_float32_matches_float64(B, T, d, N, K, monkeypatch):
    m64 = _mixer(d, N, K, torch.float64)
    m32 = _mixer(d, N, K, torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(B, T, d, dtype=torch.float64)
    fused = _value_and_grads(m32, x.float(), "fused", monkeypatch)
    ref = _value_and_grads(m64, x, "sequential", monkeypatch)
    for name in ref:
        assert fused[name].dtype == torch.float32, name
        assert _rel(fused[name], ref[name]) < 1e-5, name


def test_conv_silu_kernel_equals_torch_conv():
    from archlab.models.kernels.mamba_cpu import conv_silu

    g = torch.Generator().manual_seed(3)
    B, T, di, K = 2, 37, 21, 4
    xz = torch.randn(B, T, 2 * di, generator=g, dtype=torch.float64)
    w = torch.randn(di, 1, K, generator=g, dtype=torch.float64)
    b = torch.randn(di, generator=g, dtype=torch.float64)
    ref = F.silu(F.conv1d(xz[..., :di].transpose(1, 2), w, b, padding=K - 1, groups=di)[..., :T])
    out = conv_silu(xz, w.reshape(di, K).t().contiguous(), b)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_fused_mixer_node_under_autocast_and_no_grad(monkeypatch):
    """No grad (evaluation) runs the node too; bfloat16 autocast takes the op-by-op graph."""
    mixer = _mixer(16, 4, 4, torch.float32)
    x = torch.randn(2, 20, 16)
    calls = _count_node(monkeypatch)
    monkeypatch.delenv("ARCHLAB_SCAN", raising=False)
    with torch.no_grad():
        y = mixer(x)
    assert len(calls) == 1
    monkeypatch.setenv("ARCHLAB_SCAN", "sequential")
    with torch.no_grad():
        torch.testing.assert_close(y, mixer(x), rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("ARCHLAB_SCAN")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = mixer(x)
    assert len(calls) == 1 and torch.isfinite(yb).all()


@pytest.mark.parametrize("architecture", ["mamba", "hypermixer"])
def test_first_kernel_use_inside_gradient_checkpointing(architecture):
    """The kernels' first use (their warm-up) may happen inside checkpoint's recomputation:
    it must not disable them mid-step (it once raised CheckpointError)."""
    code = f"""
import torch
from archlab import build_model, preset_config
cfg = preset_config("{architecture}", vocab_size=64, d_model=32, n_layers=2, max_seq_len=32)
torch.manual_seed(0)
model = build_model(cfg)
model.gradient_checkpointing = True
x = torch.randint(0, 64, (2, 16))
model(x).logsumexp(-1).mean().backward()
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"
    assert "kernel failed" not in res.stderr, res.stderr

"""The fused CPU recurrences of Mamba-2 (kernels/ssd_cpu.py) and Gated DeltaNet
(kernels/delta_cpu.py), their causal conv (conv_cpu.py) and gated norms (gated_norm_cpu.py),
against the torch references: values and the gradients of every input in float64 (<= 1e-10)
and float32, with and without an initial state and a final-state gradient, T across checkpoint
boundaries; the models with the kernels on equal the models with them off (the chunked torch
forms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab import build_model, preset_config
from archlab.models.delta_rule import recurrent_gated_delta_rule
from archlab.models.ssd import ssd_sequential

pytest.importorskip("numba")

from archlab.models.kernels.conv_cpu import conv_silu  # noqa: E402
from archlab.models.kernels.delta_cpu import delta_rule_fused  # noqa: E402
from archlab.models.kernels.gated_norm_cpu import gated_rms_norm  # noqa: E402
from archlab.models.kernels.ssd_cpu import ssd_fused  # noqa: E402

LENGTHS = (1, 5, 64, 65, 150)  # the kernels checkpoint every 64 steps


def _grads(out: tuple[torch.Tensor, torch.Tensor], inputs: list, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in out]
    loss = sum((t * wi).sum() for t, wi in zip(out, w, strict=True))
    return list(torch.autograd.grad(loss, [t for t in inputs if t is not None]))


def _ssd_inputs(T: int, dtype: torch.dtype, with_state: bool) -> list:
    g = torch.Generator().manual_seed(T)
    b, H, P, G, N = 2, 4, 3, 2, 5
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = torch.rand(b, T, H, generator=g, dtype=dtype) * 0.5
    A = -torch.rand(H, generator=g, dtype=dtype) * 4
    B, C = (torch.randn(b, T, G, N, generator=g, dtype=dtype) for _ in range(2))
    D = torch.randn(H, generator=g, dtype=dtype)
    s0 = torch.randn(b, H, P, N, generator=g, dtype=dtype) if with_state else None
    return [t.requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, s0)]


def _ssd_reference(x, dt, A, B, C, D, s0):
    y, last = ssd_sequential(x, dt, A, B, C, s0)
    return y + x * D[:, None], last


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_fused_ssd_equals_the_recurrence_float64(T, with_state):
    inputs = _ssd_inputs(T, torch.float64, with_state)
    ours, ref = ssd_fused(*inputs), _ssd_reference(*inputs)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max().item() <= 1e-10
    for a, b in zip(_grads(ours, inputs), _grads(ref, inputs), strict=True):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


def test_fused_ssd_float32_and_a_wrong_decay_is_caught():
    inputs = _ssd_inputs(130, torch.float32, True)
    ours, ref = ssd_fused(*inputs), _ssd_reference(*inputs)
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-5
    for a, b in zip(_grads(ours, inputs), _grads(ref, inputs), strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    x, dt, A, B, C, D, s0 = inputs
    wrong = ssd_fused(x, dt, A * 1.01, B, C, D, s0)[0]
    assert (wrong - ref[0]).abs().max().item() > 1e-3


def _delta_inputs(T: int, dtype: torch.dtype, with_state: bool) -> list:
    g = torch.Generator().manual_seed(T)
    B, H, dk, dv = 2, 3, 4, 5
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    gate = -torch.rand(B, T, H, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, dk, dv, generator=g, dtype=dtype) if with_state else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, gate, beta, s0)]


def _delta_reference(q, k, v, g, beta, s0):
    o, last = recurrent_gated_delta_rule(*(t.transpose(1, 2) for t in (q, k, v, g, beta)), s0)
    return o.transpose(1, 2), last


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_fused_delta_rule_equals_the_recurrence_float64(T, with_state):
    inputs = _delta_inputs(T, torch.float64, with_state)
    ours, ref = delta_rule_fused(*inputs), _delta_reference(*inputs)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max().item() <= 1e-10
    for a, b in zip(_grads(ours, inputs), _grads(ref, inputs), strict=True):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


def test_fused_delta_rule_float32_and_a_wrong_beta_is_caught():
    inputs = _delta_inputs(130, torch.float32, True)
    ours, ref = delta_rule_fused(*inputs), _delta_reference(*inputs)
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-5
    for a, b in zip(_grads(ours, inputs), _grads(ref, inputs), strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    q, k, v, g, beta, s0 = inputs
    wrong = delta_rule_fused(q, k, v, g, beta * 0.99, s0)[0]
    assert (wrong - ref[0]).abs().max().item() > 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_fused_conv_silu_equals_torch_conv1d(bias):
    g = torch.Generator().manual_seed(0)
    B, T, C, K = 2, 37, 6, 4
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, K, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ours = conv_silu(x, w, b)
    ref = F.silu(F.conv1d(x.transpose(1, 2), w, b, padding=K - 1, groups=C)[..., :T]).transpose(
        1, 2
    )
    assert (ours - ref).abs().max().item() <= 1e-12
    inputs = [x, w] + ([b] if bias else [])
    for a, r in zip(_grads((ours,), inputs), _grads((ref,), inputs), strict=True):
        assert (a - r).abs().max().item() <= 1e-10


@pytest.mark.parametrize("gate_first", [True, False])
def test_fused_gated_rms_norm_equals_torch(gate_first):
    g = torch.Generator().manual_seed(0)
    B, T, C, size, eps = 2, 5, 12, 4, 1e-5
    x, z = (torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in "xz")
    w = torch.randn(C, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, z, w)]
    ours = gated_rms_norm(x, z, w, size, eps, gate_first)
    u = x * F.silu(z) if gate_first else x
    ref = F.rms_norm(u.unflatten(-1, (C // size, size)), (size,), None, eps).flatten(-2) * w
    ref = ref if gate_first else ref * F.silu(z)
    assert (ours - ref).abs().max().item() <= 1e-12
    for a, r in zip(_grads((ours,), inputs), _grads((ref,), inputs), strict=True):
        assert (a - r).abs().max().item() <= 1e-10


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_models_with_kernels_equal_the_chunked_torch_forms(arch, monkeypatch):
    """Whole nano-shaped models (2 layers), float64: logits and every parameter's gradient
    with the fused kernels == with ARCHLAB_KERNELS=off (the chunked forms), T = 100."""
    torch.manual_seed(0)
    cfg = preset_config(arch, "nano", vocab_size=64, n_layers=2, max_seq_len=128)
    model = build_model(cfg).double()
    x = torch.randint(0, 64, (2, 100))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, 64), x.reshape(-1)).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_logits, fused_grads = run()
    monkeypatch.setenv("ARCHLAB_KERNELS", "off")
    ref_logits, ref_grads = run()
    assert (fused_logits - ref_logits).abs().max().item() <= 1e-10
    for name, grad in ref_grads.items():
        assert (fused_grads[name] - grad).abs().max().item() <= 1e-10, name


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_gpu_kernels_are_never_looked_up_on_cpu(arch, monkeypatch):
    """mamba_ssm's chunk scan and fla's gated delta rule are CUDA-only extras: on CPU the
    importers are not even called (training with a state and decoding included)."""
    from archlab.generate import DecodeState
    from archlab.models import gdn, mamba2

    def refuse():
        raise AssertionError("a CUDA kernel importer ran on CPU")

    monkeypatch.setattr(mamba2, "_cuda_chunk_scan", refuse)
    monkeypatch.setattr(gdn, "_fla_chunk", refuse)
    cfg = preset_config(arch, "nano", vocab_size=64, n_layers=2, max_seq_len=64)
    model = build_model(cfg)
    x = torch.randint(0, 64, (2, 40))
    F.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1)).backward()
    with torch.inference_mode():
        state = DecodeState(model)
        state.prefill(list(range(20)))
        state.feed(3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_fused_decode_steps_equal_the_torch_steps(arch, dtype, tol, monkeypatch):
    """A prefill then single tokens (kernels/decode_ssd_gdn.py, one call per block) give the
    logits of the torch path (ARCHLAB_KERNELS=off), with non-trivial parameters everywhere."""
    from archlab.generate import DecodeState

    torch.manual_seed(0)
    cfg = preset_config(arch, "nano", vocab_size=64, n_layers=2, max_seq_len=128)
    model = build_model(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            state = DecodeState(model)
            logits = [state.prefill(list(range(10)))]
            logits += [state.feed(t) for t in (3, 5, 7, 9, 11, 2, 1)]
        return torch.stack([t.reshape(-1) for t in logits])

    fused = run()
    monkeypatch.setenv("ARCHLAB_KERNELS", "off")
    assert (fused - run()).abs().max().item() <= tol

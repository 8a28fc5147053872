"""Fused single-token block steps (kernels/decode_cpu.py) == the torch path, token by token.

Every variant the kernels read from the block's own modules is covered: LayerNorm / RMSNorm,
GELU / SwiGLU, biases, tied hypernetworks, the HyperMixer out norm on and off. Norm gains and
biases are randomised (at init they are 1 and 0, and HyperMixer's out-norm gain is 0, which
would hide a wrong term).
"""

from __future__ import annotations

import pytest
import torch

from archlab import build_model, preset_config
from archlab.models import kernels
from archlab.models.kernels import decode_cpu

pytestmark = pytest.mark.skipif(
    not kernels.fused_available("decode_step"), reason="numba unavailable"
)

VARIANTS = [
    ("mamba", {}, {}),
    ("mamba", {"state_size": 5, "conv_size": 2}, {}),
    ("hybrid", {}, {}),
    ("hybrid", {"mlp": "swiglu", "bias": True}, {}),
    ("hybrid", {"use_rmsnorm": True, "conv_size": 1}, {}),
    ("hypermixer", {}, {}),
    ("hypermixer", {"mlp": "swiglu", "bias": True, "use_rmsnorm": True}, {}),
    ("hypermixer", {"bias": True}, {"hypermixer_tied": True}),
    ("hypermixer", {}, {"hypermixer_layer_norm": False}),
]
IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in {**kw, **ex}.items()) or 'default'}"
       for a, kw, ex in VARIANTS]  # fmt: skip


def _model(arch: str, kw: dict, extra: dict, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    cfg = preset_config(arch, "nano", vocab_size=61, d_model=32, n_layers=2, **kw)
    cfg.extra.update(extra)
    if arch == "hybrid":
        cfg = cfg.replace(n_heads=2, local_window=4).validate()
    model = build_model(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gains and biases away from 1 and 0
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith(".D"):
                p.normal_()
    return model


class _Spy:
    """Counts the decode kernel calls (the fused path was really taken)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.run = decode_cpu._run

    def __call__(self, fn, *args):
        self.calls.append(fn.__name__ if hasattr(fn, "__name__") else str(fn))
        return self.run(fn, *args)


def _decode(model, idx: torch.Tensor, prefill: int) -> tuple[torch.Tensor, list[dict]]:
    cache = model.init_cache()
    with torch.no_grad():
        outs = [model(idx[:, :prefill], cache=cache)]
        outs += [model(idx[:, t : t + 1], cache=cache) for t in range(prefill, idx.shape[1])]
    return torch.cat(outs, 1), cache.layers


@pytest.mark.parametrize("arch,kw,extra", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_steps_equal_the_torch_path(monkeypatch, arch, kw, extra, dtype):
    model = _model(arch, kw, extra, dtype)
    idx = torch.randint(0, 61, (3, 14), generator=torch.Generator().manual_seed(1))
    spy = _Spy()
    with monkeypatch.context() as m:
        m.setattr(decode_cpu, "_run", spy)
        fused, fused_state = _decode(model, idx, prefill=4)
    block_kernels = {"_mamba_block_rows", "_hyper_block_rows"}
    assert sum(c in block_kernels for c in spy.calls) >= 10, spy.calls  # the fused path ran
    with monkeypatch.context() as m:
        m.setenv("ARCHLAB_KERNELS", "off")  # every fused kernel off: the torch ops
        reference, ref_state = _decode(model, idx, prefill=4)
    with torch.no_grad():
        full = model(idx)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, reference, **tol)
    torch.testing.assert_close(fused, full, **tol)
    for a, b in zip(fused_state, ref_state, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                torch.testing.assert_close(a[key], b[key], **tol)
            else:
                assert a[key] == b[key]


@pytest.mark.parametrize("arch", ["mamba", "hypermixer"])
def test_first_token_without_prefill_and_batch_rows_on_threads(monkeypatch, arch):
    """Decoding from an empty cache (the Mamba kernel starts its own zero state; HyperMixer's
    first token takes the torch path) gives the full forward, and batch rows split over two
    threads give bit for bit the one-thread result."""
    from archlab.models.kernels import _numba

    model = _model(arch, {}, {}, torch.float64)
    idx = torch.randint(0, 61, (9, 8), generator=torch.Generator().manual_seed(2))
    one, _ = _decode(model, idx, prefill=1)
    with torch.no_grad():
        full = model(idx)
    torch.testing.assert_close(one, full, rtol=1e-10, atol=1e-10)

    monkeypatch.setattr(_numba, "_MIN_WORK_PER_THREAD", 1)  # threads even for this tiny batch
    block = model.blocks[0]
    x = torch.randn(9, 1, 32, dtype=torch.float64)
    cache = model.init_cache()
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                     for k, v in cache.layers[0].items()}  # fmt: skip
            with torch.no_grad():
                out, _ = block(x, state, 5)
            results.append((out, state))
    finally:
        torch.set_num_threads(old)
    (a, sa), (b, sb) = results
    assert torch.equal(a, b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def _step_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """Logits of the last token, decoded after a prefill of the others."""
    cache = model.init_cache()
    with torch.no_grad():
        model(idx[:, :-1], cache=cache)
        return model(idx[:, -1:], cache=cache)


@pytest.mark.parametrize("arch", ["mamba", "hypermixer", "hybrid"])
def test_weights_are_reread_after_every_kind_of_change(arch):
    """In-place updates (optimizer steps), load_state_dict, assign=True (new Parameter
    objects) and a dtype change all reach the kernel: no stale copy of a weight is used."""
    model = _model(arch, {}, {}, torch.float64)
    other = _model(arch, {}, {}, torch.float64, seed=7)
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))

    def check() -> None:
        with torch.no_grad():
            full = model(idx)[:, -1:]
        torch.testing.assert_close(_step_logits(model, idx), full, rtol=1e-9, atol=1e-9)

    check()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    check()
    model.load_state_dict(other.state_dict())
    check()
    fresh = {k: v.clone() * 1.01 for k, v in other.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    check()
    model.float()
    with torch.no_grad():
        full = model(idx)[:, -1:]
    torch.testing.assert_close(_step_logits(model, idx), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["mamba", "hypermixer"])
def test_a_copied_model_decodes_with_its_own_weights(arch):
    """The plan kept on each block refers to that block's weights: a deep copy (EMA, a
    snapshot) must not decode with the original's."""
    import copy

    model = _model(arch, {}, {}, torch.float64)
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(6))
    _step_logits(model, idx)  # plans made and filled
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.1)
        full = clone(idx)[:, -1:]
    torch.testing.assert_close(_step_logits(clone, idx), full, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(_step_logits(model, idx), full)


def test_not_used_where_it_does_not_apply(monkeypatch):
    """Training mode with dropout, and autograd through the parameters, take the torch path
    (the block's, or every kernel's)."""
    spy = _Spy()
    monkeypatch.setattr(decode_cpu, "_run", spy)
    model = _model("hybrid", {"dropout": 0.1}, {}, torch.float32).train()
    idx = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.init_cache()
        model(idx[:, :5], cache=cache)
        model(idx[:, 5:], cache=cache)
    assert spy.calls == ["_mamba_rows"]  # the bare mixer (no dropout inside), not the block
    spy.calls.clear()
    model.eval()
    cache = model.init_cache()
    model(idx[:, :5], cache=cache)
    out = model(idx[:, 5:], cache=cache)  # grad mode on, parameters require grad
    assert spy.calls == [] and out.requires_grad
    with torch.no_grad():
        model(idx[:, :5], cache=(cache := model.init_cache()))
        model(idx[:, 5:], cache=cache)
    assert len(spy.calls) == model.cfg.n_layers // 2  # eval, no grad: the Mamba layers


def test_a_kernel_failure_falls_back_with_one_notice(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "_failed", {})
    from archlab.models.kernels import _numba

    monkeypatch.setattr(_numba, "_notices", set())

    def broken(*_args):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(decode_cpu, "_mamba_block_rows", broken)
    model = _model("mamba", {}, {}, torch.float64)
    idx = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(5))
    out, _ = _decode(model, idx, prefill=3)
    with torch.no_grad():
        torch.testing.assert_close(out, model(idx), rtol=1e-10, atol=1e-10)
    err = capsys.readouterr().err
    assert err.count("decode: fused CPU steps unavailable") == 1, err
    assert "simulated compile failure" in err
    assert not kernels.fused_available("decode_step")

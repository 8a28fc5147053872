"""Mamba-2: equal to transformers' Mamba2Mixer / Mamba2ForCausalLM, chunked SSD == recurrence,
cached decoding, causality, init, counts, bad shapes.

float64 against transformers: its Mamba-2 code casts to float32 in several places (the gated
and plain RMSNorms, ``A_log.float()``, the chunk scan's ``.float()`` calls, the residual in
float32, the logits' ``.float()``). :func:`no_float32_casts` neutralises them for the test by
giving the module a ``torch`` whose ``float32`` is ``float64`` and making ``Tensor.float`` keep
float64 tensors as they are; a control asserts that without it the difference is float32-sized.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab import build_model, count_parameters, preset_config
from archlab.cli import main
from archlab.models.mamba2 import Mamba2Block, Mamba2Mixer
from archlab.models.ssd import ssd_chunked, ssd_sequential

tf_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


def _cfg(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=2, max_seq_len=64, ssd_head_dim=8,
                state_size=6, ssd_groups=2, ssd_chunk_size=8)  # fmt: skip
    base.update(kw)
    return preset_config("mamba2", "nano", **base)


# ---- the SSD forms ----------------------------------------------------------------------------
def _ssd_inputs(b, T, H, P, G, N, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=g)
    inputs = dict(
        x=torch.randn(b, T, H, P, **kw),
        dt=torch.rand(b, T, H, **kw) * 0.8 + 0.01,
        A=-torch.rand(H, **kw) * 4 - 0.1,
        B=torch.randn(b, T, G, N, **kw),
        C=torch.randn(b, T, G, N, **kw),
    )
    if with_state:
        inputs["initial_state"] = torch.randn(b, H, P, N, **kw)
    return {k: v.requires_grad_() for k, v in inputs.items()}


def _with_grads(fn, inputs, **kw):
    y, last = fn(**inputs, **kw)
    gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    gl = torch.cos(torch.arange(last.numel(), dtype=y.dtype)).view_as(last)
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), list(inputs.values()))
    return y, last, grads


# Every T in 1..300 meets chunks longer than it, equal to it, dividing it and not: the lengths
# cover T = 1, 2, primes, powers of two and their neighbours, and 300.
LENGTHS = [1, 2, 3, 5, 8, 13, 31, 32, 33, 64, 100, 127, 128, 129, 255, 256, 257, 300]
CHUNKS = [1, 2, 3, 7, 8, 16, 50, 64, 128, 256, 301]


def test_chunked_ssd_equals_the_recurrence_float64_every_chunk_and_length():
    worst = 0.0
    for T in LENGTHS:
        inputs = _ssd_inputs(1, T, 4, 3, 2, 5, seed=T)
        with torch.no_grad():
            ref_y, ref_last = ssd_sequential(**inputs)
            for Q in CHUNKS:
                y, last = ssd_chunked(**inputs, chunk_size=Q)
                worst = max(worst, (y - ref_y).abs().max().item())
                worst = max(worst, (last - ref_last).abs().max().item())
    assert worst < 1e-11


@pytest.mark.parametrize("T,Q", [(37, 5), (64, 8), (9, 16), (1, 4), (50, 7)])
def test_chunked_ssd_gradients_equal_the_recurrence_float64(T, Q):
    inputs = _ssd_inputs(2, T, 4, 3, 2, 5, seed=T)
    y1, l1, g1 = _with_grads(lambda **k: ssd_chunked(**k, chunk_size=Q), inputs)
    y2, l2, g2 = _with_grads(ssd_sequential, inputs)
    assert (y1 - y2).abs().max() < 1e-11 and (l1 - l2).abs().max() < 1e-11
    for name, a, b in zip(inputs, g1, g2, strict=True):
        assert (a - b).abs().max() < 1e-10, name


def test_chunked_ssd_stable_for_strong_decay():
    """dt |A| up to ~400 per step: every exponent is <= 0, so nothing overflows."""
    inputs = _ssd_inputs(2, 40, 4, 3, 1, 5, seed=7)
    with torch.no_grad():
        inputs["A"].mul_(50.0)
        inputs["dt"].add_(1.0)
    y1, l1, g1 = _with_grads(lambda **k: ssd_chunked(**k, chunk_size=16), inputs)
    y2, l2, _ = _with_grads(ssd_sequential, inputs)
    assert all(torch.isfinite(g).all() for g in g1)
    assert (y1 - y2).abs().max() < 1e-10 and (l1 - l2).abs().max() < 1e-10


# ---- against transformers ---------------------------------------------------------------------
class _Torch64:
    """The ``torch`` transformers' Mamba-2 module sees: float32 means float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def no_float32_casts(monkeypatch):
    original = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    monkeypatch.setattr(tf_mamba2, "torch", _Torch64())
    monkeypatch.setattr(torch.Tensor, "float", keep_float64)


def _hf_config(cfg, chunk_size=None):
    from archlab.export.hf_forms import _mamba2_config

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    hf_cfg = _mamba2_config(cfg, common)
    if chunk_size is not None:
        hf_cfg.chunk_size = chunk_size
    return hf_cfg


def _mixers(dtype, chunk_size=8, their_chunk=5, **kw):
    torch.manual_seed(0)
    cfg = _cfg(ssd_chunk_size=chunk_size, **kw)
    ours = Mamba2Mixer(cfg).to(dtype)
    with torch.no_grad():  # non-trivial values everywhere (the gains and biases too)
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs = tf_mamba2.Mamba2Mixer(_hf_config(cfg, their_chunk), layer_idx=0).to(dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return cfg, ours, theirs


def _outputs_and_grads(module, x, call):
    x = x.clone().requires_grad_()
    out = call(module, x)
    (out * torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), grads, x.grad


def _max_diffs(ours, theirs, x, call_ours, call_theirs):
    o1, g1, gx1 = _outputs_and_grads(ours, x, call_ours)
    o2, g2, gx2 = _outputs_and_grads(theirs, x, call_theirs)
    assert set(g1) == set(g2)
    out = (o1 - o2).abs().max().item()
    grad = max([(g1[n] - g2[n]).abs().max().item() for n in g1] + [(gx1 - gx2).abs().max().item()])
    return out, grad


def _mixer_diffs(dtype, **kw):
    cfg, ours, theirs = _mixers(dtype, **kw)
    x = torch.randn(2, 29, cfg.d_model, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return _max_diffs(ours, theirs, x, lambda m, x: m(x), lambda m, x: m(x))


def test_mixer_equals_transformers_float32():
    out, grad = _mixer_diffs(torch.float32)
    assert out <= 1e-5 and grad <= 1e-5, (out, grad)


def test_mixer_equals_transformers_float64(no_float32_casts):
    out, grad = _mixer_diffs(torch.float64)
    assert out <= 1e-10 and grad <= 1e-10, (out, grad)
    out, grad = _mixer_diffs(torch.float64, chunk_size=64, their_chunk=64, ssd_groups=1)
    assert out <= 1e-10 and grad <= 1e-10, (out, grad)


def test_float64_comparison_needs_the_casts_neutralised():
    """Control: with transformers' float32 casts in place the float64 gap is float32-sized."""
    out, _ = _mixer_diffs(torch.float64)
    assert 1e-10 < out < 1e-4


@pytest.mark.parametrize("piece", ["D sign", "decay", "dt_bias", "group norm"])
def test_a_perturbed_mixer_fails_the_comparison(piece, no_float32_casts):
    cfg, ours, theirs = _mixers(torch.float64)
    with torch.no_grad():
        if piece == "D sign":
            ours.D.neg_()
        elif piece == "decay":
            ours.A_log.add_(0.3)
        elif piece == "dt_bias":
            ours.dt_bias.add_(0.3)
        else:  # one norm over all of d_inner instead of one per group
            ours.norm.groups = 1
    x = torch.randn(2, 29, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() > 1e-4


def _models(dtype, **kw):
    torch.manual_seed(2)
    cfg = _cfg(n_layers=3, **kw)
    ours = build_model(cfg).to(dtype)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith(("dt_bias", "D", "conv1d.bias")):
                p.add_(torch.randn_like(p) * 0.1)
    from archlab.export.hf import build_hf_model

    theirs = build_hf_model(ours, "mamba2", eos_id=0).to(dtype)
    theirs.config.chunk_size = 6  # their chunks differ from ours (8)
    for layer in theirs.backbone.layers:
        layer.mixer.chunk_size = 6
    return cfg, ours, theirs


def _model_diffs(dtype):
    cfg, ours, theirs = _models(dtype)
    ours.train(), theirs.train()
    idx = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))

    def run(model, call):  # the training loss: next-token cross-entropy, mean over tokens
        out = call(model)
        V = cfg.vocab_size
        F.cross_entropy(out[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    o1, g1 = run(ours, lambda m: m(idx))
    o2, g2 = run(theirs, lambda m: m(idx).logits)
    from archlab.export.hf_forms import hf_state_dict

    mapped = hf_state_dict(cfg, g1, "mamba2")  # our gradients under their names
    mapped.pop("lm_head.weight")  # tied: the embedding's gradient holds both uses
    assert set(mapped) == set(g2) - {"lm_head.weight"}
    grad = max((mapped[n] - g2[n]).abs().max().item() for n in mapped)
    return (o1 - o2).abs().max().item(), grad


def test_model_equals_mamba2_for_causal_lm_float32():
    out, grad = _model_diffs(torch.float32)
    assert out <= 1e-5 and grad <= 1e-5, (out, grad)


def test_model_equals_mamba2_for_causal_lm_float64(no_float32_casts):
    out, grad = _model_diffs(torch.float64)
    assert out <= 1e-10 and grad <= 1e-10, (out, grad)


def test_cached_decoding_equals_transformers_generation_cache():
    """Our per-token decode (conv window + (B, H, P, N) state) against theirs, token by token."""
    cfg, ours, theirs = _models(torch.float32)
    ours.eval(), theirs.eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache, outs = ours.init_cache(), []
        for t in range(12):
            outs.append(ours(idx[:, t : t + 1], cache=cache))
        full = theirs(idx).logits
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-4


# ---- the model's contracts ----------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 7, 18])
def test_mamba2_model_is_causal(t):
    torch.manual_seed(1)
    model = build_model(_cfg()).eval()
    idx = torch.randint(0, 61, (2, 24))
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(2)) % 61
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-6
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-4  # the change is visible at t + 1


@pytest.mark.parametrize("chunks", [[1] * 21, [4, 1, 1, 9, 2, 3, 1], [21], [2, 19], [17, 1, 3]])
def test_mamba2_cached_decoding_matches_full_forward(chunks):
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
    conv_dim = 64 + 2 * 2 * 6  # d_inner + 2 G N
    assert state["conv"].shape == (3, conv_dim, 3) and state["ssm"].shape == (3, 8, 8, 6)
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-5


def test_mamba2_every_parameter_gets_a_gradient():
    torch.manual_seed(3)
    model = build_model(_cfg())
    idx = torch.randint(0, 61, (2, 20))
    F.cross_entropy(model(idx).reshape(-1, 61), torch.roll(idx, -1, 1).reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_mamba2_init_values():
    torch.manual_seed(4)
    model = build_model(preset_config("mamba2", "nano", vocab_size=61))
    mixer = model.blocks[1].mixer
    H = 256 // 32
    assert mixer.A_log.shape == mixer.D.shape == mixer.dt_bias.shape == (H,)
    A = mixer.A_log.data.exp()
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 0
    assert torch.equal(mixer.D.data, torch.ones(H))
    dt = F.softplus(mixer.dt_bias.data)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert torch.equal(mixer.norm.weight.data, torch.ones(256))
    n_layers = model.cfg.n_layers
    expected_std = 0.02 / math.sqrt(2 * n_layers * 256)  # see Mamba2Mixer.__init__
    assert n_layers == 8 and abs(mixer.out_proj.weight.std() / expected_std - 1) < 0.05
    assert isinstance(model.blocks[0], Mamba2Block)
    assert type(model.blocks[0].norm1).__name__ == "RMSNorm"
    assert mixer.nheads == 8 and mixer.state_size == 64 and mixer.chunk_size == 64


def _block_params(d, expand, N, K, P, G):
    di = expand * d
    H, conv = di // P, di + 2 * G * N
    return d + d * (di + conv + H) + conv * K + conv + 3 * H + di + di * d


@pytest.mark.parametrize(
    "d,layers,N,K,P,G,vocab", [(32, 2, 6, 4, 8, 2, 61), (48, 3, 8, 3, 16, 3, 100)]
)
def test_mamba2_exact_parameter_count(d, layers, N, K, P, G, vocab):
    cfg = preset_config("mamba2", "nano", vocab_size=vocab, d_model=d, n_layers=layers,
                        state_size=N, conv_size=K, ssd_head_dim=P, ssd_groups=G)  # fmt: skip
    expected = vocab * d + layers * _block_params(d, 2, N, K, P, G) + d
    assert count_parameters(cfg) == (expected, expected)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--ssd-head-dim", "48"], "--ssd-head-dim: d_inner 256"),
        (["--ssd-groups", "3"], "--ssd-groups: 3 groups must divide the 8 heads"),
        (["--ssd-chunk-size", "0"], "--ssd-chunk-size: must be >= 1"),
        (["--conv-size", "1"], "--conv-size: Mamba-2's causal conv needs a kernel of at least 2"),
        (["--ssd-head-dim", "0"], "--ssd-head-dim: must be a positive number"),
    ],
)
def test_shapes_the_reference_refuses_are_one_line_exit_2(flags, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(
            main(["summary", "--architecture", "mamba2", "--model-size", "nano", *flags])
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("arch", ["dense", "mamba", "hybrid"])
@pytest.mark.parametrize("flag", ["--ssd-head-dim", "--ssd-groups", "--ssd-chunk-size"])
def test_mamba2_flags_are_refused_elsewhere(arch, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["summary", "--architecture", arch, flag, "4"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"not used by --architecture {arch}" in err and "mamba2" in err


@pytest.mark.parametrize("T,chunk", [(1, 64), (37, 8), (64, 64), (100, 32), (300, 64)])
def test_flops_count_equals_torch_flop_counter(T, chunk, monkeypatch):
    """train/flops.py's SSD count == FlopCounterMode over the chunked SSD (the path without
    the fused kernels); the mixer's projections are 2 x their parameters per token, as
    flops.py counts every linear (the depthwise conv is elementwise multiply-adds, which the
    counter does not see)."""
    from torch.utils.flop_counter import FlopCounterMode

    from archlab.train.flops import mixer_flops

    monkeypatch.setenv("ARCHLAB_KERNELS", "off")
    cfg = _cfg(ssd_chunk_size=chunk)
    mixer = Mamba2Mixer(cfg)
    b, H, P, G, N = 2, mixer.nheads, mixer.headdim, mixer.ngroups, mixer.state_size
    inputs = _ssd_inputs(b, T, H, P, G, N, with_state=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ssd_chunked(**inputs, chunk_size=chunk)
    assert counter.get_total_flops() == pytest.approx(
        mixer_flops(mixer, T).visible * b * T, rel=1e-12
    )
    counter = FlopCounterMode(display=False)
    x = torch.randn(b, T, cfg.d_model)
    with counter, torch.no_grad():
        mixer(x)
    linears = 2 * (mixer.in_proj.weight.numel() + mixer.out_proj.weight.numel()) * b * T
    expected = mixer_flops(mixer, T).visible * b * T + linears  # the conv: multiply-adds
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_flops_of_the_fused_recurrence_are_analytic_only():
    """With the fused CPU kernels the counter sees only the projections; the SSD is the
    recurrence's 5 H P N + 2 H P per token, by formula."""
    pytest.importorskip("numba")
    from torch.utils.flop_counter import FlopCounterMode

    from archlab.train.flops import mixer_flops

    mixer = Mamba2Mixer(_cfg())
    assert mixer.fused_recurrence()
    b, T = 2, 70
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        mixer(torch.randn(b, T, mixer.in_proj.in_features))
    linears = 2 * (mixer.in_proj.weight.numel() + mixer.out_proj.weight.numel()) * b * T
    assert counter.get_total_flops() == linears
    H, P, N = mixer.nheads, mixer.headdim, mixer.state_size
    parts = mixer_flops(mixer, T)
    assert parts.visible == 0 and parts.analytic == H * (5 * P * N + 2 * P)

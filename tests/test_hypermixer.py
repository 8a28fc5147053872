"""HyperMixer: causal prefix-sum mixing, decoding, parameter counts, the RustGPT variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.config import preset_config
from archlab.models import build_model, count_parameters
from archlab.models.hypermixer import CausalHyperMixing, causal_hypermix, sinusoidal_positions
from archlab.models.hypermixer_rustgpt import CausalSequenceHyperMixer


def small_cfg(**kw):
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    base.update(kw)
    return preset_config("hypermixer", "nano", **base)


def rustgpt_cfg(**kw):
    return preset_config("hypermixer", preset="rustgpt", vocab_size=533, **kw)


def away_from_zero_init(model):
    """The mixers' zero-initialised residual scale (output-norm gain, or W2's generator
    without the norm) set to random values, as after training: at exact init the branch adds
    0, so the tests of causality, decoding and gradients would not see the mixer at all."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, CausalHyperMixing):
                if mod.out_norm is not None:
                    w = mod.out_norm.weight
                    w.copy_(1.0 + 0.2 * torch.randn(w.shape, generator=g))
                elif mod.hyper_w2 is not None:
                    w = mod.hyper_w2.proj.weight
                    w.copy_(0.3 * torch.randn(w.shape, generator=g))
    return model


def model_of(cfg, seed=0):
    torch.manual_seed(seed)
    return away_from_zero_init(build_model(cfg).eval())


# ---- the causal mixing kernel -------------------------------------------------------------
def naive_causal_hypermix(w1, x, w2, s0, start):
    """O(T^2) reference: for every t, sum the masked outer products explicitly."""
    T = x.shape[1]
    mask = torch.ones(T, T, dtype=x.dtype).tril()  # (t, i): i <= t
    s = torch.einsum("ti,bim,bid->btmd", mask, w1, x) + s0[:, None]  # (B, T, M, D)
    n = torch.arange(start + 1, start + T + 1, dtype=x.dtype)
    return torch.einsum("btm,btmd->btd", w2, F.gelu(s / n[:, None, None]))


# chunks of <= 32 positions use the masked-matmul path, longer ones the cumsum path
@pytest.mark.parametrize("chunk", [1, 3, 8, 40, 64])
def test_chunked_mixing_equals_naive_reference_values_and_gradients(chunk):
    torch.manual_seed(0)
    B, T, M, D = 2, 45, 5, 7
    w1, x, w2 = (torch.randn(B, T, k, dtype=torch.float64, requires_grad=True) for k in (M, D, M))
    s0 = torch.randn(B, M, D, dtype=torch.float64, requires_grad=True)
    out, s_end = causal_hypermix(w1, x, w2, s0, start=4, chunk=chunk, impl="chunked")
    ref = naive_causal_hypermix(w1, x, w2, s0, start=4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the inference path (no saved states) gives the same values
        out_ng, s_ng = causal_hypermix(w1, x, w2, s0, start=4, chunk=chunk, impl="chunked")
    torch.testing.assert_close(out_ng, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(s_ng, s_end, rtol=0, atol=0)
    expected_s = s0 + torch.einsum("bim,bid->bmd", w1, x)
    torch.testing.assert_close(s_end, expected_s.detach(), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (w1, x, w2, s0))
    ref_grads = torch.autograd.grad((ref * g).sum(), (w1, x, w2, s0))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "T,chunk,impl", [(6, 4, "chunked"), (36, 34, "chunked"), (37, None, "fused")]
)
def test_mixing_gradcheck(T, chunk, impl):
    torch.manual_seed(1)
    args = [torch.randn(1, T, k, dtype=torch.float64, requires_grad=True) for k in (3, 4, 3)]
    s0 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c, s: causal_hypermix(a, b, c, s, 2, chunk, impl)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*args, s0))


def test_mixing_continues_from_state_in_chunks():
    torch.manual_seed(2)
    B, T, M, D = 2, 17, 4, 6
    w1, x, w2 = (torch.randn(B, T, k) for k in (M, D, M))
    full, _ = causal_hypermix(w1, x, w2)
    s, outs, t0 = None, [], 0
    for n in (1, 5, 1, 10):
        o, s = causal_hypermix(w1[:, t0 : t0 + n], x[:, t0 : t0 + n], w2[:, t0 : t0 + n], s, t0)
        outs.append(o)
        t0 += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_sinusoidal_positions_values():
    pe = sinusoidal_positions(3, 2, 6, torch.device("cpu"))
    for row, p in enumerate((3, 4)):
        for k in range(3):
            angle = p / 10000 ** (2 * k / 6)
            assert pe[row, 2 * k].item() == pytest.approx(
                torch.tensor(angle).sin().item(), abs=1e-6
            )
            assert pe[row, 2 * k + 1].item() == pytest.approx(
                torch.tensor(angle).cos().item(), abs=1e-6
            )


# ---- whole models: causality, decoding, gradients ---------------------------------------------
MODEL_CASES = {
    "general": lambda: small_cfg(),
    "general_rope": lambda: small_cfg(use_rope=True),
    "general_tied_nonorm": lambda: small_cfg(
        extra={"hypermixer_tied": True, "hypermixer_layer_norm": False}
    ),
    "rustgpt": lambda: rustgpt_cfg(),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(case):
    cfg = MODEL_CASES[case]()
    model = model_of(cfg)
    T = 40
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 20, T - 2):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(2)) % cfg.vocab_size
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            # and the changed token does matter at its own position
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 1, 2]])
def test_cached_decoding_equals_full_forward(case, chunks):
    cfg = MODEL_CASES[case]()
    model = model_of(cfg)
    T = sum(chunks)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        cache = model.init_cache()
        outs, t0 = [], 0
        for n in chunks:
            outs.append(model(idx[:, t0 : t0 + n], cache=cache))
            t0 += n
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-4)


def test_general_decode_state_layout():
    cfg = small_cfg()
    model = model_of(cfg)
    cache = model.init_cache()
    with torch.no_grad():
        model(torch.zeros(3, 5, dtype=torch.long), cache=cache)
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    for layer in cache.layers:
        assert layer["S"].shape == (3, cfg.resolved_mixing_dim, cfg.d_model)
        assert layer["count"] == 6


def test_decode_state_out_of_step_is_rejected():
    cfg = small_cfg()
    block = model_of(cfg).blocks[0]
    state: dict = {}
    block(torch.randn(1, 4, cfg.d_model), state, 0)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        block(torch.randn(1, 1, cfg.d_model), state, 7)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_every_parameter_gets_a_finite_nonzero_gradient(case):
    cfg = MODEL_CASES[case]()
    model = model_of(cfg).train()
    T = cfg.max_seq_len if cfg.preset == "rustgpt" else 24  # rustgpt: every W2 column in use
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    target = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    loss = F.cross_entropy(model(idx).flatten(0, 1), target.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_position_information_reaches_the_hypernetwork_without_learned_positions():
    # One layer, RoPE config (no learned positions): the prefix sum at t=2 is the same bag of
    # tokens after swapping tokens 0 and 1, so only the sinusoidal positions tell them apart.
    cfg = small_cfg(use_rope=True, n_layers=1)
    model = model_of(cfg)
    assert model.pos_emb is None
    idx = torch.tensor([[3, 9, 4, 7]])
    swapped = torch.tensor([[9, 3, 4, 7]])
    with torch.no_grad():
        a, b = model(idx), model(swapped)
        assert (a[0, 2] - b[0, 2]).abs().max() > 1e-3
        # the mixer itself without its position encoding would be blind to the swap
        block = model.blocks[0]
        x_a = block.norm1(model.tok_emb(idx))
        x_b = block.norm1(model.tok_emb(swapped))
        mixer = block.mixer
        bag = []
        for x in (x_a, x_b):
            w1, w2 = mixer.hyper_w1(x), mixer.hyper_w2(x)
            bag.append(causal_hypermix(w1, x, w2)[0][0, 2])
        torch.testing.assert_close(bag[0], bag[1], rtol=1e-5, atol=1e-6)


def test_long_sequence_with_rope_config_beyond_max_seq_len():
    # no learned positions: the mixer works at any length, chunked
    cfg = small_cfg(use_rope=True, max_seq_len=16)
    model = model_of(cfg)
    for blk in model.blocks:
        blk.mixer.chunk_size = 64  # cumsum path
    idx = torch.randint(0, cfg.vocab_size, (1, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(idx)
        for blk in model.blocks:
            blk.mixer.chunk_size = 7  # masked-matmul path
        torch.testing.assert_close(model(idx), full, rtol=0, atol=1e-5)


# ---- parameter counts -------------------------------------------------------------------------
def test_rustgpt_hypermixer_has_exactly_the_seed_parameter_count():
    assert count_parameters(rustgpt_cfg())[0] == 1_386_917
    model = build_model(rustgpt_cfg(), device="meta")
    mixer = model.blocks[0].mixer
    assert mixer.num_generated == 10_384
    assert mixer.proj.weight.shape == (10_384, 32)
    assert model.parameter_breakdown() == {
        "embeddings": 533 * 128 + 80 * 128,
        "token_mixing": 3 * (128 * 32 + 32 + 32 * 10_384 + 10_384),
        "channel_mixing": 3 * (128 * 256 + 256 + 256 * 128 + 128),
        "norms": 3 * 2 * 2 * 128,
        "head": 128 * 533 + 533,
    }


def test_general_parameter_count_by_hand():
    d, hidden, m, d_ff, L, V, S = 32, 8, 16, 64, 2, 50, 64
    hyper = d * hidden + hidden * m  # no biases by default
    block = 2 * (2 * d) + 2 * hyper + 2 * d + 2 * d * d_ff  # norm1/2, h1, h2, out norm, MLP
    total = L * block + V * d + S * d + 2 * d  # + tied embeddings, positions, final norm
    assert total == 13_824
    assert count_parameters(small_cfg())[0] == total
    tied = small_cfg(extra={"hypermixer_tied": True, "hypermixer_layer_norm": False})
    assert count_parameters(tied)[0] == total - L * (hyper + 2 * d)
    with_bias = small_cfg(bias=True)
    extra_bias = L * (2 * (hidden + m) + d_ff + d)  # hypernetworks + MLP biases
    assert count_parameters(with_bias)[0] == total + extra_bias


# ---- the RustGPT variant against the seed's (non-causal) formula ------------------------------
def seed_token_mix(mixer: CausalSequenceHyperMixer, x):
    """The seed's mixer: mean-pool the whole (length-L) sequence, mix all positions."""
    L, m = mixer.length, mixer.mixing_dim
    theta = mixer.proj(F.relu(mixer.fc(x.mean(dim=1))))  # (B, P)
    w1, b1, w2, b2 = theta.split([L * m, m, m * L, L], dim=-1)
    w1, w2 = w1.view(-1, L, m), w2.view(-1, m, L)
    hidden = F.relu(torch.einsum("bik,bid->bkd", w1, x) + b1[..., None])  # (B, m, D)
    return torch.einsum("bkt,bkd->btd", w2, hidden) + b2[..., None]  # (B, L, D)


def test_rustgpt_mixer_equals_seed_at_each_prefix_end():
    torch.manual_seed(7)
    cfg = rustgpt_cfg()
    mixer = model_of(cfg).blocks[0].mixer.double()
    for p in mixer.parameters():  # larger weights so every term matters
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 80, 128, dtype=torch.float64)
    ours = mixer(x)
    # at the last position the whole sequence is the prefix: identical to the seed
    torch.testing.assert_close(ours[:, -1], seed_token_mix(mixer, x)[:, -1], rtol=1e-10, atol=1e-10)
    # at position t: the seed applied to the prefix zero-padded to 80, pooled over t+1 tokens
    for t in (0, 13, 50):
        padded = torch.zeros_like(x)
        padded[:, : t + 1] = x[:, : t + 1]
        scaled = padded * (80 / (t + 1))  # so that the seed's mean over 80 = prefix mean
        theta_in = scaled.mean(dim=1)
        L, m = mixer.length, mixer.mixing_dim
        theta = mixer.proj(F.relu(mixer.fc(theta_in)))
        w1, b1, w2, b2 = theta.split([L * m, m, m * L, L], dim=-1)
        hidden = F.relu(torch.einsum("bik,bid->bkd", w1.view(-1, L, m), padded) + b1[..., None])
        expected = torch.einsum("bk,bkd->bd", w2.view(-1, m, L)[..., t], hidden) + b2[:, t, None]
        torch.testing.assert_close(ours[:, t], expected, rtol=1e-10, atol=1e-10)

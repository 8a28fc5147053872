"""Gated DeltaNet: the chunked rule equals the recurrence, the layer and the whole model equal
transformers' OLMo-hybrid (float32 and float64), perturbations are caught, shapes refused.

float64 against the reference: transformers' OLMo-hybrid code casts to float32 in its RMSNorms,
its gated RMSNorm, the decay g (``A_log.float()``, ``a_proj(...).float()``) and at the entry of
``torch_chunk/recurrent_gated_delta_rule`` (``x.to(torch.float32)``). ``float64_kept`` patches
``Tensor.float`` and ``Tensor.to`` for the test's duration so that a float64 tensor asked to
become float32 stays float64 (every other conversion is untouched); the reference then runs
entirely in float64 and the comparison is at 1e-10.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from archlab import build_model, preset_config
from archlab.cli import main
from archlab.export.hf_forms import FORMS_BY_NAME, hf_state_dict
from archlab.models.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

olmo = pytest.importorskip("transformers.models.olmo_hybrid.modeling_olmo_hybrid")


@contextlib.contextmanager
def float64_kept():
    """Within: ``t.float()`` and ``t.to(torch.float32, ...)`` leave a float64 t float64."""
    to, flt = torch.Tensor.to, torch.Tensor.float

    def keep_to(self, *args, **kw):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kw.get("dtype") is torch.float32:
                kw["dtype"] = torch.float64
        return to(self, *args, **kw)

    def keep_float(self, *args, **kw):
        return self if self.dtype == torch.float64 else flt(self, *args, **kw)

    torch.Tensor.to, torch.Tensor.float = keep_to, keep_float  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.float = to, flt  # type: ignore[method-assign]


def _rule_inputs(B, H, T, dk, dv, dtype=torch.float64, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, generator=g)
    q = F.normalize(torch.randn(B, H, T, dk, **kw), dim=-1) * dk**-0.5
    k = F.normalize(torch.randn(B, H, T, dk, **kw), dim=-1)
    v = torch.randn(B, H, T, dv, **kw)
    decay = -torch.rand(B, H, T, **kw) * 2  # strong and weak decays
    beta = torch.rand(B, H, T, **kw)
    ins = [q, k, v, decay, beta] + ([torch.randn(B, H, dk, dv, **kw)] if state else [])
    return [t.requires_grad_(True) for t in ins]


def _values_and_grads(fn, ins, **kw):
    state = ins[5] if len(ins) > 5 else None
    o, S = fn(*ins[:5], initial_state=state, **kw)
    go = torch.sin(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)
    gS = torch.cos(torch.arange(S.numel(), dtype=o.dtype)).view_as(S)
    grads = torch.autograd.grad((o * go).sum() + (S * gS).sum(), ins)
    return [o, S, *grads]


# T = 1..300 covered by: 1, lengths around multiples of each chunk (C - 1, C, C + 1), a long
# ragged one, 300 itself; chunk sizes 1 (every token its own chunk), small odd, 16, 64, > T.
@pytest.mark.parametrize(
    "T,chunks",
    [
        (1, (1, 5, 64)),
        (2, (1, 3)),
        (15, (5, 16)),
        (16, (5, 16)),
        (17, (1, 5, 16, 64)),
        (63, (16, 64)),
        (65, (7, 64)),
        (129, (64, 200)),
        (300, (1, 16, 64, 301)),
    ],
)
def test_chunked_rule_equals_the_recurrence_float64(T, chunks):
    ins = _rule_inputs(2, 2, T, 6, 5, seed=T)
    ref = _values_and_grads(recurrent_gated_delta_rule, ins)
    for C in chunks:
        got = _values_and_grads(chunk_gated_delta_rule, ins, chunk_size=C)
        for name, a, b in zip(
            ["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dS0"], got, ref, strict=True
        ):
            assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item()), (C, name)


def _reference_rule(fn, ins, **kw):
    """transformers' rule in its (B, T, H, .) layout; it scales q and normalises inside."""
    q, k, v, decay, beta, S0 = ins
    dk = q.shape[-1]
    o, S = fn(
        *(t.transpose(1, 2) for t in (q * dk**0.5, k, v, decay, beta)),
        initial_state=S0, output_final_state=True, **kw,
    )  # fmt: skip
    return o.transpose(1, 2), S


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("which", ["chunk", "recurrent"])
def test_rule_equals_transformers_rule(dtype, tol, which):
    ins = _rule_inputs(2, 3, 41, 8, 6, dtype=dtype, seed=1)
    if which == "chunk":
        fn, kw = olmo.torch_chunk_gated_delta_rule, dict(chunk_size=16)
    else:
        fn, kw = olmo.torch_recurrent_gated_delta_rule, {}
    ours = _values_and_grads(chunk_gated_delta_rule, ins, chunk_size=16)
    with float64_kept():
        theirs = _values_and_grads(lambda *a, initial_state, **k: _reference_rule(
            fn, [*a, initial_state], **kw), ins)  # fmt: skip
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == dtype and b.dtype == dtype
        assert (a - b).abs().max() <= tol


# ---- the layer vs OlmoHybridGatedDeltaNet ---------------------------------------------------
def _cfg(**kw):
    base = dict(vocab_size=64, d_model=32, n_heads=2, n_layers=2, gdn_chunk_size=8, mlp="swiglu")
    return preset_config("gdn", "nano", **(base | kw))


def _olmo_config(cfg):
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return FORMS_BY_NAME["olmo_hybrid"].config(cfg.replace(gdn_attention_every=2), common)


def _layer_pair(dtype, seed=0, **kw):
    """Our layer-0 mixer and OLMo-hybrid's GatedDeltaNet holding the same weights."""
    torch.manual_seed(seed)
    cfg = _cfg(**kw)
    model = build_model(cfg).to(dtype)
    with torch.no_grad():  # away from the init's special values (norm weights of 1, ...)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = model.blocks[0].mixer
    theirs = olmo.OlmoHybridGatedDeltaNet(_olmo_config(cfg), 0).to(dtype)
    pre = "model.layers.0.linear_attn."
    sd = hf_state_dict(cfg, model.state_dict(), "olmo_hybrid")
    theirs.load_state_dict({k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)})
    return ours, theirs


def _layer_outputs(layer, x):
    y = layer(x)
    gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    grads = torch.autograd.grad((y * gy).sum(), [x, *layer.parameters()])
    return y, dict(zip(["x"] + [n for n, _ in layer.named_parameters()], grads, strict=True))


def _their_name(ours_name: str) -> str:
    return {"in_proj.weight": "*_proj", "out_proj.weight": "o_proj.weight"}.get(
        ours_name, ours_name
    )


def _compare_layers(ours, theirs, x):
    y1, g1 = _layer_outputs(ours, x)
    with float64_kept():
        y2, g2 = _layer_outputs(theirs, x)
    diffs = {"y": (y1 - y2).abs().max().item(), "x": (g1["x"] - g2["x"]).abs().max().item()}
    # in_proj's gradient is OLMo's q/k/v/g/a/b_proj gradients stacked in that order
    stacked = torch.cat([g2[f"{n}_proj.weight"] for n in "qkvgab"])
    diffs["in_proj.weight"] = (g1["in_proj.weight"] - stacked).abs().max().item()
    for name in ("conv1d.weight", "A_log", "dt_bias", "o_norm.weight", "out_proj.weight"):
        diffs[name] = (g1[name] - g2[_their_name(name)]).abs().max().item()
    assert set(diffs) - {"y", "x"} == {n for n, _ in ours.named_parameters()}
    return diffs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("T", [1, 21, 40])  # one token, ragged chunks, a multiple of 8
def test_layer_equals_olmo_hybrid_gated_deltanet(dtype, tol, T):
    ours, theirs = _layer_pair(dtype)
    x = torch.randn(2, T, 32, dtype=dtype, generator=torch.Generator().manual_seed(3))
    diffs = _compare_layers(ours, theirs, x.requires_grad_(True))
    assert max(diffs.values()) <= tol, diffs


@pytest.mark.parametrize(
    "piece",
    ["beta flipped", "decay sign", "decay scaled", "key sign", "gate sign", "conv tap"],
)
def test_a_perturbed_piece_fails_the_comparison(piece):
    """Each piece matters: perturbing one on the reference side breaks float64 equality."""
    ours, theirs = _layer_pair(torch.float64)
    with torch.no_grad():
        if piece == "beta flipped":  # sigmoid(-b) = 1 - beta
            theirs.b_proj.weight.neg_()
        elif piece == "decay sign":
            theirs.dt_bias.neg_()
        elif piece == "decay scaled":
            theirs.A_log.add_(0.5)
        elif piece == "key sign":  # l2norm(-k): the delta rule's k k^T is even in k, k v^T not
            theirs.k_proj.weight.neg_()
        elif piece == "gate sign":
            theirs.g_proj.weight.neg_()
        else:
            theirs.conv1d.weight[:, 0, 0].mul_(1.5)
    x = torch.randn(2, 21, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    diffs = _compare_layers(ours, theirs, x.requires_grad_(True))
    assert diffs["y"] > 1e-4, diffs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_whole_model_equals_olmo_hybrid_for_causal_lm(dtype, tol):
    """gdn with an attention layer every 2nd layer == OlmoHybridForCausalLM, logits and the
    cached decode of both."""
    from archlab.export.hf import build_hf_model

    torch.manual_seed(0)
    cfg = _cfg(n_layers=4, gdn_attention_every=2)
    model = build_model(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = build_hf_model(model, "olmo_hybrid", 0)
    idx = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), float64_kept():  # both: archlab's RoPE also computes in float32
        theirs = hf(idx).logits
        ours = model(idx)
    with torch.no_grad():
        cache = model.init_cache()
        steps = torch.cat([model(idx[:, t : t + 1], cache=cache) for t in range(29)], 1)
    assert theirs.dtype == dtype
    assert (ours - theirs).abs().max() <= tol * max(1.0, theirs.abs().max().item())
    assert (steps - ours).abs().max() <= 1e3 * tol


def test_prefill_then_decode_equals_the_full_forward_float64():
    """Chunked prefill (from a carried state) and recurrent steps continue the same sequence."""
    torch.manual_seed(0)
    model = build_model(_cfg(gdn_chunk_size=4)).double().eval()
    idx = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(idx)
        cache = model.init_cache()
        parts = [
            model(idx[:, s:e], cache=cache) for s, e in ((0, 11), (11, 12), (12, 25), (25, 30))
        ]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10


# ---- shapes and flags --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--conv-size", "1"], "--conv-size: must be >= 2"),
        (["--n-heads", "5"], "--n-heads: the key width"),
        (["--gdn-attention-every", "9"], "--gdn-attention-every 9: larger than --n-layers"),
        (["--gdn-attention-every", "2", "--n-heads", "3", "--gdn-head-dim", "8"], "--n-heads"),
        (["--bias"], "--bias: not used by --architecture gdn"),
        (["--state-size", "8"], "--state-size: not used by --architecture gdn"),
    ],
)
def test_bad_gdn_shapes_exit_2_with_one_line(argv, needle, capsys):
    assert main(["summary", "--architecture", "gdn", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "flag", ["--gdn-chunk-size", "--gdn-head-dim", "--gdn-expand-v", "--gdn-attention-every"]
)
def test_gdn_flags_are_refused_on_other_architectures(flag, capsys):
    assert main(["summary", "--architecture", "mamba", flag, "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag}: not used by --architecture mamba" in err and "applies to gdn" in err


def test_summary_lines_and_alias(capsys):
    assert main(["summary", "--architecture", "gated-deltanet", "--gdn-attention-every", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("Architecture Type: Gated DeltaNet", "GDN Heads: 4", "Key Head Dim: 24",
                 "Value Head Dim: 48", "Chunk Size: 32", "Full Attention Every: 2",
                 "1: GatedDeltaNetBlock", "2: AttentionBlock"):  # fmt: skip
        assert line in out, out

"""Cross-architecture model contracts: causality, cached decoding, gradients, counts, overfit."""

from __future__ import annotations

import importlib

import pytest
import torch

from archlab import ConfigError, build_model, count_parameters, preset_config
from archlab.cli import main

ARCHS = ["dense", "hypermixer", "mamba", "moe", "hybrid", "gdn", "mamba2"]
_MODULES = {
    "dense": "dense",
    "hypermixer": "hypermixer",
    "mamba": "mamba",
    "moe": "moe",
    "hybrid": "hybrid",
    "gdn": "gdn",
    "mamba2": "mamba2",
}


def _require(arch: str) -> None:
    try:
        importlib.import_module(f"archlab.models.{_MODULES[arch]}")
    except ModuleNotFoundError:
        pytest.skip(f"{arch} block not built yet")


def small_config(arch: str, **kw):
    """A tiny but complete config of each architecture (windows/chunks smaller than T)."""
    base = dict(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=64,
        num_experts=4,
        top_k=2,
        local_window=5,
        state_size=8,
        ssd_chunk_size=5,
    )
    base.update(kw)
    return preset_config(arch, "nano", **base)


CASES = [(a, {}) for a in ARCHS] + [
    ("dense", {"use_rope": True, "use_rmsnorm": True}),
    ("moe", {"use_rope": True}),
    # SwiGLU feed-forwards: Llama form, Mixtral form, and the hybrid's / hypermixer's MLPs
    ("dense", {"mlp": "swiglu", "use_rope": True, "use_rmsnorm": True}),
    ("moe", {"mlp": "swiglu", "use_rope": True, "use_rmsnorm": True}),
    ("hybrid", {"mlp": "swiglu"}),
    ("hypermixer", {"mlp": "swiglu"}),
    # gdn: chunks of 5 (T = 16 is ragged), OLMo-hybrid's layout with an attention layer
    ("gdn", {"gdn_chunk_size": 5}),
    ("gdn", {"mlp": "swiglu", "gdn_attention_every": 2, "gdn_chunk_size": 3}),
]
RUSTGPT = ["dense", "hypermixer"]


def _ids(case):
    arch, kw = case
    return arch + "".join(f"-{k}" for k in kw)


def _build(arch: str, kw: dict, preset: str | None = None, seed: int = 0):
    _require(arch)
    torch.manual_seed(seed)
    if preset:
        cfg = preset_config(arch, preset=preset, vocab_size=53)
    else:
        cfg = small_config(arch, **kw)
    return away_from_zero_init(build_model(cfg).eval())


def away_from_zero_init(model):
    """HyperMixer's mixer starts at exactly 0 (zero output-norm gain): give that gain random
    values, as after training, so causality, decoding and gradients exercise the mixer too."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for mod in model.modules():
            norm = getattr(mod, "out_norm", None)
            if norm is not None and hasattr(mod, "hyper_w1"):
                norm.weight.copy_(1.0 + 0.2 * torch.randn(norm.weight.shape, generator=g))
    return model


def _all_models():
    for arch, kw in CASES:
        yield pytest.param(arch, kw, None, id=_ids((arch, kw)))
    for arch in RUSTGPT:
        yield pytest.param(arch, {}, "rustgpt", id=f"rustgpt-{arch}")


@pytest.mark.parametrize("arch,kw,preset", list(_all_models()))
def test_causality(arch, kw, preset):
    """Changing token t+1 never changes logits at positions <= t."""
    model = _build(arch, kw, preset)
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, 24), generator=g)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 11, 22):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.randint(0, V - 1, (1,))) % V
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-6)


@pytest.mark.parametrize("arch,kw,preset", list(_all_models()))
def test_cached_decoding_equals_full_forward(arch, kw, preset):
    model = _build(arch, kw, preset)
    idx = torch.randint(
        0, model.cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        full = model(idx)
        # token by token
        cache = model.init_cache()
        steps = [model(idx[:, t : t + 1], cache=cache) for t in range(idx.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
        # mixed chunk sizes: prefill 9, then 1, 4, 1, 8
        cache = model.init_cache()
        chunks, start = [], 0
        for n in (9, 1, 4, 1, 8):
            chunks.append(model(idx[:, start : start + n], cache=cache))
            start += n
        assert cache.pos == idx.shape[1]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,kw,preset", list(_all_models()))
def test_every_parameter_gets_finite_nonzero_gradient(arch, kw, preset):
    model = _build(arch, kw, preset).train()
    V = model.cfg.vocab_size
    idx = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(3))
    logits, aux = model(idx, return_aux=True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    if "aux_loss" in aux:
        loss = loss + aux["aux_loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_same_gradients(arch):
    model = _build(arch, {}).train()
    idx = torch.randint(
        0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4)
    )

    def grads():
        model.zero_grad()
        logits, aux = model(idx, return_aux=True)
        loss = logits.float().logsumexp(-1).mean() + aux.get("aux_loss", 0.0)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rustgpt_exact_parameter_counts():
    assert count_parameters(preset_config("dense", preset="rustgpt", vocab_size=533)) == (
        493_973,
        493_973,
    )
    _require("hypermixer")
    assert count_parameters(preset_config("hypermixer", preset="rustgpt", vocab_size=533))[0] == (
        1_386_917
    )


def test_dense_parameter_count_formula():
    cfg = small_config("dense", tie_weights=False, bias=False)
    d, f, L, V, T = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size, cfg.max_seq_len
    per_block = 4 * d * d + 2 * d * f + 2 * (2 * d)  # attention, MLP, two LayerNorms
    expected = V * d + T * d + L * per_block + 2 * d + d * V
    assert build_model(cfg).num_parameters() == expected


def test_seed_sizes_match_the_seed_within_5_percent():
    targets = {"tiny": 137e6, "medium": 371e6, "large": 1.1e9}
    for size, target in targets.items():
        total, _ = count_parameters(preset_config("dense", size))
        assert abs(total - target) / target < 0.05, (size, total)


def test_nano_and_micro_sizes():
    cfg = preset_config("dense", "nano")
    total, _ = count_parameters(cfg)
    embeddings = cfg.vocab_size * cfg.d_model + (cfg.max_seq_len * cfg.d_model)
    assert total - embeddings < 1_000_000
    total_micro, _ = count_parameters(preset_config("dense", "micro"))
    assert 5e6 <= total_micro <= 10e6


@pytest.mark.parametrize("size", ["nano", "micro", "tiny", "medium", "large"])
@pytest.mark.parametrize("arch", ["hypermixer", "mamba", "moe", "hybrid", "gdn", "mamba2"])
def test_every_architecture_within_15_percent_of_dense(arch, size):
    _require(arch)
    dense_total, _ = count_parameters(preset_config("dense", size))
    total, active = count_parameters(preset_config(arch, size))
    compared = active if arch == "moe" else total
    assert abs(compared - dense_total) / dense_total < 0.15, (arch, size, compared, dense_total)


def test_large_counts_do_not_allocate():
    model = build_model(preset_config("dense", "large"), device="meta")
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--architecture", "transformerz"], "--architecture"),
        (["--model-size", "huge"], "--model-size"),
        (["--d-model", "0"], "--d-model"),
        (["--n-heads", "3"], "--n-heads"),
        (["--architecture", "hybrid", "--hybrid-local-window", "0"], "--hybrid-local-window"),
        (["--architecture", "moe", "--num-experts", "2", "--expert-capacity", "3"], "top_k"),
    ],
)
def test_bad_model_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["summary", *argv]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_sequence_longer_than_learned_positions_is_a_clear_error():
    model = build_model(small_config("dense", max_seq_len=8))
    with pytest.raises(ConfigError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_summary_matches_seed_format(capsys):
    _require("hypermixer")
    assert main(["summary", "--architecture", "hypermixer", "--preset", "rustgpt"]) == 0
    out = capsys.readouterr().out
    expected_head = """=== Model Architecture Summary ===
Architecture Type: HyperMixer
Embedding Dimension: 128
Hidden Dimension: 256
Number of Layers: 3
Max Sequence Length: 80
Hypernetwork Hidden Dim: 32
"""
    assert out.startswith(expected_head)
    assert (
        """Layer Stack:
  0: Embeddings
  1: HyperMixerBlock
  2: HyperMixerBlock
  3: HyperMixerBlock
  4: OutputProjection
"""
        in out
    )
    assert "Total Parameters: 1,386,917\n==================================" in out


def test_summary_json_breakdown_sums_to_total(capsys):
    import json

    assert main(["summary", "--architecture", "dense", "--model-size", "micro", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert sum(d["parameter_breakdown"].values()) == d["total_parameters"]


@pytest.mark.parametrize("arch", ARCHS)
def test_nano_overfits_one_batch(arch):
    """Each architecture at nano size memorises one fixed batch (loss < 0.5)."""
    _require(arch)
    torch.manual_seed(0)
    cfg = preset_config(arch, "nano", vocab_size=256)
    model = build_model(cfg).train()
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("inf"))
    for _ in range(300):
        logits, aux = model(idx[:, :-1], return_aux=True)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + aux.get("aux_loss", 0.0)).backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5

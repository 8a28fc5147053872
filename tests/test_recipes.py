"""Recipes (--recipe modern|classic): checked on the built models, not on the flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archlab import build_model, preset_config
from archlab.cli import main
from archlab.config import ConfigError
from archlab.models import registry
from archlab.models.attention import CausalSelfAttention
from archlab.models.layers import MLP, RMSNorm, RotaryEmbedding, SwiGLU
from archlab.recipes import apply_recipe, recipe_label
from archlab.train.model_spec import ModelSpec
from archlab.train.setup import fit_to_seq_len

NAMES = list(registry.SPECS)


def _built(arch: str, recipe: str, **explicit) -> tuple[nn.Module, object]:
    cfg = preset_config(arch, "nano", vocab_size=97, **apply_recipe(recipe, arch, explicit))
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def _rope_calls(model: nn.Module, monkeypatch) -> int:
    calls = []
    real = RotaryEmbedding.apply

    def counting(x, cos, sin):
        calls.append(x.shape)
        return real(x, cos, sin)

    monkeypatch.setattr(RotaryEmbedding, "apply", staticmethod(counting))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 16)))
    return len(calls)


@pytest.mark.parametrize("arch", NAMES)
def test_modern_recipe_on_the_built_model(arch, monkeypatch):
    model, cfg = _built(arch, "modern")
    mods = list(model.modules())
    attention = [m for m in mods if isinstance(m, CausalSelfAttention)]
    # every attention layer rotates q and k: two rotations per attention layer in a forward
    assert all(m.rope is not None for m in attention)
    assert _rope_calls(model, monkeypatch) == 2 * len(attention)
    assert model.pos_emb is None  # no learned position table anywhere
    # every norm is RMSNorm
    assert not any(isinstance(m, nn.LayerNorm) for m in mods)
    assert any(isinstance(m, RMSNorm) for m in mods)
    # every MLP is SwiGLU (dense, moe experts, hybrid, hypermixer's channel MLP), no biases
    assert not any(isinstance(m, MLP) for m in mods)
    swiglus = [m for m in mods if isinstance(m, SwiGLU)]
    assert bool(swiglus) == registry.get(arch).has_mlp
    for m in [*swiglus, *attention]:
        assert all(lin.bias is None for lin in m.modules() if isinstance(lin, nn.Linear))
    assert recipe_label(cfg, "modern") == "modern"


def test_modern_counts_on_dense_moe_and_hybrid():
    counts = {}
    for arch in ("dense", "moe", "hybrid", "hypermixer"):
        model, cfg = _built(arch, "modern")
        counts[arch] = sum(isinstance(m, SwiGLU) for m in model.modules())
    assert counts["dense"] == 4  # one per layer
    assert counts["moe"] == 4 * 8  # every expert of every layer
    assert counts["hybrid"] == 4  # Mamba and attention layers alike
    assert counts["hypermixer"] == preset_config("hypermixer", "nano").n_layers


def test_classic_recipe_is_the_seed_default():
    model, cfg = _built("dense", "classic")
    assert model.pos_emb is not None
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert any(isinstance(m, MLP) for m in model.modules())
    assert all(m.rope is None for m in model.modules() if isinstance(m, CausalSelfAttention))
    assert cfg == preset_config("dense", "nano", vocab_size=97)  # = no recipe at all
    assert recipe_label(cfg, "classic") == "classic"


def test_explicit_flags_win_over_the_recipe_and_are_recorded():
    _, cfg = _built("dense", "modern", use_rope=False, mlp="gelu")
    assert not cfg.use_rope and cfg.mlp == "gelu" and cfg.use_rmsnorm
    assert recipe_label(cfg, "modern") == "modern + --no-use-rope --mlp gelu"
    spec = ModelSpec(architecture="moe", model_size="nano", recipe="modern")
    built = spec.build(97)
    assert built.mlp == "swiglu" and built.use_rope and built.use_rmsnorm
    assert ModelSpec(architecture="moe").build(97).mlp == "gelu"  # train's default: classic


def test_modern_with_the_rustgpt_preset_is_refused():
    with pytest.raises(ConfigError, match="--recipe modern: --preset rustgpt"):
        ModelSpec(architecture="dense", preset="rustgpt", recipe="modern").build(97)


def test_unknown_recipe_is_one_line_exit_2(capsys, tmp_path):
    assert main(["train", "--recipe", "fancy", "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "archlab train: error: --recipe: unknown recipe 'fancy' (allowed: modern, classic)"
    ]
    assert not (tmp_path / "r").exists()
    assert main(["compare", "--recipe", "x", "--out-dir", str(tmp_path / "c")]) == 2
    assert "--recipe: unknown recipe 'x'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_hybrid_window_is_a_window(capsys):
    cfg = preset_config("hybrid", "nano", vocab_size=97)
    assert cfg.local_window == cfg.max_seq_len // 2 == 128  # the summary's window at nano
    assert main(["summary", "--architecture", "hybrid", "--model-size", "nano"]) == 0
    out = capsys.readouterr().out
    assert "Local Attention Window: 128" in out
    # the trainer fits the default to the training length (compare trains at 128)
    fitted, warning = fit_to_seq_len(cfg, 128, frozenset(), fresh=True)
    assert fitted.local_window == 64 and warning is None
    kept, warning = fit_to_seq_len(cfg, 512, frozenset(), fresh=True)
    assert kept.local_window == 128 and warning is None
    wide = cfg.replace(local_window=256)
    same, warning = fit_to_seq_len(wide, 128, frozenset({"local_window"}), fresh=True)
    assert same.local_window == 256
    assert warning == (
        "warning: --hybrid-local-window 256 >= the training sequence length 128: the hybrid's "
        "sliding-window layers are full causal attention"
    )
    resumed, _ = fit_to_seq_len(cfg, 128, frozenset(), fresh=False)
    assert resumed.local_window == 128  # a checkpoint's model is never changed

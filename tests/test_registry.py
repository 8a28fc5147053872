"""The architecture registry: every registered architecture builds, summarises, round-trips
through config.json, and the skeleton names none of them (a new one is one module + one line;
the benches, plots and export read what they need from its spec)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import archlab.models as models_pkg
from archlab import ModelConfig, build_model, preset_config
from archlab.bench.common.plots import PALETTE, color_of
from archlab.bench.lengths import report as scaling_report
from archlab.bench.recall.worker import state_elements
from archlab.config import ConfigError, canonical_architecture, check_fields_apply
from archlab.export.hf import NotExportable, hf_form
from archlab.models import registry
from archlab.models.layers import make_mlp, make_norm
from archlab.models.spec import ArchitectureSpec, SummaryField
from archlab.train.checkpoint import load_weights, read_model_config, save_checkpoint

NAMES = list(registry.SPECS)
SRC = Path(models_pkg.__file__).parent


def test_registry_lists_the_architectures_in_cli_order():
    assert NAMES == ["dense", "hypermixer", "mamba", "moe", "hybrid", "gdn", "mamba2"]
    assert registry.ALIASES == {
        "transformer": "dense",
        "ssm": "mamba",
        "gated-deltanet": "gdn",
        "ssd": "mamba2",
    }
    for alias, name in registry.ALIASES.items():
        assert canonical_architecture(alias.upper()) == name


@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_builds_at_nano_summarises_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    cfg = preset_config(name, "nano", vocab_size=97)
    model = build_model(cfg).eval()
    spec = registry.get(name)
    assert model.spec is spec
    summary = model.summary_dict()
    assert summary["architecture"] == name
    assert summary["architecture_type"] == spec.display_name
    assert summary["num_layers"] == cfg.n_layers == len(model.blocks)
    assert summary["total_parameters"] == sum(p.numel() for p in model.parameters())
    for f in spec.summary_fields:
        assert summary.get(f.key) == (f.value(cfg) if f.when is None or f.when(cfg) else None)
    text = model.summary()
    assert f"Architecture Type: {spec.display_name}" in text
    assert f"Total Parameters: {summary['total_parameters']:,}" in text
    # config.json round trip: same config, same weights load strictly, same logits
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    ckpt = save_checkpoint(tmp_path / "run", 0, model, cfg, tok, {"step": 0})
    on_disk = json.loads((ckpt / "config.json").read_text())
    assert on_disk["architecture"] == name
    cfg2 = read_model_config(ckpt)
    assert cfg2 == cfg
    model2 = build_model(cfg2).eval()
    load_weights(model2, ckpt)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), model2(idx))
    assert model2.summary() == text


def test_skeleton_and_builder_name_no_architecture():
    """lm.py, models/__init__.py, layers.py and spec.py hold no architecture name or label."""
    names = set(NAMES) | set(registry.ALIASES)
    names |= {s.display_name for s in registry.SPECS.values()}
    for fname in ("lm.py", "__init__.py", "layers.py", "spec.py"):
        tree = ast.parse((SRC / fname).read_text())
        literals = {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        assert not literals & names, (fname, literals & names)


class ToyBlock(nn.Module):
    """x + MLP(N(x)): no token mixing at all (a test architecture, not shipped)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, x, state=None, pos=0):
        return x + self.ffn(self.norm(x)), {}


TOY = ArchitectureSpec(
    name="toy",
    aliases=("bag",),
    display_name="ToyMLP",
    block=ToyBlock,
    fields=("d_ff", "mlp", "bias"),
    norm="rmsnorm",
    size_override=lambda base: dict(n_layers=2 * base["n_layers"]),
    summary_fields=(SummaryField("toy_width", "Toy Width", lambda c: c.d_ff),),
    state_elements=lambda c, layer_idx, seq_len: 0,  # no token mixing: no decode state
    linear_in_length=True,
)


def test_one_spec_is_all_a_new_architecture_needs(monkeypatch):
    monkeypatch.setitem(registry.SPECS, "toy", TOY)
    monkeypatch.setitem(registry.ALIASES, "bag", "toy")
    cfg = preset_config("bag", "nano", vocab_size=50)
    assert cfg.architecture == "toy" and cfg.n_layers == 8  # alias + size override
    model = build_model(cfg)
    assert all(isinstance(b, ToyBlock) for b in model.blocks)
    text = model.summary()
    assert "Architecture Type: ToyMLP" in text and "Toy Width: 512" in text
    assert "Normalization: RMSNorm" in text and "Feed-Forward: GELU" in text
    # its flags are accepted, others refused naming where they apply
    check_fields_apply("toy", None, ["d_ff"])
    with pytest.raises(ConfigError, match="--n-heads: not used by --architecture toy"):
        check_fields_apply("toy", None, ["n_heads"])
    with pytest.raises(ConfigError, match="only defined for --architecture dense or hypermixer"):
        ModelConfig(architecture="toy", preset="rustgpt", bias=True).validate()
    # what benches and exports read from the spec, with no table to edit
    assert "Positions: learned" in text  # the skeleton's table, nothing declared
    assert state_elements(cfg, 16) == {"state_elements": 0, "state_per_layer": 0}
    assert "toy" in scaling_report.challengers()
    assert color_of("toy", 0) == PALETTE[len(NAMES)]  # its registry place, in every figure
    with pytest.raises(NotExportable, match="--architecture toy: ToyMLP has no transformers"):
        hf_form(cfg)


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_positions_line_says_what_the_built_model_uses(name, use_rope):
    """A learned table iff the line says learned; rotary attention iff it says rope."""
    cfg = preset_config(name, "nano", vocab_size=97, use_rope=use_rope)
    model = build_model(cfg)
    line = model.summary_dict()["positions"]
    rotary = any(getattr(m, "rope", None) is not None for m in model.modules())
    assert line.startswith("learned") == (model.pos_emb is not None), line
    assert ("rope" in line) == rotary, line


def test_declared_state_per_layer_matches_each_layers_decode_cache():
    """state_elements(cfg, i, T) is what layer i's cache holds after T tokens (the parts the
    declaration counts: keys and values, the SSM state h, HyperMixer's running matrix S)."""
    counted = {"k", "v", "ssm", "S"}
    for name in NAMES:
        cfg = preset_config(name, "nano", vocab_size=97, d_model=32, n_heads=2, local_window=8)
        model = build_model(cfg).eval()
        cache = model.init_cache()
        with torch.no_grad():
            model(torch.randint(0, 97, (1, 20)), cache=cache)
        per_layer = registry.get(name).state_per_layer(cfg, 20)
        held = [sum(t.numel() for k, t in layer.items() if k in counted) for layer in cache.layers]
        assert per_layer == held, name

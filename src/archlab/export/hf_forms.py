"""The transformers forms archlab exports to, as data: one :class:`HFForm` per class.

A form says which archlab configuration it is (the architecture and the config values that
select it, plus any further check), the transformers config describing it exactly, and how
every transformers weight is obtained from archlab's: rules for the whole-model names and
for the names inside one layer, applied by one mapping loop (:func:`hf_state_dict`).
``hf.py`` picks the form and writes the folder; the docstring there says why each form is
the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from .hf_configs import (
    _gpt2_config,
    _llama_config,
    _mamba2_config,
    _mamba_config,
    _mixtral_check,
    _mixtral_config,
    _olmo_hybrid_check,
    _olmo_hybrid_config,
)

Get = Callable[[str], Tensor | None]  # archlab name (model- or layer-relative) -> tensor
Source = Callable[[Get, ModelConfig], Tensor | None]  # None: this weight does not exist


# ---- how one transformers weight is made from archlab's ----------------------------------
def same(name: str) -> Source:
    return lambda get, cfg: get(name)


def first(*names: str) -> Source:
    """The first of ``names`` that exists (an untied head, else the tied embedding)."""

    def source(get: Get, cfg: ModelConfig) -> Tensor | None:
        return next((t for t in map(get, names) if t is not None), None)

    return source


def transposed(name: str) -> Source:
    """nn.Linear stores (out, in); GPT-2's Conv1D wants (in, out)."""

    def source(get: Get, cfg: ModelConfig) -> Tensor | None:
        t = get(name)
        return None if t is None else t.t().contiguous()

    return source


def bias_or_zeros(linear: str) -> Source:
    """The bias of ``linear``, or zeros where it has none (the same function)."""

    def source(get: Get, cfg: ModelConfig) -> Tensor | None:
        bias, weight = get(linear + ".bias"), get(linear + ".weight")
        if bias is not None or weight is None:
            return bias
        return weight.new_zeros(weight.shape[0])

    return source


def part(name: str, index: int, parts: int) -> Source:
    """Rows block ``index`` of ``parts``: the fused qkv projection is [q; k; v], archlab's
    SwiGLU ``fc`` is [gate; up] (d -> 2h)."""

    def source(get: Get, cfg: ModelConfig) -> Tensor | None:
        t = get(name)
        return None if t is None else t.chunk(parts, dim=0)[index]

    return source


def per_expert(name: str) -> Source:
    """``name`` (with ``{e}``) of every expert stacked: (E, ...). archlab's expert ``fc`` is
    already [gate; up], the layout of transformers 5's fused ``gate_up_proj`` (E, 2F, D)."""

    def source(get: Get, cfg: ModelConfig) -> Tensor | None:
        ts = [get(name.format(e=e)) for e in range(cfg.num_experts)]
        return None if any(t is None for t in ts) else torch.stack(ts)  # type: ignore[arg-type]

    return source


def gdn_rows(name: str, index: int) -> Source:
    """Row block ``index`` of gdn's stacked ``in_proj`` [q; k; v; gate; a; b] (uneven sizes:
    the mixer's ``split_sizes``), OLMo-hybrid's q/k/v/g/a/b_proj."""

    def source(get: Get, cfg: ModelConfig) -> Tensor | None:
        from ..models.gdn import key_head_dim

        t = get(name)
        if t is None:
            return None
        H, dk = cfg.n_heads, key_head_dim(cfg)
        kd, vd = H * dk, H * dk * cfg.gdn_expand_v
        return t.split([kd, kd, vd, vd, H, H], dim=0)[index]

    return source


Rule = tuple[str, Source]  # (transformers name, how to make it)


@dataclass(frozen=True)
class HFForm:
    """One exportable form: what selects it, its transformers config, its weight mapping."""

    name: str  # "gpt2"
    hf_class: str  # "GPT2LMHeadModel"
    architecture: str  # the archlab architecture it exports
    title: str  # "GPT-2", in refusals
    requires: tuple[tuple[str, Any], ...]  # config values that select it
    flags: str  # the flags that give ``requires``, for refusals
    described: str  # its line in EXPORTABLE
    config: Callable[[ModelConfig, dict[str, Any]], Any]  # (cfg, common kwargs) -> config
    weights: tuple[Rule, ...]  # whole-model names (archlab names are model-level)
    layer_prefix: str  # transformers prefix of layer i, with "{i}"
    layer_weights: tuple[Rule, ...]  # names inside one layer (archlab's under blocks.{i}.)
    check: Callable[[ModelConfig], str | None] | None = None  # once selected: why not, or None

    def selects(self, cfg: ModelConfig) -> bool:
        return cfg.architecture == self.architecture and all(
            getattr(cfg, key) == value for key, value in self.requires
        )


def hf_state_dict(cfg: ModelConfig, sd: dict[str, Tensor], form: str | HFForm) -> dict[str, Tensor]:
    """archlab parameter names -> the transformers names of ``form`` (values may be views).

    A weight whose archlab source does not exist is left out; ``hf.build_hf_model`` checks
    the result against the transformers model's own names, so nothing is silently missing.
    """
    f = FORMS_BY_NAME[form] if isinstance(form, str) else form
    out: dict[str, Tensor] = {}

    def apply(rules: tuple[Rule, ...], get: Get, prefix: str) -> None:
        for theirs, source in rules:
            t = source(get, cfg)
            if t is not None:
                out[prefix + theirs] = t

    apply(f.weights, sd.get, "")
    for i in range(cfg.n_layers):
        apply(
            f.layer_weights,
            lambda name, i=i: sd.get(f"blocks.{i}.{name}"),
            f.layer_prefix.format(i=i),
        )
    return out


# ---- the weight mappings --------------------------------------------------------------------
HEAD: Rule = ("lm_head.weight", first("head.weight", "tok_emb.weight"))
_GPT2_LINEARS = (
    ("mixer.qkv", "attn.c_attn"),
    ("mixer.proj", "attn.c_proj"),
    ("ffn.fc", "mlp.c_fc"),
    ("ffn.proj", "mlp.c_proj"),
)
_LLAMA_ATTENTION: tuple[Rule, ...] = (
    ("input_layernorm.weight", same("norm1.weight")),
    ("post_attention_layernorm.weight", same("norm2.weight")),
    *(
        (f"self_attn.{n}_proj.{kind}", part(f"mixer.qkv.{kind}", j, 3))
        for kind in ("weight", "bias")
        for j, n in enumerate("qkv")
    ),
    ("self_attn.o_proj.weight", same("mixer.proj.weight")),
    ("self_attn.o_proj.bias", same("mixer.proj.bias")),
)
_LLAMA_MODEL: tuple[Rule, ...] = (
    ("model.embed_tokens.weight", same("tok_emb.weight")),
    ("model.norm.weight", same("norm_f.weight")),
    HEAD,
)
_MAMBA_MIXER = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
)
# gdn's layers (OLMo-hybrid): a GatedDeltaNet layer's pre-MLP norm and an attention layer's
# output norm are both OLMo's post_attention_layernorm; each layer has one of the two.
_OLMO_HYBRID_LAYER: tuple[Rule, ...] = (
    ("input_layernorm.weight", same("norm1.weight")),
    ("post_attention_layernorm.weight", first("norm2.weight", "attn_norm.weight")),
    ("post_feedforward_layernorm.weight", same("ffn_norm.weight")),
    *(
        (f"linear_attn.{n}_proj.weight", gdn_rows("mixer.in_proj.weight", j))
        for j, n in enumerate("qkvgab")
    ),
    *((f"linear_attn.{n}", same(f"mixer.{n}")) for n in ("conv1d.weight", "A_log", "dt_bias")),
    ("linear_attn.o_norm.weight", same("mixer.o_norm.weight")),
    ("linear_attn.o_proj.weight", same("mixer.out_proj.weight")),
    *((f"self_attn.{n}_proj.weight", part("mixer.qkv.weight", j, 3)) for j, n in enumerate("qkv")),
    ("self_attn.o_proj.weight", same("mixer.proj.weight")),
    ("self_attn.q_norm.weight", same("mixer.q_norm.weight")),
    ("self_attn.k_norm.weight", same("mixer.k_norm.weight")),
    *(
        (f"mlp.{n}.weight", part("ffn.fc.weight", j, 2))
        for j, n in enumerate(("gate_proj", "up_proj"))
    ),
    ("mlp.down_proj.weight", same("ffn.proj.weight")),
)
_MAMBA2_MIXER = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
)
_MAMBA_MODEL: tuple[Rule, ...] = (
    ("backbone.embeddings.weight", same("tok_emb.weight")),
    ("backbone.norm_f.weight", same("norm_f.weight")),
    HEAD,
)

FORMS_TABLE: tuple[HFForm, ...] = (
    HFForm(
        name="gpt2",
        hf_class="GPT2LMHeadModel",
        architecture="dense",
        title="GPT-2",
        requires=(("use_rope", False), ("use_rmsnorm", False), ("mlp", "gelu")),
        flags="--no-use-rope --no-use-rmsnorm --mlp gelu",
        described="dense with learned positions + LayerNorm + GELU",
        config=_gpt2_config,
        weights=(
            ("transformer.wte.weight", same("tok_emb.weight")),
            ("transformer.wpe.weight", same("pos_emb.weight")),
            ("transformer.ln_f.weight", same("norm_f.weight")),
            ("transformer.ln_f.bias", same("norm_f.bias")),
            HEAD,
        ),
        layer_prefix="transformer.h.{i}.",
        layer_weights=(
            *(
                (f"{theirs}.{kind}", same(f"{ours}.{kind}"))
                for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"))
                for kind in ("weight", "bias")
            ),
            *((f"{theirs}.weight", transposed(f"{ours}.weight")) for ours, theirs in _GPT2_LINEARS),
            *((f"{theirs}.bias", bias_or_zeros(ours)) for ours, theirs in _GPT2_LINEARS),
        ),
    ),
    HFForm(
        name="llama",
        hf_class="LlamaForCausalLM",
        architecture="dense",
        title="Llama",
        requires=(("use_rope", True), ("use_rmsnorm", True), ("mlp", "swiglu")),
        flags="--use-rope --use-rmsnorm --mlp swiglu",
        described="dense with --use-rope --use-rmsnorm --mlp swiglu",
        config=_llama_config,
        weights=_LLAMA_MODEL,
        layer_prefix="model.layers.{i}.",
        layer_weights=(
            *_LLAMA_ATTENTION,
            *(
                (f"mlp.{name}.{kind}", part(f"ffn.fc.{kind}", j, 2))
                for kind in ("weight", "bias")
                for j, name in enumerate(("gate_proj", "up_proj"))
            ),
            ("mlp.down_proj.weight", same("ffn.proj.weight")),
            ("mlp.down_proj.bias", same("ffn.proj.bias")),
        ),
    ),
    HFForm(
        name="mixtral",
        hf_class="MixtralForCausalLM",
        architecture="moe",
        title="Mixtral",
        requires=(("use_rope", True), ("use_rmsnorm", True), ("mlp", "swiglu")),
        flags="--use-rope --use-rmsnorm --mlp swiglu",
        described="moe with --use-rope --use-rmsnorm --mlp swiglu, top-k >= 2, no biases",
        config=_mixtral_config,
        weights=_LLAMA_MODEL,
        layer_prefix="model.layers.{i}.",
        layer_weights=(
            *_LLAMA_ATTENTION,
            ("mlp.gate.weight", same("ffn.router.weight")),
            ("mlp.experts.gate_up_proj", per_expert("ffn.experts.{e}.fc.weight")),
            ("mlp.experts.down_proj", per_expert("ffn.experts.{e}.proj.weight")),
        ),
        check=_mixtral_check,
    ),
    HFForm(
        name="mamba",
        hf_class="MambaForCausalLM",
        architecture="mamba",
        title="Mamba",
        requires=(),
        flags="",
        described="mamba",
        config=_mamba_config,
        weights=_MAMBA_MODEL,
        layer_prefix="backbone.layers.{i}.",
        layer_weights=(
            ("norm.weight", same("norm1.weight")),
            *((f"mixer.{name}", same(f"mixer.{name}")) for name in _MAMBA_MIXER),
        ),
    ),
    HFForm(
        name="olmo_hybrid",
        hf_class="OlmoHybridForCausalLM",
        architecture="gdn",
        title="OLMo-hybrid",
        requires=(("mlp", "swiglu"),),
        flags="--mlp swiglu --gdn-attention-every K",
        described="gdn with --mlp swiglu --gdn-attention-every K",
        config=_olmo_hybrid_config,
        weights=_LLAMA_MODEL,
        layer_prefix="model.layers.{i}.",
        layer_weights=_OLMO_HYBRID_LAYER,
        check=_olmo_hybrid_check,
    ),
    HFForm(
        name="mamba2",
        hf_class="Mamba2ForCausalLM",
        architecture="mamba2",
        title="Mamba-2",
        requires=(),
        flags="",
        described="mamba2",
        config=_mamba2_config,
        weights=_MAMBA_MODEL,
        layer_prefix="backbone.layers.{i}.",
        layer_weights=(
            ("norm.weight", same("norm1.weight")),
            *((f"mixer.{name}", same(f"mixer.{name}")) for name in _MAMBA2_MIXER),
        ),
    ),
)
FORMS_BY_NAME = {f.name: f for f in FORMS_TABLE}
FORMS = {f.name: f.hf_class for f in FORMS_TABLE}
EXPORTABLE = "exportable forms: " + "; ".join(f"{f.described} ({f.hf_class})" for f in FORMS_TABLE)

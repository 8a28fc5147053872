"""Export a checkpoint to a Hugging Face ``transformers`` folder, where an exact counterpart exists.

Only forms whose transformers class computes the same function are exported; everything else
is refused with the reason (:class:`NotExportable`). The mapping per form:

* ``gpt2`` -> ``GPT2LMHeadModel``: dense with learned positions, LayerNorm and the GELU MLP.
  GPT-2 stores its linears as ``Conv1D`` with (in, out) weights, so every weight is
  transposed. archlab's GELU is the tanh approximation, exported as ``gelu_pytorch_tanh`` (the
  same ``F.gelu(approximate="tanh")`` call). GPT-2 always has biases: a checkpoint trained
  without them is exported with zero biases, which is the same function.
* ``llama`` -> ``LlamaForCausalLM``: dense with RoPE, RMSNorm and SwiGLU (the fused q/k/v
  projection is split into q_proj/k_proj/v_proj; biases map to ``attention_bias``/``mlp_bias``).
* ``mixtral`` -> ``MixtralForCausalLM``: the Llama form with a top-k (k >= 2) mixture of
  SwiGLU experts; Mixtral renormalises the top-k router probabilities as archlab does.
* ``mamba`` -> ``MambaForCausalLM``: the module names of state-spaces/mamba are archlab's.

The tokenizer is written as a ``tokenizers`` file wrapped by ``PreTrainedTokenizerFast``
(byte-level BPE as is; char and word vocabularies become WordLevel models with pre-tokenizers
that split as archlab does), so ``AutoTokenizer.from_pretrained`` gives archlab's token ids.
One known difference: the word tokenizer keeps ``</s>`` whole only as a whitespace-separated
word, while the exported special token also matches it glued to punctuation (``"hi </s>."``);
archlab's own corpora never glue it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import UserError

FORMS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "mamba": "MambaForCausalLM",
}
EXPORTABLE = (
    "exportable forms: dense with learned positions + LayerNorm + GELU (GPT2LMHeadModel); "
    "dense with --use-rope --use-rmsnorm --mlp swiglu (LlamaForCausalLM); "
    "moe with --use-rope --use-rmsnorm --mlp swiglu, top-k >= 2, no biases (MixtralForCausalLM); "
    "mamba (MambaForCausalLM)"
)


class NotExportable(UserError):
    """This checkpoint has no exact transformers counterpart; the message says why."""


def _mlp(cfg: ModelConfig) -> str:
    return str(getattr(cfg, "mlp", "gelu"))


def hf_form(cfg: ModelConfig) -> str:
    """The transformers form of ``cfg`` ("gpt2", "llama", "mixtral", "mamba") or NotExportable."""

    def refuse(why: str) -> NotExportable:
        return NotExportable(f"{why}; {EXPORTABLE}")

    arch = cfg.architecture
    if cfg.preset == "rustgpt":
        raise refuse(
            "the rustgpt preset (post-norm blocks, attention without an output projection, "
            "biased head) has no transformers counterpart"
        )
    if arch in ("hypermixer", "hybrid"):
        what = {
            "hypermixer": "HyperMixer's hypernetwork token mixing",
            "hybrid": "the Mamba + sliding-window-attention hybrid (Samba layout)",
        }[arch]
        raise refuse(f"{what} has no transformers class")
    if arch == "mamba":
        return "mamba"
    mlp = _mlp(cfg)
    if arch == "dense":
        if not cfg.use_rope and not cfg.use_rmsnorm and mlp == "gelu":
            return "gpt2"
        if cfg.use_rope and cfg.use_rmsnorm and mlp == "swiglu":
            return "llama"
        got = (
            f"{'RoPE' if cfg.use_rope else 'learned positions'} + "
            f"{'RMSNorm' if cfg.use_rmsnorm else 'LayerNorm'} + {mlp.upper()}"
        )
        raise refuse(f"dense with {got} matches neither GPT-2 nor Llama")
    if arch == "moe":
        if not (cfg.use_rope and cfg.use_rmsnorm and mlp == "swiglu"):
            raise refuse(
                "moe needs --use-rope --use-rmsnorm --mlp swiglu to be Mixtral "
                f"(got rope={cfg.use_rope}, rmsnorm={cfg.use_rmsnorm}, mlp={mlp})"
            )
        if cfg.bias:
            raise refuse("moe with biases: Mixtral's linears have none")
        if cfg.top_k < 2:
            raise refuse(
                "moe with top-k 1 uses the Switch gate (raw probability); Mixtral renormalises "
                "the top-k gates, which for k = 1 is always 1"
            )
        return "mixtral"
    raise refuse(f"architecture {arch!r} has no transformers counterpart")


# ---- configs ------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, form: str, eos_id: int) -> Any:
    """The transformers config object of ``form`` describing ``cfg`` exactly."""
    import transformers as tf

    common = dict(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_weights,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    if form == "gpt2":
        return tf.GPT2Config(
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            activation_function="gelu_pytorch_tanh",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **common,
        )
    if form in ("llama", "mixtral"):
        attn = dict(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.expert_ffn_hidden if form == "mixtral" else cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            hidden_act="silu",
            attention_dropout=cfg.dropout,
            rope_theta=10000.0,
            **common,
        )
        if form == "llama":
            return tf.LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **attn)
        return tf.MixtralConfig(
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
            **attn,
        )
    if form == "mamba":
        return tf.MambaConfig(
            hidden_size=cfg.d_model,
            state_size=cfg.state_size,
            num_hidden_layers=cfg.n_layers,
            layer_norm_epsilon=cfg.norm_eps,
            expand=cfg.expand,
            conv_kernel=cfg.conv_size,
            use_bias=False,
            use_conv_bias=True,
            hidden_act="silu",
            time_step_rank=cfg.resolved_dt_rank,
            residual_in_fp32=True,
            **common,
        )
    raise AssertionError(form)


# ---- weights ------------------------------------------------------------------------------
def hf_state_dict(cfg: ModelConfig, sd: dict[str, Tensor], form: str) -> dict[str, Tensor]:
    """archlab parameter names -> the transformers names of ``form`` (values may be views)."""
    out: dict[str, Tensor] = {}
    L, D = cfg.n_layers, cfg.d_model
    head = sd.get("head.weight", sd["tok_emb.weight"])
    if form == "gpt2":
        t = "transformer."
        out[t + "wte.weight"] = sd["tok_emb.weight"]
        out[t + "wpe.weight"] = sd["pos_emb.weight"]
        for i in range(L):
            a, h = f"blocks.{i}.", f"{t}h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[h + theirs + ".weight"] = sd[a + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[a + ours + ".bias"]
            for ours, theirs in (
                ("mixer.qkv", "attn.c_attn"),
                ("mixer.proj", "attn.c_proj"),
                ("ffn.fc", "mlp.c_fc"),
                ("ffn.proj", "mlp.c_proj"),
            ):
                w = sd[a + ours + ".weight"]  # nn.Linear (out, in); Conv1D wants (in, out)
                out[h + theirs + ".weight"] = w.t().contiguous()
                bias = sd.get(a + ours + ".bias")
                out[h + theirs + ".bias"] = bias if bias is not None else w.new_zeros(w.shape[0])
        out[t + "ln_f.weight"] = sd["norm_f.weight"]
        out[t + "ln_f.bias"] = sd["norm_f.bias"]
        out["lm_head.weight"] = head
        return out
    if form == "mamba":
        b = "backbone."
        out[b + "embeddings.weight"] = sd["tok_emb.weight"]
        for i in range(L):
            a, h = f"blocks.{i}.", f"{b}layers.{i}."
            out[h + "norm.weight"] = sd[a + "norm1.weight"]
            for name in (
                "in_proj.weight",
                "conv1d.weight",
                "conv1d.bias",
                "x_proj.weight",
                "dt_proj.weight",
                "dt_proj.bias",
                "A_log",
                "D",
                "out_proj.weight",
            ):
                out[h + "mixer." + name] = sd[a + "mixer." + name]
        out[b + "norm_f.weight"] = sd["norm_f.weight"]
        out["lm_head.weight"] = head
        return out
    # llama / mixtral
    m = "model."
    out[m + "embed_tokens.weight"] = sd["tok_emb.weight"]
    for i in range(L):
        a, h = f"blocks.{i}.", f"{m}layers.{i}."
        out[h + "input_layernorm.weight"] = sd[a + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[a + "norm2.weight"]
        q, k, v = sd[a + "mixer.qkv.weight"].split(D, dim=0)
        out[h + "self_attn.q_proj.weight"] = q
        out[h + "self_attn.k_proj.weight"] = k
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.o_proj.weight"] = sd[a + "mixer.proj.weight"]
        if a + "mixer.qkv.bias" in sd:
            qb, kb, vb = sd[a + "mixer.qkv.bias"].split(D, dim=0)
            out[h + "self_attn.q_proj.bias"] = qb
            out[h + "self_attn.k_proj.bias"] = kb
            out[h + "self_attn.v_proj.bias"] = vb
            out[h + "self_attn.o_proj.bias"] = sd[a + "mixer.proj.bias"]
        if form == "llama":
            gate, up, down = _swiglu_weights(sd, a + "ffn.")
            for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                out[h + f"mlp.{name}.weight"] = w[0]
                if w[1] is not None:
                    out[h + f"mlp.{name}.bias"] = w[1]
        else:
            out[h + "mlp.gate.weight"] = sd[a + "ffn.router.weight"]
            experts = [_swiglu_weights(sd, a + f"ffn.experts.{e}.") for e in range(cfg.num_experts)]
            # transformers 5 fuses the experts: gate_up (E, 2F, D) = [gate; up], down (E, D, F)
            out[h + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([g[0], u[0]], dim=0) for g, u, _ in experts]
            )
            out[h + "mlp.experts.down_proj"] = torch.stack([d[0] for _, _, d in experts])
    out[m + "norm.weight"] = sd["norm_f.weight"]
    out["lm_head.weight"] = head
    return out


SwiGLUWeight = tuple[Tensor, Tensor | None]


def _swiglu_weights(sd: dict[str, Tensor], prefix: str) -> tuple[SwiGLUWeight, ...]:
    """(gate, up, down) (weight, bias) of archlab's SwiGLU at ``prefix``: ``fc`` stacks gate
    rows over up rows (d -> 2h), ``proj`` is down (h -> d)."""
    fc_w, fc_b = sd[prefix + "fc.weight"], sd.get(prefix + "fc.bias")
    gate_w, up_w = fc_w.chunk(2, dim=0)  # (h, d) each
    gate_b, up_b = fc_b.chunk(2, dim=0) if fc_b is not None else (None, None)
    return (
        (gate_w, gate_b),
        (up_w, up_b),
        (sd[prefix + "proj.weight"], sd.get(prefix + "proj.bias")),
    )


# ---- tokenizer ----------------------------------------------------------------------------
# ASCII punctuation, each character its own token (RustGPT's rule, as archlab's word tokenizer)
_ASCII_PUNCT_CLASS = r"[!-/:-@\[-`{-~]"


def hf_tokenizer_object(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes and decodes as archlab's ``tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from ..data.tokenizer import CharTokenizer, HFTokenizer, WordTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return Tokenizer.from_str(tokenizer.to_json())
    if isinstance(tokenizer, CharTokenizer | WordTokenizer):
        vocab = {t: i for i, t in enumerate(tokenizer.vocab)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=tokenizer.unk_token or UNK_FALLBACK))
        if isinstance(tokenizer, CharTokenizer):
            tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            tok.decoder = decoders.Fuse()  # characters join with nothing between them
            specials = [
                AddedToken(s, special=True, normalized=False) for s in tokenizer.special_tokens
            ]
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.WhitespaceSplit(),
                    pre_tokenizers.Split(Regex(_ASCII_PUNCT_CLASS), behavior="isolated"),
                ]
            )
            # no decoder: tokens join with single spaces, as archlab's word decode
            specials = [
                AddedToken(s, special=True, single_word=True, normalized=False)
                for s in tokenizer.special_tokens
            ]
        tok.add_special_tokens(specials)
        return tok
    raise UserError(f"cannot export a tokenizer of kind {getattr(tokenizer, 'kind', '?')!r}")


UNK_FALLBACK = "<unk>"


def save_hf_tokenizer(tokenizer: Any, out: Path, max_len: int | None) -> None:
    """tokenizer.json + tokenizer_config.json (+ special tokens) for ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    eot = tokenizer.eot_token
    unk = getattr(tokenizer, "unk_token", None)
    kwargs: dict[str, Any] = dict(
        tokenizer_object=hf_tokenizer_object(tokenizer),
        eos_token=eot,
        bos_token=eot,
        pad_token=eot,
        clean_up_tokenization_spaces=False,
    )
    if unk:
        kwargs["unk_token"] = unk
    if max_len is not None:
        kwargs["model_max_length"] = max_len
    PreTrainedTokenizerFast(**kwargs).save_pretrained(str(out))
    # an explicit class name that every transformers version resolves
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


# ---- the export ---------------------------------------------------------------------------
@dataclass
class ExportResult:
    out: Path
    form: str
    hf_class: str
    max_abs_diff: float | None  # logits after the round trip vs archlab (None: not verified)
    verify_tokens: int

    def lines(self) -> list[str]:
        lines = [f"exported {self.form} -> {self.hf_class} to {self.out}"]
        if self.max_abs_diff is not None:
            lines.append(
                f"verified: transformers logits match archlab's on {self.verify_tokens} tokens "
                f"(max |diff| {self.max_abs_diff:.2e})"
            )
        return lines


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Write ``out`` so that ``AutoModelForCausalLM/AutoTokenizer.from_pretrained(out)`` load."""
    from ..train.checkpoint import load_model, read_model_config, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    cfg = read_model_config(ckpt)
    form = hf_form(cfg)  # refuse before touching anything
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(
            "export needs Hugging Face transformers: pip install 'archlab[hf]'"
        ) from None
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"--out: {out} exists and is not empty (use --force to replace it)")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    model, cfg, tokenizer = load_model(ckpt, device="cpu")
    if tokenizer is None:
        raise UserError(f"--checkpoint: {ckpt} has no tokenizer.json to export")
    hf_model = build_hf_model(model, form, int(tokenizer.eot_id))
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    hf_model.save_pretrained(str(tmp), safe_serialization=True)
    learned = cfg.uses_learned_positions
    save_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len if learned else None)
    (tmp / "archlab_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    diff, n = None, 0
    if verify:
        diff, n = verify_export(model, out)
        if diff > atol:
            raise UserError(
                f"export verification failed: logits differ by {diff:.2e} > {atol:g} "
                f"after loading {out} with transformers"
            )
    return ExportResult(out, form, FORMS[form], diff, n)


def build_hf_model(model: torch.nn.Module, form: str, eos_id: int) -> Any:
    """The transformers model of ``form`` holding ``model``'s weights (strictly mapped)."""
    import transformers as tf

    cfg = model.cfg
    config = hf_config(cfg, form, eos_id)
    cls = getattr(tf, FORMS[form])
    dtype = next(model.parameters()).dtype
    hf = cls(config).to(dtype).eval()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    mapped = hf_state_dict(cfg, sd, form)
    expected = set(hf.state_dict())
    if cfg.tie_weights:
        expected.discard("lm_head.weight")  # tied: the embedding is the head
        mapped.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise AssertionError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    hf.load_state_dict(mapped, strict=False)
    if cfg.tie_weights:
        hf.tie_weights()
    return hf


@torch.no_grad()
def verify_export(model: torch.nn.Module, out: Path, n_tokens: int = 64) -> tuple[float, int]:
    """Max |logit difference| between ``model`` and ``out`` loaded by transformers (float32)."""
    from transformers import AutoModelForCausalLM

    cfg = model.cfg
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    T = min(n_tokens, cfg.max_seq_len)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    ours = model.float()(idx)
    theirs = hf(idx).logits
    return float((ours - theirs).abs().max()), 2 * T

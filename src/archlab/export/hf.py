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
* ``mamba2`` -> ``Mamba2ForCausalLM``: likewise (the gated norm is ``mixer.norm``); heads,
  head dim, groups, state size and chunk size are written to its config.
* ``olmo_hybrid`` -> ``OlmoHybridForCausalLM``: gdn with ``--mlp swiglu`` and
  ``--gdn-attention-every K`` (OLMo-hybrid needs at least one full-attention layer, so the pure
  form is refused); gdn's stacked ``in_proj`` is split into q/k/v/g/a/b_proj, beta is
  sigmoid(b) (``linear_allow_neg_eigval=False``), the attention layers are OLMo's (QK-norm,
  RoPE theta 10000, norms on the branch outputs).

Each form (what selects it, its config, its weight names) is one entry of
``hf_forms.FORMS_TABLE``; the tokenizer conversion is ``hf_tokenizer``. This module picks the
form, writes the folder atomically and verifies the logits after loading it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import readable_like_the_others
from .hf_forms import EXPORTABLE, FORMS, FORMS_BY_NAME, FORMS_TABLE, hf_state_dict
from .hf_tokenizer import save_hf_tokenizer
from .out_folder import MARKER, building, check_out, swap_in


class NotExportable(UserError):
    """This checkpoint has no exact transformers counterpart; the message says why."""


def hf_form(cfg: ModelConfig) -> str:
    """The transformers form of ``cfg`` (a ``hf_forms.FORMS`` name) or NotExportable."""
    from ..models import registry

    def refuse(why: str) -> NotExportable:
        return NotExportable(f"{why}; {EXPORTABLE}")

    arch = cfg.architecture
    if cfg.preset == "rustgpt":
        raise refuse(
            "the rustgpt preset (post-norm blocks, attention without an output projection, "
            "biased head) has no transformers counterpart"
        )
    candidates = [f for f in FORMS_TABLE if f.architecture == arch]
    if not candidates:
        raise refuse(
            f"--architecture {arch}: {registry.get(arch).display_name} has no transformers class"
        )
    for form in candidates:
        if form.selects(cfg):
            why = form.check(cfg) if form.check is not None else None
            if why is not None:
                raise refuse(why)
            return form.name
    got = (
        f"{'RoPE' if cfg.use_rope else 'learned positions'} + "
        f"{'RMSNorm' if cfg.use_rmsnorm else 'LayerNorm'} + {cfg.mlp.upper()}"
        if registry.get(arch).learned_positions
        else f"--mlp {cfg.mlp}"  # positions and norm are the architecture's own
    )
    if len(candidates) == 1:
        (only,) = candidates
        raise refuse(f"{arch} needs {only.flags} to be {only.title} (got {got})")
    raise refuse(f"{arch} with {got} matches neither {' nor '.join(f.title for f in candidates)}")


def hf_config(cfg: ModelConfig, form: str, eos_id: int) -> Any:
    """The transformers config object of ``form`` describing ``cfg`` exactly."""
    common = dict(
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_weights,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return FORMS_BY_NAME[form].config(cfg, common)


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
    out = check_out(out, ckpt, force)  # refuse before touching anything
    model, cfg, tokenizer = load_model(ckpt, device="cpu")
    if tokenizer is None:
        raise UserError(f"--checkpoint: {ckpt} has no tokenizer.json to export")
    hf_model = build_hf_model(model, form, int(tokenizer.eot_id))
    diff, n = None, 0
    with building(out) as tmp:
        check_out(out, ckpt, force)  # again, under the lock: another export may have run
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        learned = cfg.uses_learned_positions
        save_hf_tokenizer(tokenizer, tmp, cfg.max_seq_len if learned else None)
        (tmp / MARKER).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        readable_like_the_others(tmp)
        if verify:
            diff, n = verify_export(model, tmp)
            if not diff <= atol:  # NaN never passes
                raise UserError(
                    f"export verification failed: logits differ by {diff:.2e} > {atol:g} "
                    f"after loading the export with transformers; {out} was not changed"
                )
        swap_in(tmp, out)
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

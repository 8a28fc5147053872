"""Model FLOPs per token, for MFU (model FLOPs utilisation).

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s of the devices), the PaLM
definition (Chowdhery et al. 2022, appendix B): only the model's own arithmetic counts, not
recomputation from gradient checkpointing, and training costs three forward passes.

Model FLOPs per token, forward (x3 for forward + backward):

- 2 x every parameter a token multiplies: all active parameters except the embedding
  lookups, plus the output head (which is the embedding matrix when tied). MoE experts count
  top_k of E through ``num_active_parameters()``; norms and biases are counted too (<1%).
- attention: 2 x T_eff x d for QK^T and 2 x T_eff x d for AV per layer, T_eff = the attended
  span (min(T, window)); the full square, as PaLM counts it, though causal kernels skip half.
- the other sequence mixers' arithmetic without parameters of their own (Mamba's selective
  scan, HyperMixer's generated token mixing): see ``_mixing_forward_flops``. A new block can
  report its own through an optional method ``flops_per_token(seq_len) -> float``.

The peak FLOP/s that MFU divides by comes from ``peak.py`` (stated, or measured once per
machine and cached).
"""

from __future__ import annotations

from torch import nn


def _mixing_forward_flops(module: nn.Module, seq_len: int) -> float | None:
    """Forward FLOPs per token a known sequence mixer spends beyond 2 x its parameters.

    None for modules that are not sequence mixers. Counts (T = seq_len, full square):
    attention 4 T_eff d; Mamba's selective scan 9 d_inner N (the count mamba_ssm's own
    benchmark uses); HyperMixer's causal running summary S_t += w1_t x_t^T and read-out
    w2_t GELU(S_t) 4 d' d; the RustGPT HyperMixer's generated mixing 2 d' T d + 2 d' d, minus
    the rows of its generator that a token never uses.
    """
    from ..models.attention import CausalSelfAttention
    from ..models.rustgpt import RustGPTAttention

    if isinstance(module, CausalSelfAttention):
        span = seq_len if module.window is None else min(seq_len, module.window)
        return 4.0 * span * module.n_heads * module.head_dim
    if isinstance(module, RustGPTAttention):
        return 4.0 * seq_len * module.w_q.out_features
    name = type(module).__name__
    if name == "MambaMixer":
        return 9.0 * module.d_inner * module.state_size
    if name == "CausalHyperMixing":
        d_model = module.hyper_w1.fc.in_features
        return 4.0 * module.mixing_dim * d_model
    if name == "CausalSequenceHyperMixer":
        m, length = module.mixing_dim, module.length
        d_model, hidden = module.fc.in_features, module.fc.out_features
        n = min(seq_len, length)
        used_rows = n * m + 2 * m + 1  # W1 rows of visible positions, b1, own W2 column, b2
        unused_rows = module.num_generated - used_rows
        return 2.0 * m * n * d_model + 2.0 * m * d_model - 2.0 * unused_rows * hidden
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at context length ``seq_len``."""
    active = (
        model.num_active_parameters()
        if hasattr(model, "num_active_parameters")
        else sum(p.numel() for p in model.parameters())
    )
    matmul_params = active
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for emb in embeddings:
        matmul_params -= emb.weight.numel()  # a lookup, not a matmul
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and any(head.weight is e.weight for e in embeddings):
        matmul_params += head.weight.numel()  # tied head: the matrix is multiplied once more
    forward = 2.0 * matmul_params
    for module in model.modules():
        custom = getattr(module, "flops_per_token", None)
        if module is not model and callable(custom):
            forward += float(custom(seq_len))
            continue
        mixing = _mixing_forward_flops(module, seq_len)
        if mixing is not None:
            forward += mixing
    return 3.0 * forward


def mfu(flops_per_tok: float, tokens_per_s: float, peak_flops: float, world_size: int = 1) -> float:
    """Fraction of the devices' peak (peak.py) the model's arithmetic used."""
    if peak_flops <= 0 or world_size <= 0:
        return 0.0
    return flops_per_tok * tokens_per_s / (peak_flops * world_size)

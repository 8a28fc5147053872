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
  scan, HyperMixer's generated token mixing): one rule per mixer class in ``MIXER_FLOPS``
  (or a module's own ``flops_per_token(seq_len)`` method).

``flop_breakdown`` splits the count into what torch's FLOP counter (matmuls, convolutions)
can see and what only a formula knows (elementwise recurrences, which the fused numba CPU
kernels also hide from it); tests/test_flops.py checks the first part against
``torch.utils.flop_counter.FlopCounterMode`` for every registered architecture.

The peak FLOP/s that MFU divides by comes from ``peak.py`` (stated, or measured once per
machine and cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MixerFlops:
    """Forward FLOPs per token a sequence mixer spends beyond 2 x its parameters.

    ``visible``: matrix products without parameters of their own (attention's scores and
    weighted sum, generated mixing matrices): what ``torch.utils.flop_counter`` counts.
    ``analytic``: elementwise recurrences (Mamba's selective scan, HyperMixing's running
    summary) that a FLOP counter never sees (it counts matmuls and convolutions only, and the
    fused CPU kernels hide them anyway): counted by formula only.
    """

    visible: float = 0.0
    analytic: float = 0.0


def _attention(module: nn.Module, seq_len: int) -> MixerFlops:
    span = seq_len if module.window is None else min(seq_len, module.window)
    return MixerFlops(visible=4.0 * span * module.n_heads * module.head_dim)


def _rustgpt_attention(module: nn.Module, seq_len: int) -> MixerFlops:
    return MixerFlops(visible=4.0 * seq_len * module.w_q.out_features)


def _mamba(module: nn.Module, seq_len: int) -> MixerFlops:
    # the selective scan: 9 d_inner N per token (the count mamba_ssm's own benchmark uses)
    return MixerFlops(analytic=9.0 * module.d_inner * module.state_size)


def _fused_recurrence(module: nn.Module) -> bool:
    """True where the mixer runs its fused CPU recurrence (kernels/ssd_cpu.py, delta_cpu.py),
    which a FLOP counter does not see: counted by formula (``analytic``)."""
    check = getattr(module, "fused_recurrence", None)
    return bool(check()) if callable(check) else False


def _ssd(module: nn.Module, seq_len: int) -> MixerFlops:
    if _fused_recurrence(module):
        # the recurrence per head: S = a S + (dt x) B^T (3 P N), y = S C (2 P N), D x (2 P)
        H, P, N = module.nheads, module.headdim, module.state_size
        return MixerFlops(analytic=H * (5.0 * P * N + 2.0 * P))
    # Mamba-2's chunked SSD (models/ssd.py) at chunk Q = min(chunk, T) over nc = ceil(T / Q)
    # chunks (a ragged last chunk is padded), all matmuls: per chunk C B^T 2 Q^2 N per group,
    # the masked scores times x 2 Q^2 P per head, each chunk's state 2 Q P N and the carried
    # state's output 2 Q N P per head; per sequence the state passing 2 (nc + 1)^2 P N per
    # head. The decay mask's product with the scores (Q^2 per head and chunk) is elementwise.
    T = max(1, seq_len)
    H, P, G, N = module.nheads, module.headdim, module.ngroups, module.state_size
    Q = max(1, min(module.chunk_size, T))
    nc = -(-T // Q)
    per_chunk = 2.0 * Q * Q * N * G + H * (2.0 * Q * Q * P + 4.0 * Q * P * N)
    visible = (nc * per_chunk + H * 2.0 * (nc + 1) ** 2 * P * N) / T
    return MixerFlops(visible=visible, analytic=H * Q * Q * nc / T)


def _gated_deltanet(module: nn.Module, seq_len: int) -> MixerFlops:
    H, dk, dv = module.n_heads, module.head_k_dim, module.head_v_dim
    if _fused_recurrence(module):
        # the recurrence per head: decay S (dk dv), read k^T S (2 dk dv), write k delta^T
        # (2 dk dv), read-out q^T S (2 dk dv)
        return MixerFlops(analytic=H * 7.0 * dk * dv)
    # the chunked rule (models/delta_rule.py), per head and token, C = the chunk as run:
    # K beta K^T and Q K^T (2 C dk each), (I + L)^-1 [beta V, beta e^gamma K] (2 C (dk + dv)),
    # the state reads [Q; W] S (4 dk dv), the in-chunk A V' (2 C dv), the state write
    # K^T V' (2 dk dv); the inverse itself (doubling merges 2 sum s^2 forward, 4 C^2 for its
    # hand-written backward: a third of it per forward-equivalent). A ragged last chunk is
    # padded: n C / T of the cost.
    T = max(1, seq_len)
    C = max(1, min(module.chunk_size, T))
    padded = -(-T // C) * C / T
    s, P, merges = min(8, C), min(8, C), 0.0
    while P < C:
        P *= 2
    while s < P:
        merges += 2.0 * s * s
        s *= 2
    inverse = (merges + 4.0 * P * P * P / C) / 3.0
    rule = 4.0 * C * dk + 2.0 * C * (dk + dv) + 2.0 * C * dv + 6.0 * dk * dv
    return MixerFlops(visible=H * (rule + inverse) * padded)


def _hypermixing(module: nn.Module, seq_len: int) -> MixerFlops:
    # causal running summary S_t += w1_t x_t^T and read-out w2_t GELU(S_t): 4 d' d
    d_model = module.hyper_w1.fc.in_features
    return MixerFlops(analytic=4.0 * module.mixing_dim * d_model)


def _rustgpt_hypermixing(module: nn.Module, seq_len: int) -> MixerFlops:
    # generated mixing 2 d' T d + 2 d' d, minus the generator rows a token never uses
    m, length = module.mixing_dim, module.length
    d_model, hidden = module.fc.in_features, module.fc.out_features
    n = min(seq_len, length)
    used_rows = n * m + 2 * m + 1  # W1 rows of visible positions, b1, own W2 column, b2
    unused_rows = module.num_generated - used_rows
    return MixerFlops(
        visible=2.0 * m * n * d_model + 2.0 * m * d_model - 2.0 * unused_rows * hidden
    )


# One entry per sequence-mixer class (by class name, so this module imports no block): a new
# architecture adds its mixer here, or gives the module a method
# ``flops_per_token(seq_len) -> MixerFlops | float`` (a float counts as ``visible``).
# tests/test_flops.py checks every registered architecture against torch's FLOP counter.
MIXER_FLOPS: dict[str, Callable[[nn.Module, int], MixerFlops]] = {
    "CausalSelfAttention": _attention,
    "RustGPTAttention": _rustgpt_attention,
    "MambaMixer": _mamba,
    "GatedDeltaNet": _gated_deltanet,
    "Mamba2Mixer": _ssd,
    "CausalHyperMixing": _hypermixing,
    "CausalSequenceHyperMixer": _rustgpt_hypermixing,
}


def mixer_flops(module: nn.Module, seq_len: int) -> MixerFlops | None:
    """The forward count of a known sequence mixer; None for any other module."""
    custom = getattr(module, "flops_per_token", None)
    if callable(custom):
        value = custom(seq_len)
        return value if isinstance(value, MixerFlops) else MixerFlops(visible=float(value))
    rule = MIXER_FLOPS.get(type(module).__name__)
    return None if rule is None else rule(module, seq_len)


@dataclass(frozen=True)
class FlopBreakdown:
    """Training (forward + backward = 3 x forward) FLOPs per token, by what counts them."""

    parameters: float  # 6 x every parameter a token multiplies
    visible: float  # 3 x the mixers' parameter-free matmuls
    analytic: float  # 3 x the mixers' elementwise recurrences (formula only)

    @property
    def counted(self) -> float:
        """The part a FLOP counter sees (matmuls): tests compare it with FlopCounterMode."""
        return self.parameters + self.visible

    @property
    def total(self) -> float:
        return self.parameters + self.visible + self.analytic


def flop_breakdown(model: nn.Module, seq_len: int) -> FlopBreakdown:
    """Training FLOPs per token at context length ``seq_len``, split by how they are known."""
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
    visible = analytic = 0.0
    for module in model.modules():
        if module is model:
            continue
        count = mixer_flops(module, seq_len)
        if count is not None:
            visible += count.visible
            analytic += count.analytic
    return FlopBreakdown(3.0 * 2.0 * matmul_params, 3.0 * visible, 3.0 * analytic)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at context length ``seq_len``."""
    return flop_breakdown(model, seq_len).total


def mfu(flops_per_tok: float, tokens_per_s: float, peak_flops: float, world_size: int = 1) -> float:
    """Fraction of the devices' peak (peak.py) the model's arithmetic used."""
    if peak_flops <= 0 or world_size <= 0:
        return 0.0
    return flops_per_tok * tokens_per_s / (peak_flops * world_size)

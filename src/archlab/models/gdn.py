"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): the linear-attention layer of Qwen3-Next,
OLMo-hybrid and flash-linear-attention, each layer followed by an MLP as they do.

Every layer is ``x + GatedDeltaNet(RMSNorm(x)); x + MLP(RMSNorm(x))``. The mixer follows
transformers' ``OlmoHybridGatedDeltaNet`` (itself fla's ``GatedDeltaNet``), with H = n_heads
heads of key dim dk (default 3 d / 4 H) and value dim dv = expand_v dk:

    q, k, v, gate, a, b = in_proj(x)           one matmul; OLMo's q/k/v/g/a/b_proj stacked
    q, k, v  = SiLU(causal depthwise conv(q, k, v))      kernel conv_size, no bias
    q, k     = L2-normalised per head; q scaled by 1 / sqrt(dk)
    beta     = sigmoid(b);   g = -exp(A_log) softplus(a + dt_bias)      (per head, per token)
    o        = gated delta rule (delta_rule.py): S_t = e^g_t (I - beta_t k_t k_t^T) S_{t-1}
               + beta_t k_t v_t^T,  o_t = S_t^T q_t
    out      = out_proj(RMSNorm_dv(o) * SiLU(gate))

Training runs the fused recurrence on CPU (kernels/delta_cpu.py, where numba runs), else the
chunked (WY) form, or fla's ``chunk_gated_delta_rule`` on CUDA when fla is installed;
decoding keeps {"conv": (B, conv_size - 1, 2 H dk + H dv), "ssm": (B, H, dk, dv)} per layer
and takes recurrent steps. ``--gdn-attention-every K`` makes every K-th layer
OLMo-hybrid's full-attention layer (QK-norm, RoPE, post-norm branches: x + N(Attn(x));
x + N(MLP(x))), the layout ``export`` writes as ``OlmoHybridForCausalLM``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .attention import CausalSelfAttention, kv_cache_elements
from .delta_rule import L2_EPS, chunk_gated_delta_rule, gated_delta_step
from .layers import make_mlp, make_norm
from .spec import ArchitectureSpec, SummaryField, check_attention_heads

if TYPE_CHECKING:
    from ..config import ModelConfig

# initialisation of the reference (OLMo-hybrid / fla): A ~ U[0, 16], dt log-uniform, floored
A_INIT_RANGE, DT_MIN, DT_MAX, DT_INIT_FLOOR = (0.0, 16.0), 1e-3, 1e-1, 1e-4
O_NORM_EPS = 1e-5  # fla's FusedRMSNormGated, as OLMo-hybrid keeps it
_FUSED_DTYPES = (torch.float32, torch.float64)  # those of the fused CPU kernels


def key_head_dim(cfg: ModelConfig) -> int:
    """dk: --gdn-head-dim, or OLMo-hybrid's default 0.75 d_model / n_heads."""
    return cfg.gdn_head_dim or (3 * cfg.d_model) // (4 * cfg.n_heads)


def is_attention_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """OLMo-hybrid's layout: with --gdn-attention-every K, layers K-1, 2K-1, ... attend."""
    K = cfg.gdn_attention_every
    return K > 0 and layer_idx % K == K - 1


@functools.cache
def _fla_chunk() -> Callable | None:
    """fla's chunk_gated_delta_rule (Triton; CUDA only), or None when not installed."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except Exception:  # not installed, or a build that does not match this torch
        return None
    return fla_chunk


def l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's dv values, then times SiLU(gate) (fla's FusedRMSNormGated)."""

    def __init__(self, dim: int, eps: float = O_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        """x, gate (..., dv) -> (..., dv)."""
        from .kernels import cpu_kernel_ready
        from .kernels.gated_norm_cpu import gated_rms_norm, warm_up

        if x.dim() == 4 and cpu_kernel_ready("gated_norm", x, self, warm_up, "fused gated norm "
                                             "unavailable"):  # fmt: skip
            dv = x.shape[-1]
            out = gated_rms_norm(x.flatten(2), gate.flatten(2), self.weight.repeat(x.shape[2]),
                                 dv, self.eps, False)  # fmt: skip
            return out.view(x.shape)
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps)
        return (y * F.silu(gate.to(dtype))).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """The token mixer; input and output (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, dk = cfg.n_heads, key_head_dim(cfg)
        dv = cfg.gdn_expand_v * dk
        self.n_heads, self.head_k_dim, self.head_v_dim = H, dk, dv
        self.key_dim, self.value_dim = H * dk, H * dv
        self.conv_dim = 2 * self.key_dim + self.value_dim  # q, k, v go through the conv
        self.conv_size = cfg.conv_size
        self.chunk_size = cfg.gdn_chunk_size
        # [q; k; v; gate; a; b] rows: OLMo-hybrid's q/k/v/g/a/b_proj (export splits them)
        self.in_proj = nn.Linear(cfg.d_model, self.conv_dim + self.value_dim + 2 * H, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.conv_size, groups=self.conv_dim,
            padding=cfg.conv_size - 1, bias=False,
        )  # fmt: skip
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.o_norm = GatedRMSNorm(dv)
        self.out_proj = nn.Linear(self.value_dim, cfg.d_model, bias=False)
        self.out_proj.residual_scale = True  # type: ignore[attr-defined]
        self.special_init()

    @property
    def split_sizes(self) -> list[int]:
        """in_proj's row blocks: q, k, v, gate, a, b."""
        kd, vd, H = self.key_dim, self.value_dim, self.n_heads
        return [kd, kd, vd, vd, H, H]

    @torch.no_grad()
    def special_init(self) -> None:
        """The reference's A_log, dt_bias and conv initialisation."""
        device = self.A_log.device
        lo, hi = A_INIT_RANGE
        A = torch.empty(self.n_heads, device=device).uniform_(lo, hi)
        self.A_log.copy_(torch.log(A))
        log_min, log_max = math.log(DT_MIN), math.log(DT_MAX)
        dt = torch.exp(torch.rand(self.n_heads, device=device) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=DT_INIT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.conv1d.reset_parameters()

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model); ``state`` (a dict) is read and updated."""
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.head_k_dim, self.head_v_dim
        qkv, gate, a, b = self.in_proj(x).split(
            [self.conv_dim, self.value_dim, H, H], dim=-1
        )  # (B, T, .) each
        qkv = self._conv(qkv, state)  # (B, T, conv_dim), after SiLU
        dtype = torch.promote_types(x.dtype, torch.float32)  # the rule's compute dtype
        q, k, v = qkv.to(dtype).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2norm(q.view(B, T, H, dk)) * dk**-0.5
        k = l2norm(k.view(B, T, H, dk))
        v = v.view(B, T, H, dv)
        beta = b.to(dtype).sigmoid()  # (B, T, H)
        g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
        prev = state.get("ssm") if state is not None else None
        if state is not None and T == 1:
            if prev is None:
                prev = v.new_zeros(B, H, dk, dv)
            o, S = gated_delta_step(prev, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
            o = o.unsqueeze(1)  # (B, 1, H, dv)
        elif x.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16) and _fla_chunk():
            # fla's Triton kernel (half-precision q, k, v; float32 g, beta and state), in its
            # (B, T, H, .) layout; q is already scaled and q, k normalised here
            o, S = _fla_chunk()(  # type: ignore[misc]
                q.to(qkv.dtype), k.to(qkv.dtype), v.to(qkv.dtype), g, beta, scale=1.0,
                initial_state=prev, output_final_state=state is not None,
            )  # fmt: skip
            o = o.to(dtype)
        elif self._fused_ready(v):  # the fused CPU recurrence, in this (B, T, H, .) layout
            from .kernels.delta_cpu import delta_rule_fused

            o, S = delta_rule_fused(q, k, v, g, beta, prev)
        else:
            o, S = chunk_gated_delta_rule(
                *(t.transpose(1, 2) for t in (q, k, v, g, beta)), self.chunk_size, prev
            )
            o = o.transpose(1, 2)  # (B, T, H, dv)
        if state is not None:
            state["ssm"] = S
        y = self.o_norm(o, gate.view(B, T, H, dv)).to(x.dtype)
        return self.out_proj(y.reshape(B, T, self.value_dim))

    def fused_recurrence(self) -> bool:
        """Whether training on this module's device and dtype runs the fused CPU recurrence
        (for train/flops.py: a FLOP counter does not see it)."""
        from .kernels import fused_available

        p = self.A_log
        return p.device.type == "cpu" and p.dtype in _FUSED_DTYPES and fused_available("delta")

    def _fused_ready(self, x: Tensor) -> bool:
        from .kernels import cpu_kernel_ready
        from .kernels.delta_cpu import warm_up

        return cpu_kernel_ready("delta", x, self, warm_up, "Gated DeltaNet: fused delta rule "
                                "unavailable, using the chunked torch form")  # fmt: skip

    def _conv_ready(self, x: Tensor) -> bool:
        from .kernels import cpu_kernel_ready
        from .kernels.conv_cpu import warm_up

        return cpu_kernel_ready("conv", x, self, warm_up, "fused conv unavailable, using torch")

    def _conv(self, xi: Tensor, state: dict | None) -> Tensor:
        """Causal depthwise conv + SiLU over xi (B, T, conv_dim), as K shifted multiply-adds
        in this layout (torch's depthwise conv1d takes its slow path on CPU, and its FLOP
        counter ignores the groups in the backward); keeps the last K - 1 inputs in state."""
        T, K = xi.shape[1], self.conv_size
        if state is None and self._conv_ready(xi):
            from .kernels.conv_cpu import conv_silu

            return conv_silu(xi, self.conv1d.weight, None)
        w = self.conv1d.weight.squeeze(1).t()  # (K, conv_dim)
        if state is None:
            full = F.pad(xi, (0, 0, K - 1, 0))  # (B, K - 1 + T, conv_dim)
        else:
            prev = state.get("conv")
            if prev is None:
                prev = xi.new_zeros(xi.shape[0], K - 1, self.conv_dim)
            full = torch.cat([prev.to(xi.dtype), xi], dim=1)
            state["conv"] = full[:, full.shape[1] - (K - 1) :]
        out = full[:, :T] * w[0]
        for j in range(1, K):
            out = out + full[:, j : j + T] * w[j]
        return F.silu(out)


class GatedDeltaNetBlock(nn.Module):
    """x + GatedDeltaNet(RMSNorm(x)); x + MLP(RMSNorm(x)) (OLMo-hybrid's linear layer)."""

    display_name = "GatedDeltaNetBlock"

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = GatedDeltaNet(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm2 = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        if state is not None and x.shape[1] == 1:  # a decode token: one fused kernel on CPU
            from .kernels.decode_ssd_gdn import gdn_block_step

            out = gdn_block_step(self, x, state)
            if out is not None:
                return out, {}
        x = x + self.drop(self.mixer(self.norm1(x), state))
        x = x + self.ffn(self.norm2(x))
        return x, {}


class PostNormAttentionBlock(nn.Module):
    """x + RMSNorm(Attn(x)); x + RMSNorm(MLP(x)): OLMo-hybrid's full-attention layer (QK-norm,
    RoPE, norms on the branch outputs as in OLMo 2)."""

    display_name = "AttentionBlock"

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.mixer = CausalSelfAttention(cfg, use_rope=True, qk_norm=True)
        self.attn_norm = make_norm(cfg)
        self.ffn = make_mlp(cfg)
        self.ffn_norm = make_norm(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        x = x + self.attn_norm(self.mixer(x, state, pos))
        x = x + self.ffn_norm(self.ffn(x))
        return x, {}


def gdn_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    if is_attention_layer(cfg, layer_idx):
        return PostNormAttentionBlock(cfg, layer_idx)
    return GatedDeltaNetBlock(cfg, layer_idx)


def _state_elements(cfg: ModelConfig, layer_idx: int, seq_len: int) -> int:
    """The delta-rule state H x dk x dv (the conv window is not counted); a KV cache on the
    attention layers of the hybrid layout."""
    if is_attention_layer(cfg, layer_idx):
        return kv_cache_elements(cfg, seq_len)
    dk = key_head_dim(cfg)
    return cfg.n_heads * dk * cfg.gdn_expand_v * dk


def _validate(cfg: ModelConfig) -> None:
    for flag, value, least in (
        ("--conv-size", cfg.conv_size, 2),
        ("--gdn-chunk-size", cfg.gdn_chunk_size, 1),
        ("--gdn-expand-v", cfg.gdn_expand_v, 1),
        ("--gdn-head-dim", cfg.gdn_head_dim, 0),
        ("--gdn-attention-every", cfg.gdn_attention_every, 0),
    ):
        if value < least:
            raise ConfigError(f"{flag}: must be >= {least} (got {value})")
    if cfg.bias:
        raise ConfigError(
            "--bias: gdn's projections and MLP are bias-free as in the references; "
            "--bias applies to dense, moe, hybrid and hypermixer"
        )
    if not cfg.gdn_head_dim and (3 * cfg.d_model) % (4 * cfg.n_heads):
        raise ConfigError(
            f"--n-heads: the key width 3/4 x d_model = {3 * cfg.d_model / 4:g} is not divisible "
            f"by n_heads {cfg.n_heads} (choose --n-heads, or set --gdn-head-dim)"
        )
    K = cfg.gdn_attention_every
    if K:
        if K > cfg.n_layers:
            raise ConfigError(
                f"--gdn-attention-every {K}: larger than --n-layers {cfg.n_layers}, so no layer "
                "would be attention"
            )
        check_attention_heads(cfg, always_rope=True)


def _positions(cfg: ModelConfig) -> str:
    if cfg.gdn_attention_every:
        return "rope (attention layers) + recurrent (GatedDeltaNet layers)"
    return "none (recurrent)"


SPEC = ArchitectureSpec(
    name="gdn",
    aliases=("gated-deltanet",),
    display_name="Gated DeltaNet",
    block=gdn_block,
    fields=(
        "n_heads",
        "d_ff",
        "mlp",
        "conv_size",
        "gdn_head_dim",
        "gdn_expand_v",
        "gdn_chunk_size",
        "gdn_attention_every",
    ),  # fmt: skip
    norm="rmsnorm",  # as in the references
    learned_positions=False,  # the recurrence carries order (attention layers use RoPE)
    positions=_positions,
    # the mixer has 6 d^2 parameters (q, k: 3/4 d each; v, gate, out: 3/2 d): an MLP of 3 d
    # (6 d^2) gives dense's 12 d^2 per layer
    size_override=lambda base: dict(d_ff=3 * base["d_ff"] // 4),
    summary_fields=(
        SummaryField("num_heads", "GDN Heads", lambda c: c.n_heads),
        SummaryField("gdn_head_dim", "Key Head Dim", key_head_dim),
        SummaryField(
            "gdn_value_head_dim", "Value Head Dim", lambda c: c.gdn_expand_v * key_head_dim(c)
        ),
        SummaryField("conv_size", "Conv Size", lambda c: c.conv_size),
        SummaryField("gdn_chunk_size", "Chunk Size", lambda c: c.gdn_chunk_size),
        SummaryField(
            "gdn_attention_every",
            "Full Attention Every",
            lambda c: c.gdn_attention_every,
            when=lambda c: c.gdn_attention_every > 0,
        ),
    ),  # fmt: skip
    validate=_validate,
    state_elements=_state_elements,
    linear_in_length=True,
)

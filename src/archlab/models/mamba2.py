"""Mamba-2 block (Dao & Gu 2024, arXiv 2405.21060): x + Mamba2(RMSNorm(x)).

The mixer follows the reference ``Mamba2`` module of state-spaces/mamba (and transformers'
``Mamba2Mixer``) with its defaults (ngroups 1, no biases but the conv's, gate after the SSD,
RMSNorm before the output projection, A from [1, 16]):

    z, xBC, dt = in_proj(x)                    d -> d_inner + (d_inner + 2 G N) + H, no bias
    x, B, C    = SiLU(causal depthwise conv(xBC))   kernel conv_size, with bias
    y          = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D x   per head
    out        = out_proj(RMSNorm_groups(y * SiLU(z)))                          d_inner -> d

H = d_inner / headdim heads, each with a scalar decay; B and C are shared by the heads of
each of G groups. Training runs, on CPU, the fused recurrence (``kernels/ssd_cpu.py``, with the
conv in ``kernels/conv_cpu.py``) where numba runs, else the chunked SSD (``ssd.py``), or
mamba_ssm's ``mamba_chunk_scan_combined`` on CUDA when it is installed. Decoding keeps, per layer,
{"conv": (B, d_inner + 2 G N, conv_size - 1) last conv inputs, "ssm": (B, H, headdim, N)}:
chunks of T > 1 tokens run the chunked form from the carried state, single tokens one
recurrent step.
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
from .layers import make_norm
from .mamba import DT_INIT_FLOOR, DT_MAX, DT_MIN, check_ssm, inverse_softplus
from .spec import ArchitectureSpec, SummaryField
from .ssd import ssd_chunked, ssd_step

if TYPE_CHECKING:
    from ..config import ModelConfig

A_INIT_RANGE = (1.0, 16.0)  # the reference's A ~ U[1, 16], stored as A_log
_FUSED_DTYPES = (torch.float32, torch.float64)  # those of the fused CPU kernels


@functools.cache
def _cuda_chunk_scan() -> Callable | None:
    """mamba_ssm's Triton ``mamba_chunk_scan_combined``, or None (never imported on CPU)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or a build that does not match this torch
        return None
    return mamba_chunk_scan_combined


class GatedRMSNorm(nn.Module):
    """RMSNorm over each of ``groups`` slices of y * SiLU(z) (the reference's RMSNormGated with
    norm_before_gate=False), in at least float32; (..., d_inner) -> (..., d_inner)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        from .kernels import cpu_kernel_ready
        from .kernels.gated_norm_cpu import gated_rms_norm, warm_up

        if cpu_kernel_ready("gated_norm", y, self, warm_up, "fused gated norm unavailable"):
            return gated_rms_norm(y, z, self.weight, y.shape[-1] // self.groups, self.eps, True)
        dtype = torch.promote_types(y.dtype, torch.float32)
        g = y.to(dtype) * F.silu(z.to(dtype))
        size = g.shape[-1] // self.groups
        g = F.rms_norm(g.unflatten(-1, (self.groups, size)), (size,), None, self.eps).flatten(-2)
        return (self.weight.to(dtype) * g).type_as(y)


class Mamba2Mixer(nn.Module):
    """The SSD token mixer; input and output (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_inner = di = cfg.d_inner
        self.headdim = cfg.ssd_head_dim
        self.nheads = H = di // cfg.ssd_head_dim
        self.ngroups = G = cfg.ssd_groups
        self.state_size = N = cfg.state_size
        self.conv_size = cfg.conv_size
        self.chunk_size = cfg.ssd_chunk_size
        self.conv_dim = di + 2 * G * N
        self.in_proj = nn.Linear(cfg.d_model, di + self.conv_dim + H, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.conv_size, groups=self.conv_dim,
            padding=cfg.conv_size - 1, bias=True,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = GatedRMSNorm(di, G, cfg.norm_eps)
        self.out_proj = nn.Linear(di, cfg.d_model, bias=False)
        # The gated norm hands out_proj an RMS-1 input whatever the stream's scale, so its std
        # alone sets the branch's output: 0.02 / sqrt(2 L) (GPT-2's residual scale) per unit of
        # output RMS, i.e. std 0.02 / sqrt(2 L d_inner). (The reference's kaiming init would
        # put each branch at ~10x the 0.02-std embeddings: the init audit's bound is 3x.)
        self.out_std = 0.02 / math.sqrt(2 * cfg.n_layers * di)
        self.special_init()

    @torch.no_grad()
    def special_init(self) -> None:
        """Reference initialisation: dt log-uniform in [DT_MIN, DT_MAX] (floored) through the
        inverse softplus, A ~ U[1, 16], D = 1, the conv's PyTorch default, norm gain 1; and
        out_proj at ``out_std`` (see __init__)."""
        device = self.A_log.device
        log_min, log_max = math.log(DT_MIN), math.log(DT_MAX)
        dt = torch.exp(torch.rand(self.nheads, device=device) * (log_max - log_min) + log_min)
        self.dt_bias.copy_(inverse_softplus(dt.clamp(min=DT_INIT_FLOOR)))
        lo, hi = A_INIT_RANGE
        self.A_log.copy_(torch.log(torch.empty(self.nheads, device=device).uniform_(lo, hi)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)
        self.conv1d.reset_parameters()
        nn.init.normal_(self.out_proj.weight, 0.0, self.out_std)

    def _A(self) -> Tensor:
        """A = -exp(A_log) in at least float32 (float64 stays float64)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model); ``state`` (a dict) is read and updated."""
        b, T, _ = x.shape
        di, H, P, G, N = self.d_inner, self.nheads, self.headdim, self.ngroups, self.state_size
        z, xBC, dt = self.in_proj(x).split([di, self.conv_dim, H], dim=-1)
        xBC = self._conv(xBC, state)  # (B, T, conv_dim), after SiLU
        prev = state.get("ssm") if state is not None else None
        if (state is None or T > 1) and self._fused_ready(xBC):  # the fused CPU recurrence
            from .kernels.ssd_cpu import ssd_fused_packed

            A = self._A()
            delta = F.softplus(dt.to(A.dtype) + self.dt_bias.to(A.dtype))  # (B, T, H)
            y, last = ssd_fused_packed(xBC, delta, A, self.D, (H, P, G, N), prev)  # + D x
            if state is not None:
                state["ssm"] = last
            return self.out_proj(self.norm(y.reshape(b, T, di).to(x.dtype), z))
        xs, B, C = xBC.split([di, G * N, G * N], dim=-1)
        xs = xs.unflatten(-1, (H, P))  # (B, T, H, P)
        B, C = B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))  # (B, T, G, N)
        A = self._A()  # (H,)
        if state is not None and T == 1 and prev is not None:
            delta = F.softplus(dt[:, 0].to(A.dtype) + self.dt_bias.to(A.dtype))  # (B, H)
            y, state["ssm"] = ssd_step(prev, xs[:, 0], delta, A, B[:, 0], C[:, 0])
            y = y.unsqueeze(1)
            y = y + xs.to(y.dtype) * self.D.to(y.dtype)[:, None]  # the D skip, per head
        else:
            y, last = self._scan(xs, dt, A, B, C, prev)  # with the D skip
            if state is not None:
                state["ssm"] = last
        y = y.reshape(b, T, di).to(x.dtype)
        return self.out_proj(self.norm(y, z))

    def _scan(
        self, xs: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, prev: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The SSD over (B, T, H, P), from ``prev`` or zeros -> y + D x, last state: the
        chunked form, or mamba_ssm's kernel on CUDA (the fused CPU recurrence runs earlier, in
        ``forward``, on the packed conv output)."""
        scan = _cuda_chunk_scan() if xs.is_cuda else None
        if scan is not None:  # dt_bias and softplus are applied inside the Triton kernel
            return scan(
                xs.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(),
                self.chunk_size, D=self.D.float(), dt_bias=self.dt_bias.float(),
                dt_softplus=True, initial_states=prev, return_final_states=True,
            )  # fmt: skip
        delta = F.softplus(dt.to(A.dtype) + self.dt_bias.to(A.dtype))  # (B, T, H)
        y, last = ssd_chunked(xs, delta, A, B, C, self.chunk_size, prev)
        return y + xs.to(y.dtype) * self.D.to(y.dtype)[:, None], last  # the D skip, per head

    def fused_recurrence(self) -> bool:
        """Whether training on this module's device and dtype runs the fused CPU recurrence
        (for train/flops.py: a FLOP counter does not see it)."""
        from .kernels import fused_available

        p = self.A_log
        return p.device.type == "cpu" and p.dtype in _FUSED_DTYPES and fused_available("ssd")

    def _fused_ready(self, x: Tensor) -> bool:
        from .kernels import cpu_kernel_ready
        from .kernels.ssd_cpu import warm_up

        return cpu_kernel_ready("ssd", x, self, warm_up, "Mamba-2: fused SSD unavailable, "
                                "using the chunked torch form")  # fmt: skip

    def _conv(self, xBC: Tensor, state: dict | None) -> Tensor:
        """Causal depthwise conv + SiLU over (B, T, conv_dim); keeps the last K - 1 inputs in
        state as (B, conv_dim, K - 1). Written as K shifted multiply-adds in the (B, T, C)
        layout: on CPU faster than the grouped conv1d and its transposes, and torch's FLOP
        counter miscounts a grouped convolution's backward (it ignores the groups)."""
        b, T, Cd = xBC.shape
        K = self.conv_size
        if state is None and self._conv_ready(xBC):
            from .kernels.conv_cpu import conv_silu

            return conv_silu(xBC, self.conv1d.weight, self.conv1d.bias)
        prev = state.get("conv") if state is not None else None
        if prev is None:
            prev = xBC.new_zeros(b, K - 1, Cd)
        else:
            prev = prev.transpose(1, 2).to(xBC.dtype)  # (B, K - 1, conv_dim)
        full = torch.cat([prev, xBC], dim=1)  # (B, K - 1 + T, conv_dim)
        if state is not None:
            state["conv"] = full[:, T:].transpose(1, 2)  # the last K - 1 inputs
        w = self.conv1d.weight.squeeze(1).t()  # (K, conv_dim)
        out = self.conv1d.bias + full[:, K - 1 :] * w[K - 1]
        for k in range(K - 1):
            out = out + full[:, k : k + T] * w[k]
        return F.silu(out)

    def _conv_ready(self, x: Tensor) -> bool:
        from .kernels import cpu_kernel_ready
        from .kernels.conv_cpu import warm_up

        return cpu_kernel_ready("conv", x, self, warm_up, "fused conv unavailable, using torch")


class Mamba2Block(nn.Module):
    """Pre-norm residual block: x + Mamba2(RMSNorm(x)); no separate MLP (as in the paper)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = Mamba2Mixer(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        if state is not None and x.shape[1] == 1:  # a decode token: one fused kernel on CPU
            from .kernels.decode_ssd_gdn import mamba2_block_step

            out = mamba2_block_step(self, x, state)
            if out is not None:
                return out, {}
        return x + self.drop(self.mixer(self.norm1(x), state)), {}


# ---- the spec ---------------------------------------------------------------------------------
# The reference's defaults (headdim 64, d_state 128, ngroups 1) from Mamba-2 130M (d_model 768)
# up; the CPU sizes halve them.
_SHAPES = {128: (32, 64), 256: (64, 64)}  # d_model -> (headdim, d_state); larger: (64, 128)


def _size_override(base: dict[str, int]) -> dict[str, int]:
    headdim, d_state = _SHAPES.get(base["d_model"], (64, 128))
    # a Mamba-2 block has ~6 d^2 parameters, half a dense block: twice the layers (as Mamba)
    return dict(n_layers=2 * base["n_layers"], ssd_head_dim=headdim, state_size=d_state)


def _validate(cfg: ModelConfig) -> None:
    if cfg.mlp != "gelu":
        raise ConfigError(
            f"--mlp {cfg.mlp}: mamba2 blocks have no MLP (the mixer is the whole block); "
            "SwiGLU applies to dense, moe, hybrid and hypermixer"
        )
    if cfg.bias:
        raise ConfigError(
            "--bias: mamba2's projections are bias-free as in the reference; --bias applies to "
            "dense, moe, hybrid and hypermixer"
        )
    check_ssm(cfg)
    if cfg.conv_size < 2:
        raise ConfigError(
            f"--conv-size: Mamba-2's causal conv needs a kernel of at least 2 (got {cfg.conv_size})"
        )
    if cfg.ssd_head_dim < 1:
        raise ConfigError(f"--ssd-head-dim: must be a positive number (got {cfg.ssd_head_dim})")
    if cfg.d_inner % cfg.ssd_head_dim:
        raise ConfigError(
            f"--ssd-head-dim: d_inner {cfg.d_inner} (expand x d_model) is not divisible by "
            f"head dim {cfg.ssd_head_dim}"
        )
    heads = cfg.d_inner // cfg.ssd_head_dim
    if cfg.ssd_groups < 1 or heads % cfg.ssd_groups:
        raise ConfigError(
            f"--ssd-groups: {cfg.ssd_groups} groups must divide the {heads} heads "
            f"(d_inner {cfg.d_inner} / head dim {cfg.ssd_head_dim})"
        )
    if cfg.ssd_chunk_size < 1:
        raise ConfigError(f"--ssd-chunk-size: must be >= 1 (got {cfg.ssd_chunk_size})")


SPEC = ArchitectureSpec(
    name="mamba2",
    aliases=("ssd",),
    display_name="Mamba-2",
    block=Mamba2Block,
    fields=("state_size", "conv_size", "expand", "ssd_head_dim", "ssd_groups", "ssd_chunk_size"),
    norm="rmsnorm",
    learned_positions=False,  # the recurrence carries order; --use-rope changes nothing
    positions=lambda c: "none (recurrent)",
    size_override=_size_override,
    hidden_dim=lambda c: c.d_inner,  # no MLP: the expanded inner dimension
    summary_fields=(
        SummaryField("state_size", "State Size", lambda c: c.state_size),
        SummaryField("conv_size", "Conv Size", lambda c: c.conv_size),
        SummaryField("expand", "Expand", lambda c: c.expand),
        SummaryField("ssd_heads", "SSD Heads", lambda c: c.d_inner // c.ssd_head_dim),
        SummaryField("ssd_head_dim", "SSD Head Dim", lambda c: c.ssd_head_dim),
        SummaryField("ssd_groups", "SSD Groups", lambda c: c.ssd_groups),
        SummaryField("ssd_chunk_size", "SSD Chunk Size", lambda c: c.ssd_chunk_size),
    ),
    validate=_validate,
    # the SSM state: H x headdim x N = d_inner x N per layer (the conv window is not counted)
    state_elements=lambda c, i, seq_len: c.d_inner * c.state_size,
    linear_in_length=True,
)

"""Mamba block (Gu & Dao 2023, arXiv 2312.00752): x + Mamba(RMSNorm(x)).

The mixer follows the reference ``Mamba`` module of state-spaces/mamba with its defaults:

    x, z   = in_proj(x)                       d -> 2 d_inner, no bias
    x      = SiLU(causal depthwise conv1d(x)) kernel conv_size, with bias
    dt,B,C = x_proj(x)                        d_inner -> dt_rank + 2 N, no bias
    delta  = softplus(dt_proj(dt))            dt_rank -> d_inner, with bias
    y      = selective_scan(x, delta, A = -exp(A_log), B, C, D) * SiLU(z)
    out    = out_proj(y)                      d_inner -> d, no bias

Training on CPU runs everything between in_proj and out_proj as one fused autograd node
(``kernels/mamba_cpu.py``: conv + SiLU kernels, the fused scan, saving only in_proj's output and
recomputing the rest in the backward); elsewhere, or with ``ARCHLAB_SCAN=chunked|sequential``,
the op-by-op graph with ``scan.selective_scan`` (or the ``mamba_ssm`` CUDA kernels when they are
installed and the tensors are on CUDA). Decoding keeps, per layer,
{"conv": (B, d_inner, conv_size - 1) last conv inputs, "ssm": (B, d_inner, N) state}: chunks of
T > 1 tokens run the scan from the carried state, single tokens take one recurrent step.
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
from .scan import selective_scan, selective_step
from .spec import ArchitectureSpec, SummaryField

if TYPE_CHECKING:
    from ..config import ModelConfig

# dt initialisation of the reference: dt ~ log-uniform in [DT_MIN, DT_MAX], floored.
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4


@functools.cache
def _cuda_kernels() -> tuple[Callable | None, Callable | None]:
    """(selective_scan_fn, causal_conv1d_fn) from mamba_ssm / causal_conv1d, or None each."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or a build that does not match this torch
        selective_scan_fn = None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn


def inverse_softplus(x: Tensor) -> Tensor:
    """y such that softplus(y) = x, stable for small x: x + log(1 - exp(-x))."""
    return x + torch.log(-torch.expm1(-x))


class MambaMixer(nn.Module):
    """The selective SSM token mixer; input and output (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.d_inner = cfg.d_inner
        self.state_size = cfg.state_size
        self.conv_size = cfg.conv_size
        self.dt_rank = cfg.resolved_dt_rank
        di, N = self.d_inner, self.state_size
        self.in_proj = nn.Linear(cfg.d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(
            di, di, kernel_size=cfg.conv_size, groups=di, padding=cfg.conv_size - 1, bias=True
        )
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, N))
        self.D = nn.Parameter(torch.empty(di))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(di, cfg.d_model, bias=False)
        self.out_proj.residual_scale = True  # type: ignore[attr-defined]
        self.special_init()

    @torch.no_grad()
    def special_init(self) -> None:
        """Reference initialisation of dt_proj, A_log (S4D-real), D and the conv."""
        device = self.A_log.device
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_min, log_max = math.log(DT_MIN), math.log(DT_MAX)
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (log_max - log_min) + log_min)
        self.dt_proj.bias.copy_(inverse_softplus(dt.clamp(min=DT_INIT_FLOOR)))
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=device)
        self.A_log.copy_(torch.log(A).repeat(self.d_inner, 1))  # (d_inner, N): log 1 .. log N
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()

    def _A(self) -> Tensor:
        """A = -exp(A_log) in at least float32 (float64 stays float64)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    # ---- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model); ``state`` (a dict) is read and updated."""
        T = x.shape[1]
        if state is not None and T == 1:
            out = self._fused_step(x[:, 0], state)  # in_proj .. out_proj in one kernel call
            if out is not None:
                return out.unsqueeze(1)
            xi, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)
            return self.out_proj(self._step(xi, z, state).unsqueeze(1))
        xz = self.in_proj(x)  # (B, T, 2 d_inner)
        if state is None and self._inner_ready(xz):  # CPU training: one fused node
            from .kernels.mamba_cpu import mamba_inner

            c, dtp = self.conv1d, self.dt_proj
            y = mamba_inner(xz, c.weight, c.bias, self.x_proj.weight, dtp.weight, dtp.bias,
                            self.A_log, self.D)  # fmt: skip
            return self.out_proj(y)
        xi, z = xz.chunk(2, dim=-1)  # (B, T, d_inner) each
        scan_fn, conv_fn = _cuda_kernels() if x.is_cuda and state is None else (None, None)
        xc = self._conv(xi, state, conv_fn)  # (B, T, d_inner), after SiLU
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.state_size, self.state_size], -1)
        A = self._A()  # (d_inner, N)
        if scan_fn is not None:
            y = self._cuda_scan(scan_fn, xc, dt, A, B, C, z)
        else:  # dt_proj's bias is added inside the scan (the fused kernel does it in place)
            delta = F.linear(dt, self.dt_proj.weight)  # (B, T, d_inner)
            bias = self.dt_proj.bias
            if state is None:
                y = selective_scan(xc, delta, A, B, C, self.D, z, bias, delta_softplus=True)
            else:
                y, state["ssm"] = selective_scan(
                    xc, delta, A, B, C, self.D, z, bias, delta_softplus=True,
                    initial_state=state.get("ssm"), return_last_state=True,
                )  # fmt: skip
        return self.out_proj(y)

    def _inner_ready(self, xz: Tensor) -> bool:
        """True when the fused CPU node (kernels/mamba_cpu.py) applies: CPU, the fused scan
        selected (ARCHLAB_SCAN), one float32/float64 dtype, and its kernels compiled."""
        from .kernels import disable_fused, fused_available, kernel_notice
        from .scan import resolve_scan_impl

        if (
            xz.device.type != "cpu"
            or xz.dtype not in (torch.float32, torch.float64)
            or any(p.dtype != xz.dtype for p in self.parameters())
            or resolve_scan_impl(xz.device) != "fused"
            or not fused_available("mamba_inner")
        ):
            return False
        from .kernels.mamba_cpu import warm_up_inner

        try:
            warm_up_inner(xz.dtype)
        except Exception as exc:  # compile failure: the op-by-op graph from now on
            disable_fused("mamba_inner", exc)
            kernel_notice("mamba_inner", "Mamba: fused conv kernels unavailable, using torch ops")
            return False
        return True

    def _conv(self, xi: Tensor, state: dict | None, conv_fn: Callable | None) -> Tensor:
        """Causal depthwise conv + SiLU over (B, T, d_inner); keeps the last inputs in state."""
        T, K = xi.shape[1], self.conv_size
        xt = xi.transpose(1, 2)  # (B, d_inner, T)
        if state is None:
            if conv_fn is not None:
                w = self.conv1d.weight.squeeze(1)  # (d_inner, K)
                return conv_fn(xt.contiguous(), w, self.conv1d.bias, activation="silu").transpose(
                    1, 2
                )
            out = self.conv1d(xt)[..., :T]  # padding K - 1 on both sides; keep the causal part
        else:
            prev = state.get("conv")
            if prev is None:
                prev = xt.new_zeros(xt.shape[0], self.d_inner, K - 1)
            full = torch.cat([prev.to(xt.dtype), xt], dim=-1)  # (B, d_inner, K - 1 + T)
            state["conv"] = full[..., full.shape[-1] - (K - 1) :]
            out = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        return F.silu(out).transpose(1, 2)

    def _fused_step(self, x: Tensor, state: dict) -> Tensor | None:
        """One decode token x (B, d_model) through the fused CPU kernel (in_proj, conv,
        projections, scan step, gate and out_proj in one call); None when it does not apply
        (GPU, autograd, mixed dtypes, no numba)."""
        from .kernels.decode_cpu import mamba_step

        return mamba_step(self, x, state)

    def _step(self, xi: Tensor, z: Tensor, state: dict) -> Tensor:
        """One token: xi, z (B, d_inner) -> y (B, d_inner); updates state in place."""
        K = self.conv_size
        prev = state.get("conv")
        if prev is None:
            prev = xi.new_zeros(xi.shape[0], self.d_inner, K - 1)
        window = torch.cat([prev.to(xi.dtype), xi.unsqueeze(-1)], dim=-1)  # (B, d_inner, K)
        state["conv"] = window[..., 1:]
        w = self.conv1d.weight.squeeze(1)  # (d_inner, K)
        xc = F.silu((window * w).sum(-1) + self.conv1d.bias)  # (B, d_inner)
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.state_size, self.state_size], -1)
        dtype = torch.promote_types(xc.dtype, torch.float32)  # the scan's compute dtype
        delta = F.softplus(self.dt_proj(dt).to(dtype))
        A = self._A()
        h = state.get("ssm")
        if h is None:
            h = xc.new_zeros(xc.shape[0], self.d_inner, self.state_size, dtype=dtype)
        y, state["ssm"] = selective_step(h, xc, delta, A, B, C, self.D, z)
        return y

    def _cuda_scan(self, scan_fn: Callable, xc, dt, A, B, C, z) -> Tensor:
        """mamba_ssm's selective_scan_fn works in (B, D, T) / (B, N, T) layout."""
        delta = F.linear(dt, self.dt_proj.weight)  # bias is applied inside the kernel
        y = scan_fn(
            xc.transpose(1, 2).contiguous(),
            delta.transpose(1, 2).contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z.transpose(1, 2).contiguous(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return y.transpose(1, 2)


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + Mamba(RMSNorm(x)); no separate MLP (as in the paper).

    A decode token on CPU takes the whole block in one kernel call (kernels/decode_cpu.py)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = MambaMixer(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        if state is not None and x.shape[1] == 1:
            from .kernels.decode_cpu import mamba_block_step

            out = mamba_block_step(self, x, state)
            if out is not None:
                return out, {}
        return x + self.drop(self.mixer(self.norm1(x), state)), {}


SSM_FLAGS = ("state_size", "conv_size", "expand")
SSM_FIELDS = (
    SummaryField("state_size", "State Size", lambda c: c.state_size),
    SummaryField("conv_size", "Conv Size", lambda c: c.conv_size),
    SummaryField("expand", "Expand", lambda c: c.expand),
    SummaryField("dt_rank", "dt Rank", lambda c: c.resolved_dt_rank),
)


def check_ssm(cfg: ModelConfig) -> None:
    """The selective-SSM shape flags (shared with the hybrid)."""
    for flag, value in (
        ("--state-size", cfg.state_size),
        ("--conv-size", cfg.conv_size),
        ("--expand", cfg.expand),
    ):
        if value <= 0:
            raise ConfigError(f"{flag}: must be a positive number (got {value})")
    if cfg.dt_rank < 0:
        raise ConfigError(f"--dt-rank: must be >= 0 (got {cfg.dt_rank})")


def _validate(cfg: ModelConfig) -> None:
    if cfg.mlp != "gelu":
        raise ConfigError(
            f"--mlp {cfg.mlp}: mamba blocks have no MLP (the mixer is the whole block); "
            "SwiGLU applies to dense, moe, hybrid and hypermixer"
        )
    if cfg.bias:
        raise ConfigError(
            "--bias: mamba blocks have no attention or MLP linears (projections are "
            "bias-free as in Mamba); --bias applies to dense, moe, hybrid and hypermixer"
        )
    check_ssm(cfg)


SPEC = ArchitectureSpec(
    name="mamba",
    aliases=("ssm",),
    display_name="Mamba",
    block=MambaBlock,
    fields=SSM_FLAGS,
    norm="rmsnorm",
    learned_positions=False,  # the recurrence carries order; --use-rope changes nothing
    positions=lambda c: "none (recurrent)",
    # a Mamba block has ~6 d^2 parameters, half a dense block: twice the layers (as in its paper)
    size_override=lambda base: dict(n_layers=2 * base["n_layers"]),
    # Mamba has no MLP: its hidden width is the expanded inner dimension
    hidden_dim=lambda c: c.d_inner,
    summary_fields=SSM_FIELDS,
    validate=_validate,
    # the SSM state h: d_inner x N per layer (the conv window of conv_size - 1 inputs is not)
    state_elements=lambda c, i, seq_len: c.d_inner * c.state_size,
    linear_in_length=True,
)

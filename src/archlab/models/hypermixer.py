"""HyperMixer block (Mai et al. 2023, arXiv 2203.03691), made causal at linear cost.

Block (pre-norm): x + TokenMix(N(x)); x + MLP(N(x)).

HyperMixing mixes tokens with an MLP whose weights are *generated* per token: two small
hypernetworks h1, h2 (d -> hidden -> d', GELU) map every token (plus its position) to a row of
W1 and of W2 in R^{T x d'}, and the token mixer is ``out = W2 · GELU(W1^T X)``: every output
token reads the same d' "slots" W1^T X (a d' x d summary of the sequence) through its own
row of W2.  The original is bidirectional (W1^T X sums over all T tokens).

Causal form.  Position t may only summarise tokens i <= t, so it uses the running sum

    S_t = sum_{i<=t} w1_i x_i^T                     (d' x d)
    out_t = w2_t · GELU(S_t / (t + 1))              (d)

The division by t+1 turns the sum into a running mean: without it the pre-activation grows
with t (linearly for coherent tokens), so GELU would run in a different regime at every
position and the layer would behave differently at T=80 and T=4096.  It plays the role of
softmax normalisation in attention, and it is what makes a single decode state
``{"S": (B, d', d), "count": n}`` enough to continue: each new token costs O(d' d).
What limits the causal form, and what does not.  Token i enters S_t with weight 1/(t+1):
the mixer has no recency bias (the previous token is as diluted as the first), and one
summary S_t must serve every query: w2_t only chooses how to read the d' slots, it cannot
select one earlier token by content as attention does.  That limits precise recall and
copying over long contexts (MQAR-style retrieval) and makes local order a matter of the
position-aware hypernetworks.  It does *not* stop the model learning local statistics: the
token's own identity reaches the head through the residual stream and the MLPs, and a
HyperMixer learns text about as fast as a dense Transformer (nano on the built-in stories,
80 steps of 16 x 128, AdamW 1e-3: val 2.44 vs dense 2.42, unigram entropy 5.23; see
tests/test_learning.py).  Earlier versions stalled at the unigram entropy; that was an
initialisation bug, not the causal form: see "Residual scale" below.

Residual scale.  The mixer's output norm makes its output RMS 1 whatever the weights, while
the token embeddings it is added to have RMS ~0.02: at gain 1 the first mixer buried every
token's identity (35x the stream; 100-700x without the norm, the generated weights being of
order 1), and the model could not even learn bigram statistics.  The branch therefore starts
at zero, by its last affine map, as GPT-2 scales residual projections by 1/sqrt(2L) and
ResNets zero the last norm of each branch (Goyal et al. 2017): the output norm's gain is 0 at
init (it receives a gradient at once, so the mixer switches on at the first step); without
the output norm the generator of the read-out W2 starts at zero instead (W1, which sets the
GELU's regime, keeps the official init); with tied hypernetworks and no output norm W2 = W1,
so the shared generator's last projection takes GPT-2's residual std 0.02 / sqrt(2L) (the
mixer then starts near its linear regime; no init can avoid that in this combination).
``archlab.models.init_audit`` measures every branch against its stream.  Measured (plain
loop above, val after 80 steps): gain 1 (old) 5.25, gain 0.015 (the MLP branches' scale)
2.59, gain 0 2.44.  Without the output norm a sane start is not enough: W2's generator at
zero still ends at 5.01, because Adam's per-weight steps grow an output that sums d' order-one
slots past the stream within a few steps; the output norm (the official default) is what
keeps this branch's scale, so keep it.

Because GELU sits between the prefix sum and the read-out, S_t cannot be folded away as in
linear attention: every position needs its own d' x d matrix.  Materialising all of them costs
B*T*d'*d floats (1 GiB at B=8, T=4096, d=128, d'=64), so :func:`causal_hypermix` processes
positions in chunks carrying S, and its custom backward recomputes each chunk instead of
storing it.  Peak memory is O(B*C*d'*d + B*(T/C)*d'*d) for chunk length C.  On CPU a fused
numba kernel (``kernels/hypermix_cpu.py``) does the same in one pass over time with each
column block of S_t in registers, no (B, C, d', d) tensor at all; the chunked torch version
remains for GPUs and as the fallback.

Position information.  Without it the hypernetworks see only content and the summary S_t is
a bag of the prefix tokens.  As in the official code (idiap/hypermixing), fixed sinusoidal
encodings of the absolute position are added to the hypernetworks' input inside the mixer
(the mixed values X stay position-free).  They need no parameters, work at any length (also
when the model uses RoPE or no learned positions at all) and every layer gets them directly,
not diluted through the residual stream.  Unlike the official code we do not multiply x by
sqrt(d): our input is layer-normalised, so x and the encoding already have comparable norms.

Defaults follow the official implementation: untied hypernetworks, GELU, a LayerNorm on the
mixer's output (the generated weights have no controlled scale; the norm gives the residual
branch a fixed one).  ``cfg.extra["hypermixer_tied"]`` ties h1 and h2 and
``cfg.extra["hypermixer_layer_norm"] = False`` removes the output norm.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hypermixer_rustgpt import RustGPTHyperMixerBlock
from .layers import make_mlp, make_norm
from .spec import MLP_FLAGS, ArchitectureSpec, SummaryField

if TYPE_CHECKING:
    from ..config import ModelConfig

# Two ways to get S_t for every position of a chunk of length C, both exact:
#  - "matmul" (small C): S = (tril * w1)^T X as one batched matmul; C flops per element of S
#    but a single write, which on CPU is ~1.8x faster than the cumsum (measured, 2 threads).
#  - "cumsum" (large C): outer products then an in-place cumsum; fewest flops, used on GPUs
#    where long chunks (few kernel launches) matter more than memory passes.
_MATMUL_MAX_CHUNK = 32
_CPU_CHUNK = 16  # best of 4..64 on CPU at B=8, d=128, d'=64 (fwd+bwd)
_GPU_CHUNK_ELEMENTS = 1 << 24  # one chunk's (B, C, d', d) tensor: 64 MiB in float32


def sinusoidal_positions(start: int, length: int, dim: int, device: torch.device) -> Tensor:
    """Vaswani et al. encodings of positions start..start+length-1: (length, dim), float32."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    half = (dim + 1) // 2
    freq = torch.exp(
        torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) * 2 / dim)
    )
    angles = pos * freq  # (length, half)
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # sin, cos interleaved
    return pe[:, :dim]


def _auto_chunk(x: Tensor, mixing_dim: int) -> int:
    B, T, D = x.shape
    if x.device.type == "cpu":
        return min(T, _CPU_CHUNK)
    return max(1, min(T, _GPU_CHUNK_ELEMENTS // max(1, B * mixing_dim * D)))


def _chunk_prefix(s: Tensor, w1: Tensor, x: Tensor, inv_n: Tensor) -> Tensor:
    """P_t = (s + sum_{i<=t} w1_i x_i^T) / n_t at every position t of a chunk: (B, C, M, D)."""
    C = w1.shape[1]
    if C <= _MATMUL_MAX_CHUNK:
        tril = torch.ones(C, C, dtype=x.dtype, device=x.device).tril_()  # (t, i)
        left = (tril * inv_n[:, None])[None, :, :, None] * w1[:, None]  # (B, t, i, M)
        p = torch.matmul(left.transpose(-1, -2), x.unsqueeze(1))  # (B, t, M, D)
        return p.addcmul_(s.unsqueeze(1), inv_n.view(1, C, 1, 1))
    outer = w1.unsqueeze(-1) * x.unsqueeze(-2)  # (B, C, M, D)
    outer[:, 0] += s  # folding the carry into the first row costs no extra pass
    return outer.cumsum_(1).mul_(inv_n.view(1, C, 1, 1))


def _mix_forward(
    w1: Tensor, x: Tensor, w2: Tensor, s0: Tensor, start: int, chunk: int
) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
    """Chunked forward: (out (B, T, D), final S, S at each chunk start, 1/n_t (T,))."""
    T = w1.shape[1]
    out = x.new_empty(x.shape)  # (B, T, D)
    inv_n = 1.0 / torch.arange(start + 1, start + T + 1, device=x.device, dtype=x.dtype)
    s = s0
    boundaries = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        boundaries.append(s)
        w1c, xc = w1[:, c0:c1], x[:, c0:c1]
        a = F.gelu(_chunk_prefix(s, w1c, xc, inv_n[c0:c1]))  # (B, C, M, D)
        out[:, c0:c1] = torch.matmul(w2[:, c0:c1].unsqueeze(-2), a).squeeze(-2)
        s = s + torch.matmul(w1c.transpose(1, 2), xc)  # (B, M, D)
    return out, s, boundaries, inv_n


class _CausalHyperMix(torch.autograd.Function):
    """out_t = w2_t · GELU(S_t / n_t), S_t = S0 + sum_{i<=t} w1_i x_i^T, n_t = start + t + 1.

    Forward and backward walk the sequence in chunks; the backward recomputes each chunk's
    S from the saved chunk-boundary states, so no (B, T, d', d) tensor is ever stored.
    Gradients (R_i = sum_{t>=i} dL/dS_t):  dw1_i = R_i x_i,  dx_i = R_i^T w1_i,
    dw2_t = GELU(P_t) g_t,  dS0 = R_0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, w1: Tensor, x: Tensor, w2: Tensor, s0: Tensor, start: int, chunk: int
    ) -> tuple[Tensor, Tensor]:
        out, s, boundaries, inv_n = _mix_forward(w1, x, w2, s0, start, chunk)
        ctx.save_for_backward(w1, x, w2, torch.stack(boundaries, dim=1), inv_n)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(s)
        return out, s

    @staticmethod
    def backward(ctx, g_out: Tensor, _g_s: Tensor | None):  # type: ignore[override]
        w1, x, w2, boundaries, inv_n = ctx.saved_tensors
        chunk = ctx.chunk
        B, T, M = w1.shape
        D = x.shape[-1]
        g_out = g_out.contiguous()
        dw1, dx, dw2 = torch.empty_like(w1), torch.empty_like(x), torch.empty_like(w2)
        carry = torch.zeros_like(boundaries[:, 0])  # sum of dL/dS_t over later chunks
        starts = list(range(0, T, chunk))
        for k in reversed(range(len(starts))):
            c0 = starts[k]
            c1 = min(T, c0 + chunk)
            C = c1 - c0
            w1c, xc, w2c, gc = w1[:, c0:c1], x[:, c0:c1], w2[:, c0:c1], g_out[:, c0:c1]
            inv = inv_n[c0:c1]
            p = _chunk_prefix(boundaries[:, k], w1c, xc, inv)  # (B, C, M, D)
            dw2[:, c0:c1] = torch.matmul(F.gelu(p), gc.unsqueeze(-1)).squeeze(-1)
            # dL/dS_t = GELU'(P_t) * (w2_t g_t^T) / n_t   (1/n_t folded into w2)
            g_a = (w2c * inv[:, None]).unsqueeze(-1) * gc.unsqueeze(-2)
            ds = torch.ops.aten.gelu_backward(g_a, p)  # (B, C, M, D)
            if C <= _MATMUL_MAX_CHUNK:
                # R_i never materialised: contract dS_t with x_i / w1_i for all (t, i), mask t >= i
                mask = torch.ones(C, C, dtype=x.dtype, device=x.device).tril_()  # (t, i)
                q = torch.matmul(ds.view(B, C * M, D), xc.transpose(1, 2)).view(B, C, M, C)
                dw1_c = (q * mask[:, None, :]).sum(1) + torch.matmul(carry, xc.transpose(1, 2))
                dw1[:, c0:c1] = dw1_c.transpose(1, 2)  # (B, C, M)
                z = torch.matmul(w1c.unsqueeze(1), ds)  # (B, t, i, D) = w1_i^T dS_t
                dx[:, c0:c1] = (z * mask[:, :, None]).sum(1) + torch.matmul(w1c, carry)
                carry = carry + ds.sum(1)
            else:
                ds[:, -1] += carry
                r = ds.flip(1).cumsum_(1).flip(1)  # (B, C, M, D): R_i
                carry = r[:, 0]
                dw1[:, c0:c1] = torch.matmul(r, xc.unsqueeze(-1)).squeeze(-1)
                dx[:, c0:c1] = torch.matmul(w1c.unsqueeze(-2), r).squeeze(-2)
        return dw1, dx, dw2, carry, None, None


HYPERMIX_IMPLS = ("fused", "chunked")


def resolve_hypermix_impl(device: torch.device, impl: str | None = None) -> str:
    """``impl``, else $ARCHLAB_HYPERMIX, else fused on CPU when its kernel loads, else chunked."""
    from .kernels import fused_available, kernel_notice

    choice = impl or os.environ.get("ARCHLAB_HYPERMIX", "").strip().lower() or None
    if choice is not None and choice not in HYPERMIX_IMPLS:
        raise ValueError(
            f"ARCHLAB_HYPERMIX={choice!r}: expected one of {', '.join(HYPERMIX_IMPLS)}"
        )
    if choice == "chunked" or device.type != "cpu":
        return "chunked"
    if fused_available("hypermix"):
        return "fused"
    kernel_notice("hypermix", "HyperMixing: fused CPU kernel unavailable, using the chunked mixer")
    return "chunked"


def _fused_ready(dtype: torch.dtype) -> bool:
    from .kernels import disable_fused, hypermix_cpu, kernel_notice

    try:
        hypermix_cpu.warm_up(dtype)
    except Exception as exc:  # a numba that cannot compile here: never fail training
        disable_fused("hypermix", exc)
        kernel_notice("hypermix", "HyperMixing: fused CPU kernel failed, using the chunked mixer")
        return False
    return True


def causal_hypermix(
    w1: Tensor,
    x: Tensor,
    w2: Tensor,
    s0: Tensor | None = None,
    start: int = 0,
    chunk: int | None = None,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal HyperMixing read-out.  w1, w2: (B, T, M); x: (B, T, D); s0: (B, M, D).

    Returns out (B, T, D) with out_t = w2_t · GELU(S_t / (start + t + 1)) and the final
    running sum S (B, M, D) (no gradient) to continue from.  Computed in at least float32.
    On CPU the fused numba kernel runs (``kernels/hypermix_cpu.py``); ``impl="chunked"`` (or
    ``ARCHLAB_HYPERMIX=chunked``) forces the chunked torch version, whose chunk length is
    ``chunk``.
    """
    B, T, M = w1.shape
    D = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    if s0 is None:
        s0 = x.new_zeros(B, M, D, dtype=dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (w1, x, w2, s0))
    if resolve_hypermix_impl(x.device, impl) == "fused" and _fused_ready(dtype):
        from .kernels import hypermix_cpu

        with torch.autocast("cpu", enabled=False):
            out, s = hypermix_cpu.fused_hypermix(
                w1.to(dtype), x.to(dtype), w2.to(dtype), s0.to(dtype), start, needs_grad
            )
        return out.to(x.dtype), s
    chunk = chunk or _auto_chunk(x, M)
    args = (w1.to(dtype), x.to(dtype), w2.to(dtype), s0.to(dtype), start, chunk)
    if needs_grad:
        out, s = _CausalHyperMix.apply(*args)
    else:  # inference / decoding: no chunk-boundary states kept
        out, s = _mix_forward(*args)[:2]
    return out.to(x.dtype), s


class HyperNetwork(nn.Module):
    """Token-wise MLP d -> hidden -> d' (GELU) generating one row of a token-mixing weight.

    ``out_init``: how the last projection starts: ``"official"`` (xavier, gain sqrt 2),
    ``"zero"`` (the generated weights start at 0) or ``"residual"`` (GPT-2's residual std
    0.02 / sqrt(2 n_layers), given as ``residual_std``); see :class:`CausalHyperMixing`.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        out_dim: int,
        bias: bool,
        out_init: str = "official",
        residual_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, out_dim, bias=bias)
        self.out_init = out_init
        self.residual_std = residual_std

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))

    @torch.no_grad()
    def special_init(self) -> None:
        """Official init (xavier_uniform, gain sqrt 2): generated weights of order 1, so the
        token-mixing GELU works in its non-linear range from the start (GPT-2's std 0.02 would
        make W1, W2 ~1e-2 and the mixer effectively linear and near zero)."""
        nn.init.xavier_uniform_(self.fc.weight, gain=math.sqrt(2.0))
        if self.out_init == "zero":
            nn.init.zeros_(self.proj.weight)
        elif self.out_init == "residual":
            nn.init.normal_(self.proj.weight, 0.0, self.residual_std)
        else:
            nn.init.xavier_uniform_(self.proj.weight, gain=math.sqrt(2.0))


class CausalHyperMixing(nn.Module):
    """Causal token mixer.  Decode state: {"S": (B, d', d) float32, "count": int}."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hidden, m = cfg.d_model, cfg.resolved_hyper_hidden, cfg.resolved_mixing_dim
        self.mixing_dim = m
        self.tied = bool(cfg.extra.get("hypermixer_tied", False))
        use_norm = bool(cfg.extra.get("hypermixer_layer_norm", True))
        # the residual branch starts small (see the module docstring): with the output norm,
        # its gain does it; without, the read-out W2 starts at zero (untied) or, when W2 = W1,
        # the shared generator starts at GPT-2's residual scale
        w1_init = "residual" if self.tied and not use_norm else "official"
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.hyper_w1 = HyperNetwork(d, hidden, m, cfg.bias, w1_init, resid_std)
        self.hyper_w2 = (
            None
            if self.tied
            else HyperNetwork(d, hidden, m, cfg.bias, "official" if use_norm else "zero")
        )
        self.out_norm = make_norm(cfg) if use_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.chunk_size: int | None = None  # None: automatic (see _auto_chunk)
        self._pe_table: Tensor | None = None  # cached sinusoidal positions (not a parameter)

    @torch.no_grad()
    def special_init(self) -> None:
        """Zero gain on the output norm: the branch adds exactly 0 at init (as the last norm
        of a ResNet branch, Goyal et al. 2017), and the gain learns its scale from step one."""
        if self.out_norm is not None:
            nn.init.zeros_(self.out_norm.weight)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> Tensor:
        B, T, D = x.shape
        pe = self._positions(pos, T, D, x.device).to(x.dtype)  # (T, D)
        if state is not None and T == 1 and "S" in state:
            out = self._fused_step(x[:, 0], pe[0], state, pos)
            if out is not None:
                out = out.unsqueeze(1)
                return self.drop(self.out_norm(out) if self.out_norm is not None else out)
        # hypernetwork input: token + absolute position; the mixed values stay x
        hyp_in = x + pe  # (B, T, D)
        w1 = self.hyper_w1(hyp_in)  # (B, T, M)
        w2 = w1 if self.hyper_w2 is None else self.hyper_w2(hyp_in)  # (B, T, M)
        s0, start = None, 0
        if state is not None and "S" in state:
            s0, start = state["S"], state["count"]
            if start != pos:
                raise ValueError(f"hypermixer decode state holds {start} tokens, not {pos}")
        out, s = causal_hypermix(w1, x, w2, s0, start, self.chunk_size)  # (B, T, D)
        if state is not None:
            state["S"], state["count"] = s, start + T
        if self.out_norm is not None:
            out = self.out_norm(out)
        return self.drop(out)

    def _positions(self, pos: int, T: int, D: int, device: torch.device) -> Tensor:
        """Rows pos .. pos+T-1 of a cached sinusoidal table (bit-identical to computing them:
        the same float32 positions times the same frequencies), grown by doubling."""
        table = self._pe_table
        if table is None or table.device != device or table.shape[0] < pos + T:
            n = max(pos + T, 2 * (table.shape[0] if table is not None else 0), 256)
            table = self._pe_table = sinusoidal_positions(0, n, D, device)
        return table[pos : pos + T]

    def _fused_step(self, x: Tensor, pe: Tensor, state: dict, pos: int) -> Tensor | None:
        """One decode token through the fused CPU kernel (both hypernetworks, the running-sum
        update and the read-out in one call); None when it does not apply."""
        from .kernels.decode_cpu import hyper_step

        return hyper_step(self, x, state, pos, pe)


class HyperMixerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = CausalHyperMixing(cfg)
        self.norm2 = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        if state is not None and x.shape[1] == 1:  # a decode token on CPU: one kernel call
            from .kernels.decode_cpu import hyper_block_step

            out = hyper_block_step(self, x, state, pos)
            if out is not None:
                return out, {}
        x = x + self.mixer(self.norm1(x), state, pos)
        x = x + self.ffn(self.norm2(x))
        return x, {}


SPEC = ArchitectureSpec(
    name="hypermixer",
    display_name="HyperMixer",
    block=HyperMixerBlock,
    fields=(*MLP_FLAGS, "hypernetwork_hidden_dim"),
    # token mixing (~0.5 d^2) + MLP (8 d^2) per block: add layers to match dense's 12 d^2
    size_override=lambda base: dict(n_layers=max(1, round(base["n_layers"] * 12 / 8.6))),
    summary_fields=(
        SummaryField(
            "hypernetwork_hidden_dim", "Hypernetwork Hidden Dim", lambda c: c.resolved_hyper_hidden
        ),
        SummaryField(
            "mixing_dim",
            "Token-Mixing Dim",
            lambda c: c.resolved_mixing_dim,
            when=lambda c: c.preset != "rustgpt",  # the seed's mixer mixes over positions
        ),
    ),
    rustgpt_block=RustGPTHyperMixerBlock,
    # sinusoidal positions enter the hypernetworks; --use-rope only drops the learned table
    positions=lambda c: f"{'learned + ' if c.uses_learned_positions else ''}sinusoidal (mixer)",
    state_elements=lambda c, i, seq_len: c.resolved_mixing_dim * c.d_model,  # running S (d' x d)
    linear_in_length=True,
)

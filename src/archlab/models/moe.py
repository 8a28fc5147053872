"""Mixture-of-experts Transformer block: x + Attn(N(x)); x + MoE(N(x)).

The MoE feed-forward replaces the dense MLP with ``num_experts`` expert MLPs (each the GELU
MLP of ``layers.MLP``, width ``expert_d_ff``, or with ``--mlp swiglu`` the ``layers.SwiGLU`` of
matched width) and a linear router that sends every token to its ``top_k`` experts (Shazeer
et al. 2017; Switch, Fedus et al. 2021; Mixtral, Jiang et al. 2024). With
``expert_d_ff = d_ff // top_k`` the parameters used per token match the dense MLP.

Mixtral equivalence: with ``--use-rope --use-rmsnorm --mlp swiglu``, no biases and
``top_k >= 2`` this block is exactly Mixtral's (transformers' ``MixtralForCausalLM`` gives the
same logits with mapped weights; tests/test_swiglu.py). Capacity dropping (training only) and
the k = 1 Switch gate below are the only routing differences from Mixtral.

Routing (Mixtral form): p = softmax(router(x)) over all E experts; the top-k probabilities are
renormalised to sum to 1 and weight the chosen experts' outputs. With top_k = 1 the weight
would then always be 1 and the router would learn only from the auxiliary loss, so for k = 1
we use the Switch gate instead: the raw probability of the chosen expert.

Auxiliary losses (returned to the trainer, weighted by ``aux_loss_coef`` / ``z_loss_coef``):

- load balancing (Switch eq. 4-6 as Mixtral computes it): ``E * sum_e f_e * P_e`` with
  ``f_e`` = (token-slots routed to e) / tokens and ``P_e`` = mean router probability of e.
  ``sum_e f_e = top_k``, so a perfectly balanced router (f_e = k/E) or a uniform one
  (P_e = 1/E) gives exactly ``top_k``; imbalance concentrated where the router is confident
  raises it. Gradients flow through ``P_e`` (``f_e`` is a count).
- router z-loss (ST-MoE, Zoph et al. 2022): ``mean_tokens logsumexp(logits)^2``, which keeps
  router logits small and the softmax numerically tame.

Capacity (optional, ``capacity_factor > 0``, training only): each expert accepts at most
``ceil(capacity_factor * tokens * top_k / E)`` token-slots per forward; overflow slots are
dropped (contribute zero, the other chosen experts' weights are not renormalised), so a token
whose every slot is dropped passes through the residual only. Slots are admitted in order of
sequence position, then batch row, then choice rank. Ordering by position first keeps dropping
causal: a later token can never take the slot of an earlier one, so changing token t+1 never
changes outputs at positions <= t (rank-first priority, as in GShard, would leak the future).
The price is that late positions are dropped first when an expert overflows. Capacity is not
applied in eval mode (the standard practice): decoding sees one token at a time, so batch
composition must not change the result, and cached decoding equals the full forward.

Dispatch: slots are sorted by expert (a stable sort, so capacity priority survives), each
expert runs once on its contiguous slice and the weighted results are added back with
``index_add_``. A loop over experts, none over tokens; measured on CPU it is as fast as a
padded ``bmm`` form under balanced routing and much faster under skewed routing.

Decoding (a cache in use, eval mode, at most E tokens): that machinery (sort, bincount,
scatter, ~15 small ops) cost more than the experts themselves for one token, so each token's
k experts run directly instead, and the auxiliary losses (training-only) are not computed.
``benchmarks/bench_generate.py --archs dense,moe`` measures the step against dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .attention import CausalSelfAttention, kv_cache_elements
from .layers import make_mlp, make_norm
from .spec import (
    ATTENTION_FIELDS,
    MLP_FLAGS,
    ArchitectureSpec,
    SummaryField,
    check_attention_heads,
)

if TYPE_CHECKING:
    from ..config import ModelConfig


@dataclass
class Routing:
    """The router's decision for N tokens."""

    logits: Tensor  # (N, E) float32 (float64 for a float64 model)
    probs: Tensor  # (N, E) softmax over all experts
    weights: Tensor  # (N, k) gate of each chosen expert (sums to 1 per token when k > 1)
    experts: Tensor  # (N, k) chosen expert ids, best first


@dataclass
class Dispatch:
    """Token-slots grouped by expert, in capacity-priority order within each expert."""

    token: Tensor  # (S,) flat token index of each kept slot
    weight: Tensor  # (S,) gate of each kept slot
    counts: list[int]  # kept slots per expert; the slices of ``token`` in expert order
    routed: Tensor  # (E,) slots routed to each expert before any dropping (float)


class MoELayer(nn.Module):
    """Top-k routed mixture of expert MLPs (GELU or SwiGLU) with balancing and z-losses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        # each expert is layers.MLP (d -> expert_d_ff -> d, GELU) or layers.SwiGLU of the
        # matched width (--mlp swiglu, Mixtral's experts); proj.residual_scale = True
        self.experts = nn.ModuleList(
            make_mlp(cfg, cfg.resolved_expert_d_ff) for _ in range(cfg.num_experts)
        )

    # ---- bookkeeping -------------------------------------------------------------------
    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.experts[0].parameters())

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not use: (E - k) experts' worth."""
        return (self.num_experts - self.top_k) * self.params_per_expert()

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for this forward, or None when nothing is dropped."""
        if self.capacity_factor <= 0 or not self.training:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    # ---- routing -----------------------------------------------------------------------
    def route(self, x: Tensor) -> Routing:
        """x (N, D) -> the router's top-k choice; softmax in at least float32."""
        logits = self.router(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, E)
        probs = logits.softmax(dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_p
        return Routing(logits, probs, weights, top_e)

    def dispatch(self, routing: Routing, batch: int, seq: int) -> Dispatch:
        """Group the N*k slots by expert; drop overflow slots when a capacity applies.

        Tokens are flat in (B, T) order; priority is position, then batch row, then rank.
        """
        E, k = self.num_experts, self.top_k
        N = batch * seq
        dev = routing.experts.device
        # flat token ids in priority order (T, B) -> (T*B,), then k slots each -> (T*B*k,)
        token = torch.arange(N, device=dev).view(batch, seq).t().reshape(-1)
        token = token.repeat_interleave(k)
        expert = routing.experts[token, torch.arange(k, device=dev).repeat(N)]
        weight = routing.weights[token, torch.arange(k, device=dev).repeat(N)]
        routed = torch.bincount(expert, minlength=E)  # (E,)
        order = torch.argsort(expert, stable=True)  # group by expert, keep priority
        token, weight = token[order], weight[order]
        cap = self.capacity(N)
        if cap is not None:
            start = routed.cumsum(0) - routed  # (E,) first sorted index of each expert
            rank_in_expert = torch.arange(N * k, device=dev) - start[expert[order]]
            keep = rank_in_expert < cap
            token, weight = token[keep], weight[keep]
            counts = routed.clamp(max=cap).tolist()
        else:
            counts = routed.tolist()
        return Dispatch(token, weight, counts, routed.float())

    # ---- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor, inference: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, D) -> (out, aux). ``inference`` (a decode cache is in use): no auxiliary
        losses (nothing trains on them), and a few tokens take the per-expert path below."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        if inference and not self.training and B * T <= self.num_experts:
            return self._forward_few(flat).view(B, T, D), {}
        routing = self.route(flat)
        if inference and not self.training:
            return self._forward_sorted(flat, routing, B, T)[0].view(B, T, D), {}
        out, plan = self._forward_sorted(flat, routing, B, T)

        # auxiliary losses over all N tokens (routing before any capacity drop)
        f = plan.routed / (B * T)  # (E,) sums to top_k
        P = routing.probs.mean(dim=0)  # (E,)
        load_balance = self.num_experts * (f * P).sum()
        z_loss = torch.logsumexp(routing.logits, dim=-1).square().mean()
        aux = {
            "aux_loss": self.aux_loss_coef * load_balance + self.z_loss_coef * z_loss,
            "load_balance_loss": load_balance,
            "z_loss": z_loss,
            "expert_counts": plan.routed.detach(),
        }
        return out.view(B, T, D), aux

    def _forward_sorted(
        self, flat: Tensor, routing: Routing, batch: int, seq: int
    ) -> tuple[Tensor, Dispatch]:
        """All slots sorted by expert, each expert once on its slice: (N, D) and the plan."""
        plan = self.dispatch(routing, batch, seq)
        xs = flat[plan.token]  # (S, D) slots grouped by expert
        outs = [
            self.experts[e](seg) for e, seg in enumerate(xs.split(plan.counts)) if seg.shape[0] > 0
        ]
        ys = torch.cat(outs) if outs else xs  # (S, D)
        ys = ys * plan.weight.to(ys.dtype)[:, None]
        # ys may be bf16 under autocast while flat is float32: accumulate in ys's dtype
        return ys.new_zeros(flat.shape).index_add_(0, plan.token, ys), plan  # (N, D)

    def _forward_few(self, flat: Tensor) -> Tensor:
        """A few tokens (one decoding step), eval mode: the router's choice read off on the
        host and the chosen experts run directly (``infer``: no submodule calls), without the
        sort, bincount and scatter that pay off only for many tokens. Same routing as
        ``route`` (softmax, top-k on the probabilities, renormalised for k > 1)."""
        logits = self.router(flat)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # (N, k)
        out = None
        for n, (ps, es) in enumerate(zip(top_p.tolist(), top_e.tolist(), strict=True)):
            total = sum(ps) if self.top_k > 1 else 1.0
            row = flat[n : n + 1] if len(flat) > 1 else flat  # (1, D)
            y = None
            for p, e in zip(ps, es, strict=True):
                ye = self.experts[e].infer(row)  # (1, D)
                y = ye.mul_(p / total) if y is None else y.add_(ye, alpha=p / total)
            out = y if out is None else torch.cat([out, y])
        return out  # (N, D)


class MoEBlock(nn.Module):
    """Pre-norm Transformer block whose feed-forward is a mixture of experts."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.mixer = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.ffn = MoELayer(cfg)

    def forward(self, x: Tensor, state: dict | None = None, pos: int = 0) -> tuple[Tensor, dict]:
        x = x + self.mixer(self.norm1(x), state, pos)
        y, aux = self.ffn(self.norm2(x), inference=state is not None)
        return x + y, aux


# Each expert is its own module (a ModuleList of MLPs): building 4,096 of them per layer takes
# ~40 s even on the meta device (`archlab summary`), a million would take hours. Fine-grained
# MoEs of the field stay far below (DeepSeek-V3: 256 routed experts).
MAX_EXPERTS = 4096


def _validate(cfg: ModelConfig) -> None:
    check_attention_heads(cfg)
    if cfg.num_experts <= 0:
        raise ConfigError(f"--num-experts: must be a positive number (got {cfg.num_experts})")
    if cfg.num_experts > MAX_EXPERTS:
        raise ConfigError(
            f"--num-experts: at most {MAX_EXPERTS} (got {cfg.num_experts}): each expert is its "
            "own module, and building more would take minutes to hours"
        )
    if cfg.top_k <= 0:
        raise ConfigError(f"--expert-capacity: must be a positive number (got {cfg.top_k})")
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(
            f"--expert-capacity: top_k {cfg.top_k} exceeds --num-experts {cfg.num_experts}"
        )
    if cfg.capacity_factor < 0:
        raise ConfigError(
            f"--capacity-factor: must be >= 0 (got {cfg.capacity_factor}; 0 disables)"
        )


SPEC = ArchitectureSpec(
    name="moe",
    display_name="MixtureOfExperts",
    block=MoEBlock,
    fields=("n_heads", *MLP_FLAGS, "num_experts", "top_k", "capacity_factor"),
    summary_fields=(
        *ATTENTION_FIELDS,
        SummaryField("num_experts", "Number of Experts", lambda c: c.num_experts),
        SummaryField("top_k", "Experts per Token (top-k)", lambda c: c.top_k),
        SummaryField("expert_hidden_dim", "Expert Hidden Dim", lambda c: c.expert_ffn_hidden),
        SummaryField("capacity_factor", "Capacity Factor", lambda c: c.capacity_factor),
    ),
    validate=_validate,
    state_elements=lambda c, i, seq_len: kv_cache_elements(c, seq_len),
)

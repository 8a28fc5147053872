"""Mixture-of-experts block: routing, auxiliary losses, capacity, causality, decoding, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab import ConfigError, ModelConfig, build_model, count_parameters, preset_config
from archlab.models.moe import MoEBlock, MoELayer


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        architecture="moe",
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=64,
        num_experts=4,
        top_k=2,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def make_layer(seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    cfg = small_cfg(**kw)
    layer = MoELayer(cfg)
    for p in layer.parameters():  # a livelier init than GPT-2's, so routing varies
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


def reference_moe(layer: MoELayer, x: torch.Tensor, dropped: set[tuple[int, int]] = frozenset()):
    """Naive per-token, per-choice loop; ``dropped`` holds (token, expert) slots to skip."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        logits = layer.router.weight @ flat[n]
        probs = torch.softmax(logits.double(), dim=-1)
        top = torch.argsort(probs, descending=True)[: layer.top_k]
        gates = probs[top] / probs[top].sum() if layer.top_k > 1 else probs[top]
        for g, e in zip(gates, top.tolist(), strict=True):
            if (n, e) in dropped:
                continue
            mlp = layer.experts[e]
            h = F.gelu(mlp.fc(flat[n]), approximate="tanh")
            out[n] += g.to(out.dtype) * mlp.proj(h)
    return out.view_as(x)


def routed_to_first_experts(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Make every token choose experts 0, 1, ... in that order: only x[..., 0] feeds the
    router, with decreasing weights; other features still make the expert outputs differ."""
    with torch.no_grad():
        layer.router.weight.zero_()
        E = layer.num_experts
        layer.router.weight[:, 0] = torch.linspace(2.0, 0.0, E)
        x = x.clone()
        x[..., 0] = 3.0
    return x


# ---- routing --------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [2, 3])
def test_chosen_weights_sum_to_one_and_renormalise_softmax(top_k: int) -> None:
    layer = make_layer(num_experts=6, top_k=top_k)
    x = torch.randn(50, 32)
    r = layer.route(x)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(50), atol=1e-6, rtol=0)
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)
    assert torch.equal(r.experts, top_e)
    torch.testing.assert_close(r.weights, top_p / top_p.sum(-1, keepdim=True))
    assert (r.weights[:, :-1] >= r.weights[:, 1:]).all()  # best first


def test_top1_uses_switch_gate_so_router_learns_from_task_loss() -> None:
    layer = make_layer(top_k=1)
    x = torch.randn(2, 5, 32)
    r = layer.route(x.reshape(-1, 32))
    torch.testing.assert_close(r.weights[:, 0], r.probs.max(-1).values)
    assert (r.weights < 1).all()
    y, _ = layer(x)
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


# ---- auxiliary losses -------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_uniform_router_gives_balance_loss_top_k(top_k: int) -> None:
    layer = make_layer(top_k=top_k)
    with torch.no_grad():
        layer.router.weight.zero_()  # equal logits: P_e = 1/E for every token
    _, aux = layer(torch.randn(3, 7, 32))
    assert aux["load_balance_loss"].item() == pytest.approx(top_k, abs=1e-6)
    assert aux["z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-5)


def test_balanced_assignment_gives_balance_loss_top_k_with_uneven_probs() -> None:
    """Token type j goes to experts j (logit 2) and j+1 (logit 1): each expert receives
    exactly k/E of the slots although P_e is far from uniform per token."""
    E, k = 4, 2
    layer = make_layer(num_experts=E, top_k=k)
    with torch.no_grad():
        layer.router.weight.zero_()
        for j in range(E):
            layer.router.weight[j, j] = 2.0
            layer.router.weight[(j + 1) % E, j] = 1.0
    x = torch.zeros(2, 2 * E, 32)
    for t in range(2 * E):
        x[:, t, t % E] = 1.0
    _, aux = layer(x)
    assert aux["expert_counts"].tolist() == [8.0] * E  # 32 slots / 4 experts
    assert aux["load_balance_loss"].item() == pytest.approx(k, abs=1e-6)


def test_balance_loss_value_when_all_tokens_pick_the_same_experts() -> None:
    layer = make_layer(num_experts=4, top_k=2)
    x = routed_to_first_experts(layer, torch.randn(2, 5, 32))
    _, aux = layer(x)
    logits = torch.linspace(2.0, 0.0, 4) * 3.0
    p = torch.softmax(logits, 0)
    # f = [1, 1, 0, 0] (every token uses experts 0 and 1); P = p for every token
    expected = 4 * (p[0] + p[1]).item()
    assert aux["load_balance_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert expected > 2.0  # above the balanced minimum
    assert aux["expert_counts"].tolist() == [10.0, 10.0, 0.0, 0.0]


def test_z_loss_on_known_logits() -> None:
    layer = make_layer(num_experts=4, top_k=2)
    a = [1.0, -2.0, 0.5, 3.0]
    b = [0.0, 0.0, 4.0, -1.0]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor(a)
        layer.router.weight[:, 1] = torch.tensor(b)
    x = torch.zeros(1, 3, 32)
    x[0, 0, 0] = 1.0  # logits a
    x[0, 1, 1] = 1.0  # logits b
    # token 2: all zero -> logits 0
    lse = [math.log(sum(math.exp(v) for v in row)) for row in (a, b, [0.0] * 4)]
    expected_z = sum(v * v for v in lse) / 3
    _, aux = layer(x)
    assert aux["z_loss"].item() == pytest.approx(expected_z, rel=1e-6)
    total = layer.aux_loss_coef * aux["load_balance_loss"] + layer.z_loss_coef * aux["z_loss"]
    assert aux["aux_loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_aux_loss_uses_config_coefficients() -> None:
    layer = make_layer(aux_loss_coef=0.5, z_loss_coef=0.25)
    _, aux = layer(torch.randn(2, 4, 32))
    expected = 0.5 * aux["load_balance_loss"] + 0.25 * aux["z_loss"]
    assert aux["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_expert_counts_sum_to_tokens_times_k() -> None:
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.5)
    layer.train()  # counts are routed slots, before capacity drops
    x = torch.randn(3, 11, 32)
    _, aux = layer(x)
    counts = aux["expert_counts"]
    assert counts.shape == (4,) and counts.dtype == torch.float32
    assert not counts.requires_grad
    assert counts.sum().item() == 3 * 11 * 2
    chosen = layer.route(x.reshape(-1, 32)).experts
    assert counts.tolist() == torch.bincount(chosen.reshape(-1), minlength=4).float().tolist()


# ---- output values -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_experts", "top_k", "bias"), [(4, 2, False), (8, 2, True), (5, 1, False), (6, 3, True)]
)
def test_output_matches_naive_per_token_loop_float64(
    num_experts: int, top_k: int, bias: bool
) -> None:
    layer = make_layer(num_experts=num_experts, top_k=top_k, bias=bias).double()
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(y, reference_moe(layer, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("top_k", "tokens"), [(2, 1), (1, 1), (3, 1), (2, 3)])
def test_decoding_path_matches_naive_per_token_loop_float64(top_k: int, tokens: int) -> None:
    """The few-token path a decode cache takes (eval, N <= E) gives the routed mixture."""
    layer = make_layer(num_experts=6, top_k=top_k, bias=True).double().eval()
    x = torch.randn(tokens, 1, 32, dtype=torch.float64)
    y, aux = layer(x, inference=True)
    assert aux == {}  # no training losses while decoding
    torch.testing.assert_close(y, reference_moe(layer, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, layer(x)[0], rtol=1e-10, atol=1e-12)


def test_capacity_drops_overflow_slots_in_position_order() -> None:
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.8).double()
    B, T = 2, 6  # capacity = ceil(0.8 * 12 * 2 / 4) = 5 slots per expert
    x = routed_to_first_experts(layer, torch.randn(B, T, 32, dtype=torch.float64))
    layer.train()
    assert layer.capacity(B * T) == 5
    y, aux = layer(x)
    # priority: position, then batch row -> kept tokens (t, b): (0,0) (0,1) (1,0) (1,1) (2,0)
    kept = {(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)}  # (b, t)
    dropped = {
        (b * T + t, e) for b in range(B) for t in range(T) for e in (0, 1) if (b, t) not in kept
    }
    torch.testing.assert_close(y, reference_moe(layer, x, dropped), rtol=1e-10, atol=1e-12)
    for b in range(B):
        for t in range(T):
            if (b, t) in kept:
                assert y[b, t].abs().sum() > 0
            else:
                assert torch.equal(y[b, t], torch.zeros(32, dtype=torch.float64))
    assert aux["expert_counts"].tolist() == [12.0, 12.0, 0.0, 0.0]  # routed, not kept


def test_eval_mode_never_drops() -> None:
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.25).double()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    layer.eval()
    assert layer.capacity(16) is None
    y_eval, _ = layer(x)
    torch.testing.assert_close(y_eval, reference_moe(layer, x), rtol=1e-10, atol=1e-12)
    layer.train()
    y_train, _ = layer(x)
    assert (y_train - y_eval).abs().max() > 1e-3  # the same layer does drop in training


def test_block_dropped_tokens_pass_through_residual_only() -> None:
    torch.manual_seed(1)
    cfg = small_cfg(capacity_factor=0.1)  # capacity = ceil(0.1 * 32 * 2 / 4) = 2 slots
    block = MoEBlock(cfg).double().train()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    out, _ = block(x)
    with torch.no_grad():
        h = x + block.mixer(block.norm1(x))  # (B, T, D) residual after attention
        flat = block.ffn.route(block.norm2(h).reshape(-1, 32))
        plan = block.ffn.dispatch(flat, 2, 16)
    kept = set(plan.token.tolist())
    assert 0 < len(kept) < 32
    for n in range(32):
        b, t = divmod(n, 16)
        if n in kept:
            assert (out[b, t] - h[b, t]).abs().max() > 1e-8
        else:
            assert torch.equal(out[b, t], h[b, t])


# ---- the full model ------------------------------------------------------------------------
def seeded_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(small_cfg(**kw))


@pytest.mark.parametrize(
    ("kw", "train"),
    [
        ({}, False),
        ({"use_rope": True, "use_rmsnorm": True}, False),
        ({"capacity_factor": 0.5}, True),
    ],
)
def test_full_model_is_causal(kw: dict, train: bool) -> None:
    """Also in training with a capacity: position-first priority keeps dropping causal."""
    model = seeded_model(**kw).train(train)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (3, 24), generator=gen)
    base = model(idx)
    for t in (0, 7, 15, 22):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape, generator=gen)
        torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
        assert (model(changed)[:, t + 1] - base[:, t + 1]).abs().max() > 1e-6


@pytest.mark.parametrize(
    ("kw", "batch"),
    [
        ({}, 2),
        ({}, 1),
        ({"use_rope": True}, 2),
        ({"capacity_factor": 0.5}, 2),
        ({"mlp": "swiglu", "use_rope": True, "use_rmsnorm": True}, 1),
        ({"top_k": 1}, 1),
        ({"num_experts": 2, "top_k": 1}, 3),  # 3 tokens > 2 experts: the sorted path
    ],
)
def test_cached_decoding_equals_full_forward(kw: dict, batch: int) -> None:
    model = seeded_model(**kw).eval()
    idx = torch.randint(0, 97, (batch, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, aux_full = model(idx, return_aux=True)
        for chunks in ([1] * 20, [7, 1, 1, 5, 6]):
            cache = model.init_cache()
            parts, start = [], 0
            for n in chunks:
                parts.append(model(idx[:, start : start + n], cache=cache))
                start += n
            assert cache.pos == 20
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=0)
    assert aux_full["expert_counts"].shape == (2, model.cfg.num_experts)


def test_every_parameter_gets_finite_nonzero_gradient() -> None:
    model = seeded_model(n_layers=2).train()
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    logits, aux = model(idx, return_aux=True)
    assert (aux["expert_counts"] > 0).all()  # every expert of every layer is used
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), idx[:, 1:].reshape(-1))
    (loss + aux["aux_loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("which", ["task", "aux"])
def test_router_learns_from_task_loss_and_from_aux_loss(which: str) -> None:
    model = seeded_model().train()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, aux = model(idx, return_aux=True)
    if which == "task":
        F.cross_entropy(logits.reshape(-1, 97), idx.reshape(-1)).backward()
    else:
        aux["load_balance_loss"].backward()
    for block in model.blocks:
        g = block.ffn.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ---- parameter counts ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"bias": True, "tie_weights": False},
        {"use_rope": True, "use_rmsnorm": True, "num_experts": 6, "top_k": 3, "expert_d_ff": 40},
        {"num_experts": 4, "top_k": 4},
    ],
)
def test_total_and_active_parameters_exact(kw: dict) -> None:
    cfg = small_cfg(**kw)
    V, D, L, P = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.max_seq_len
    E, k, H = cfg.num_experts, cfg.top_k, cfg.resolved_expert_d_ff
    bias = int(cfg.bias)
    norm = D if cfg.use_rmsnorm else 2 * D
    expert = 2 * D * H + bias * (H + D)
    attn = 4 * D * D + bias * 4 * D
    block = 2 * norm + attn + E * D + E * expert
    emb = V * D + (0 if cfg.use_rope else P * D)
    head = 0 if cfg.tie_weights else V * D
    total = emb + L * block + norm + head
    active = total - L * (E - k) * expert
    model = build_model(cfg)
    assert model.num_parameters() == total
    assert model.num_active_parameters() == active
    assert count_parameters(cfg) == (total, active)
    assert model.parameter_breakdown()["channel_mixing"] == L * (E * D + E * expert)


@pytest.mark.parametrize("size", ["nano", "micro", "tiny", "medium", "large"])
def test_active_parameters_match_dense_within_15_percent(size: str) -> None:
    moe_total, moe_active = count_parameters(preset_config("moe", size))
    dense_total, _ = count_parameters(preset_config("dense", size))
    assert abs(moe_active - dense_total) / dense_total < 0.15
    assert moe_total > 2 * moe_active - dense_total  # the idle experts really are extra


def test_top_k_above_num_experts_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--expert-capacity"):
        small_cfg(num_experts=4, top_k=5)


def test_more_experts_than_a_model_can_be_built_with_is_one_line(capsys) -> None:
    """A million experts used to hang `archlab summary` (a module per expert, even on meta)."""
    from archlab.cli import main

    with pytest.raises(ConfigError, match="--num-experts: at most 4096"):
        small_cfg(num_experts=4097)
    assert main(["summary", "--architecture", "moe", "--num-experts", "1000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at most 4096 (got 1000000)" in err


# ---- learning --------------------------------------------------------------------------------
@pytest.mark.slow
def test_nano_moe_overfits_one_batch() -> None:
    torch.manual_seed(0)
    cfg = preset_config("moe", "nano", vocab_size=64)
    model = build_model(cfg).train()
    idx = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits, aux = model(idx[:, :-1], return_aux=True)
        loss = F.cross_entropy(logits.reshape(-1, 64), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + aux["aux_loss"]).backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5


def test_bf16_autocast_and_bf16_weights_run_and_stay_close() -> None:
    model = seeded_model().train()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(idx, return_aux=True)
    (logits.float().square().mean() + aux["aux_loss"]).backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0
    assert (logits.float() - ref).abs().max() < 0.05
    low = model.to(torch.bfloat16)(idx)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05

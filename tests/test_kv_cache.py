"""The attention decode cache grows in place: equal to concatenation, sized as the positions seen,
and not copied per token."""

from __future__ import annotations

import torch

from archlab import build_model, preset_config
from archlab.bench.decode.measure import state_bytes
from archlab.models.attention import KV_GROWTH, append_kv, kv_cache_elements


def _model():
    cfg = preset_config("dense", "nano", vocab_size=64, max_seq_len=128)
    return build_model(cfg).eval()


def test_append_equals_concatenation_and_reuses_its_buffer():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 3, n, 4, generator=g) for n in (5, 1, 1, 3, 1, 20, 1)]
    cache, ptrs = None, []
    for i, new in enumerate(parts):
        cache = append_kv(cache, new)
        torch.testing.assert_close(cache, torch.cat(parts[: i + 1], dim=2), rtol=0, atol=0)
        ptrs.append(cache.data_ptr())
    # 5 positions -> room for 21: the next four appends write in place, the 20 reallocates
    assert ptrs[1:4] == [ptrs[0]] * 3 and ptrs[5] != ptrs[0] and ptrs[6] == ptrs[5]
    assert cache.shape == (2, 3, 32, 4)


def test_a_cache_that_is_not_a_buffer_view_is_concatenated():
    g = torch.Generator().manual_seed(1)
    old, new = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    out = append_kv(old, new)  # contiguous: no room after it
    torch.testing.assert_close(out, torch.cat([old, new], dim=2), rtol=0, atol=0)
    assert out.data_ptr() != old.data_ptr()
    sliced = append_kv(None, old)[:, :, 2:]  # a view that does not start at its buffer's start
    out = append_kv(sliced, new)
    torch.testing.assert_close(out, torch.cat([old[:, :, 2:], new], dim=2), rtol=0, atol=0)


def test_under_autograd_the_cache_is_concatenated_and_gradients_flow():
    old = torch.randn(1, 2, 3, 4, requires_grad=True)
    new = torch.randn(1, 2, 1, 4, requires_grad=True)
    out = append_kv(old, new)
    out.sum().backward()
    assert torch.equal(old.grad, torch.ones_like(old)) and torch.equal(
        new.grad, torch.ones_like(new)
    )


def test_decoding_in_inference_mode_equals_the_full_forward_without_copying_the_cache():
    model = _model()
    idx = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(idx)
        cache = model.init_cache()
        outs = [model(idx[:, :8], cache=cache)]
        ptrs = set()
        for t in range(8, 60):
            outs.append(model(idx[:, t : t + 1], cache=cache))
            ptrs.add(cache.layers[0]["k"].data_ptr())
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=0)
    # 52 appends grow 8 -> 60 positions by KV_GROWTH x: a handful of buffers, not one per token
    assert len(ptrs) <= 4, (len(ptrs), KV_GROWTH)
    layer = cache.layers[0]
    assert layer["k"].shape[2] == layer["v"].shape[2] == 60
    # the cache holds (and the decode benchmark counts) the positions seen, not the room
    per_layer = kv_cache_elements(model.cfg, 60) * 2 * 4  # batch 2, float32
    assert state_bytes(cache.layers) == per_layer * model.cfg.n_layers

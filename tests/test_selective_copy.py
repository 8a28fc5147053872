"""Selective copying (MAD): the tokens after the delimiter are the non-noise tokens, in order."""

from __future__ import annotations

import numpy as np
import pytest

from archlab.data import TokenDataset, load_meta, prepare_dataset
from archlab.data.selective_copy import (
    DELIMITER,
    FIRST_DATA,
    NOISE,
    SelectiveCopyConfig,
    generate,
)
from archlab.errors import UserError


def test_generate_copies_the_data_tokens_in_order():
    cfg = SelectiveCopyConfig(vocab_size=10, num_tokens=5, seq_len=24).validate()
    tokens, mask = generate(cfg, 200, seed=3)
    assert tokens.shape == mask.shape == (200, 25)
    for t, m in zip(tokens, mask, strict=True):
        region = t[: cfg.region]
        data = region[region != NOISE]
        assert len(data) == 5 and (data >= FIRST_DATA).all() and (data < 10).all()
        assert t[cfg.region] == DELIMITER
        assert np.array_equal(t[cfg.region + 1 :], data)  # copied, in order
        assert np.flatnonzero(m).tolist() == list(range(cfg.region + 1, 25))
        assert (t > 0).all()
    again, _ = generate(cfg, 200, seed=3)
    assert np.array_equal(tokens, again)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(num_tokens=0), "--sc-tokens"),
        (dict(vocab_size=4), "too small"),
        (dict(num_tokens=20, seq_len=30), "too short"),
    ],
)
def test_validate_rejects(kw, message):
    with pytest.raises(UserError, match=message):
        SelectiveCopyConfig(**kw).validate()


def test_prepare_and_load_aligned_examples(tmp_path):
    out = prepare_dataset(
        "selective-copy",
        tmp_path / "sc",
        verbose=False,
        sc_tokens=4,
        sc_seq_len=16,
        sc_train_examples=50,
        sc_val_examples=10,
    )
    meta = load_meta(out)
    assert meta["task"] == "selective-copy" and meta["seq_len"] == 16
    assert meta["train_loss_tokens"] == 50 * 4
    ds = TokenDataset(out, "train")
    import torch

    x, y = ds.get_batch(8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    # aligned whole examples: the delimiter sits at the same place in every row, and only
    # the 4 copy positions (from the delimiter on) are targets
    assert (x[:, 16 - 4] == DELIMITER).all()
    assert ((y != -100).sum(dim=1) == 4).all()
    assert (y[:, 12:] != -100).all()
    with pytest.raises(UserError, match="selective-copy"):
        ds.get_batch(8, 20, torch.Generator())
    with pytest.raises(UserError, match="applies to the selective-copy source only"):
        prepare_dataset("mqar", tmp_path / "m", verbose=False, sc_tokens=3)

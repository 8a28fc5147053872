"""MQAR: keys/values from disjoint halves, every query labelled with its pair's value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archlab.data import TokenDataset, load_meta, load_tokenizer, prepare_dataset
from archlab.data.mqar import MQARConfig, accuracy, generate
from archlab.errors import UserError


def check_example(tokens: np.ndarray, mask: np.ndarray, cfg: MQARConfig) -> None:
    P, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    keys, values = tokens[0 : 2 * P : 2], tokens[1 : 2 * P : 2]
    assert len(set(keys.tolist())) == P and len(set(values.tolist())) == P
    assert ((1 <= keys) & (keys < half)).all() and (
        (half <= values) & (values < cfg.vocab_size)
    ).all()
    assert (tokens > 0).all()  # id 0 (end of text) never appears
    pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
    answers = np.flatnonzero(mask)
    assert len(answers) == P and (answers >= 2 * P + 1).all()
    assert not mask[: 2 * P].any()
    queried = []
    for a in answers:  # the token before each answer is a key, the answer its value
        assert pairs[int(tokens[a - 1])] == int(tokens[a])
        queried.append(int(tokens[a - 1]))
    assert sorted(queried) == sorted(pairs)  # every key is queried once


def test_generate_labels():
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=6, seq_len=40).validate()
    tokens, mask = generate(cfg, 300, seed=0)
    assert tokens.shape == mask.shape == (300, 41)
    for t, m in zip(tokens, mask, strict=True):
        check_example(t, m, cfg)
    again, _ = generate(cfg, 300, seed=0)
    assert np.array_equal(tokens, again)
    # power law: short distances (early query slots) are more frequent than late ones
    counts = mask[:, 2 * 6 + 1 :: 2].sum(0)  # answers per query slot
    assert counts.sum() == 300 * 6 and counts[0] > counts[-1]


def test_prepared_batches_label_each_query(tmp_path):
    out = prepare_dataset(
        "mqar", tmp_path / "m", mqar_vocab_size=128, mqar_pairs=4, mqar_seq_len=32,
        mqar_train_examples=500, mqar_val_examples=50, verbose=False,
    )  # fmt: skip
    meta = load_meta(out)
    assert meta["task"] == "mqar" and meta["seq_len"] == 32 and meta["has_mask"]
    assert meta["train_tokens"] == 500 * 33 and meta["val_tokens"] == 50 * 33
    assert meta["vocab_size"] == 128 and load_tokenizer(out).vocab_size == 128
    ds = TokenDataset(out, "train")
    x, y = ds.get_batch(16, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 32)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        pairs = dict(zip(row_x[0:8:2], row_x[1:8:2], strict=True))
        labelled = [(i, t) for i, t in enumerate(row_y) if t != -100]
        assert len(labelled) == 4
        for i, t in labelled:
            assert row_x[i] in pairs and pairs[row_x[i]] == t  # label = value of that key
    # whole aligned examples: every row starts with a key at position 0
    assert (x[:, 0] < 64).all() and (x[:, 1] >= 64).all()
    with pytest.raises(UserError, match="--seq-len 32"):
        ds.get_batch(2, 64, torch.Generator())
    val = list(TokenDataset(out, "val").eval_batches(8, 32, 2, seed=0))
    assert all((b[1] != -100).sum() == 8 * 4 for b in val)


def test_accuracy():
    y = torch.tensor([[-100, 5, -100, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 5] = 1.0
    logits[0, 3, 2] = 1.0  # wrong
    logits[0, 0, 3] = 9.0  # unlabelled positions do not count
    assert accuracy(logits, y) == 0.5


def test_bad_config():
    with pytest.raises(UserError, match="--mqar-vocab-size"):
        MQARConfig(vocab_size=10, num_kv_pairs=8).validate()
    with pytest.raises(UserError, match="--mqar-seq-len"):
        MQARConfig(num_kv_pairs=8, seq_len=20).validate()
    with pytest.raises(UserError, match="does not apply"):
        prepare_dataset("mqar", tokenizer="bpe", verbose=False)

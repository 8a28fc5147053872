"""Selective copying (MAD): the tokens after the delimiter are the non-noise tokens, in order."""

from __future__ import annotations

import json

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


def test_meta_has_the_data_baselines_computed_by_hand(tmp_path):
    """vocab 5, one token to copy, seq-len 2: every example is ``d | d`` with d in {3, 4} and
    only the copy (after the delimiter) is a target. So the unigram counts are the copies'
    and the bigram model has one context, the delimiter: both entropies in closed form."""
    kw = dict(sc_vocab_size=5, sc_tokens=1, sc_seq_len=2, sc_train_examples=40)
    out = prepare_dataset("selective-copy", tmp_path / "sc", verbose=False, **kw)
    meta = load_meta(out)
    train = np.fromfile(out / "train.bin", dtype=meta["dtype"]).reshape(-1, 3)
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"]).reshape(-1, 3)
    assert (train[:, 1] == DELIMITER).all() and (train[:, 0] == train[:, 2]).all()
    V, D, N = 5, 0.75, 40
    n = {w: int((train[:, 2] == w).sum()) for w in (3, 4)}
    assert min(n.values()) > 0  # both data tokens seen as copies (the form below needs it)
    # unigram add-0.5 over the N train targets
    p_uni = {w: (n[w] + 0.5) / (N + 0.5 * V) for w in (3, 4)}
    # Kneser-Ney: 2 pair types (| 3), (| 4); each token has one distinct left context, so
    # p_cont(w) = (1 - D) / 2 + D * 2 / 2 / V; the delimiter is seen N times, 2 continuations
    p_cont = (1 - D) / 2 + D * 2 / 2 / V
    p_bi = {w: (n[w] - D) / N + D * 2 / N * p_cont for w in (3, 4)}
    copies = [int(w) for w in val[:, 2]]
    unigram = -sum(np.log(p_uni[w]) for w in copies) / len(copies)
    bigram = -sum(np.log(p_bi[w]) for w in copies) / len(copies)
    assert meta["unigram_entropy"] == pytest.approx(unigram, abs=1e-6)  # stored to 6 places
    assert meta["bigram_entropy"] == pytest.approx(bigram, abs=1e-6)
    assert "Kneser-Ney" in meta["baselines_note"]
    # a folder prepared before baselines were stored gets them when it is reused
    stripped = {k: v for k, v in meta.items() if k not in ("unigram_entropy", "bigram_entropy")}
    (out / "meta.json").write_text(json.dumps(stripped))
    prepare_dataset("selective-copy", out, verbose=False, **kw)
    again = load_meta(out)
    assert (again["unigram_entropy"], again["bigram_entropy"]) == (
        meta["unigram_entropy"],
        meta["bigram_entropy"],
    )
    assert again["hash"] == meta["hash"]  # reused, not rebuilt


@pytest.mark.parametrize("source", ["selective-copy", "mqar"])
def test_train_takes_the_sequence_length_of_fixed_length_data(tmp_path, source, capsys):
    """Without --seq-len, train uses the examples' length (the loader refuses any other)."""
    from archlab.cli import main

    kw = (
        dict(sc_tokens=4, sc_seq_len=16, sc_train_examples=64, sc_val_examples=16)
        if source == "selective-copy"
        else dict(mqar_pairs=2, mqar_seq_len=16, mqar_train_examples=64, mqar_val_examples=16)
    )
    data = prepare_dataset(source, tmp_path / "d", verbose=False, **kw)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--d-model", "32", "--n-heads", "2", "--n-layers", "1"]
    argv += ["--d-ff", "64", "--batch-size", "4", "--steps-per-epoch", "2", "--eval-steps", "1"]
    assert main([*argv, "--out-dir", str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seq_len"] == 16 and summary["status"] == "ok"
    capsys.readouterr()
    assert main([*argv, "--seq-len", "24", "--out-dir", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "pass --seq-len 16" in capsys.readouterr().err

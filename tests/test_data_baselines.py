"""Data baselines: unigram / smoothed-bigram entropy of val under train counts."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from archlab.data import baselines as bl
from archlab.data import compute_baselines, load_baselines, load_meta, prepare_dataset


def reference(train, val, V, train_mask=None, val_mask=None):
    """The same estimators written out naively: full distributions, checked to sum to 1."""
    tm = [1] * len(train) if train_mask is None else list(train_mask)
    vm = [1] * len(val) if val_mask is None else list(val_mask)
    pairs = Counter((train[i - 1], train[i]) for i in range(1, len(train)) if tm[i])
    c_w = Counter()
    c_u = Counter()
    for (u, w), c in pairs.items():
        c_w[w] += c
        c_u[u] += c
    n = sum(c_w.values())
    p_uni = [(c_w[w] + 0.5) / (n + 0.5 * V) for w in range(V)]
    d = 0.75
    n_types = len(pairs)
    prec = Counter(w for (_, w) in pairs)
    p_cont = [max(prec[w] - d, 0) / n_types + d * len(prec) / n_types / V for w in range(V)]
    assert math.isclose(sum(p_uni), 1.0) and math.isclose(sum(p_cont), 1.0)
    follow = Counter(u for (u, _) in pairs)

    def p_bi(u):
        if c_u[u] == 0:
            return p_cont
        return [
            max(pairs[(u, w)] - d, 0) / c_u[u] + d * follow[u] / c_u[u] * p_cont[w]
            for w in range(V)
        ]

    nll_u = nll_b = 0.0
    k = 0
    for i in range(1, len(val)):
        if not vm[i]:
            continue
        dist = p_bi(val[i - 1])
        assert math.isclose(sum(dist), 1.0)
        nll_u -= math.log(p_uni[val[i]])
        nll_b -= math.log(dist[val[i]])
        k += 1
    return nll_u / k, nll_b / k


@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive_reference(masked, monkeypatch):
    rng = np.random.default_rng(0)
    V = 23
    # a Markov chain, so bigram << unigram; token 22 never occurs in train (smoothing needed)
    trans = rng.dirichlet(np.full(V - 1, 0.3), size=V)

    def chain(n):
        x = [0]
        for _ in range(n - 1):
            x.append(int(rng.choice(V - 1, p=trans[x[-1]])))
        return np.array(x, dtype=np.uint16)

    train, val = chain(3000), chain(700)
    val[5] = V - 1  # unseen as a target and as a context
    tm = vm = None
    if masked:
        tm = (rng.random(len(train)) < 0.6).astype(np.uint8)
        vm = (rng.random(len(val)) < 0.6).astype(np.uint8)
    monkeypatch.setattr(bl, "_CHUNK", 97)  # many chunks: exercises the merge path
    got = compute_baselines(train, val, V, train_mask=tm, val_mask=vm)
    ref_u, ref_b = reference(train.tolist(), val.tolist(), V, tm, vm)
    assert got["unigram_entropy"] == pytest.approx(ref_u, rel=1e-10)
    assert got["bigram_entropy"] == pytest.approx(ref_b, rel=1e-10)
    assert got["bigram_entropy"] < got["unigram_entropy"] - 0.5


def test_known_values():
    # a deterministic cycle 0 1 2 0 1 2 ...: unigram ~ log 3, bigram ~ -log(1 - D/c + ...) ~ 0
    train = np.tile(np.arange(3), 2000)
    val = np.tile(np.arange(3), 300)
    got = compute_baselines(train, val, 3)
    assert got["unigram_entropy"] == pytest.approx(math.log(3), abs=1e-3)
    assert 0.0 < got["bigram_entropy"] < 1e-3
    # i.i.d. uniform tokens: both baselines ~ log V, bigram slightly worse (sparser counts)
    rng = np.random.default_rng(1)
    tr, va = rng.integers(0, 50, 200_000), rng.integers(0, 50, 20_000)
    got = compute_baselines(tr, va, 50)
    assert got["unigram_entropy"] == pytest.approx(math.log(50), abs=0.01)
    assert got["unigram_entropy"] < got["bigram_entropy"] < math.log(50) + 0.05


def test_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        compute_baselines(np.array([0, 5, 1]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="vocab_size"):
        compute_baselines(np.array([0, 1, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError, match="at least 2"):
        compute_baselines(np.array([0]), np.array([0, 1]), 3)


def test_prepare_stores_them_and_old_folders_compute_on_read(tmp_path):
    out = prepare_dataset("stories", tmp_path / "s", num_stories=300, vocab_size=400, verbose=False)
    meta = load_meta(out)
    ids = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}
    want = compute_baselines(ids["train"], ids["val"], meta["vocab_size"])
    for k in ("unigram_entropy", "bigram_entropy"):
        assert meta[k] == pytest.approx(want[k], abs=1e-6)
    assert meta["bigram_entropy"] < meta["unigram_entropy"] < math.log(meta["vocab_size"])
    assert load_baselines(out) == pytest.approx(want, abs=1e-6)

    # a folder written by an older archlab: no keys -> computed on read, meta.json untouched
    old = {k: v for k, v in meta.items() if k not in ("unigram_entropy", "bigram_entropy")}
    (out / "meta.json").write_text(json.dumps(old), encoding="utf-8")
    before = (out / "meta.json").read_bytes()
    assert load_baselines(out) == pytest.approx(want, rel=1e-12)
    assert (out / "meta.json").read_bytes() == before
    # a stored value that is not a number is never trusted
    (out / "meta.json").write_text(json.dumps({**old, "unigram_entropy": None}), encoding="utf-8")
    assert load_baselines(out) == pytest.approx(want, rel=1e-12)
    # re-running prepare on it (same inputs) reuses the folder and fills the keys in
    prepare_dataset("stories", out, num_stories=300, vocab_size=400, verbose=False)
    meta2 = load_meta(out)
    assert meta2["unigram_entropy"] == pytest.approx(want["unigram_entropy"], abs=1e-6)
    assert meta2["hash"] == meta["hash"]


def test_masked_chat_data_scores_only_counted_targets(tmp_path):
    out = prepare_dataset("rustgpt-chat", tmp_path / "c", verbose=False)
    meta = load_meta(out)
    assert meta["has_mask"]
    ids = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}
    mask = {s: np.fromfile(out / f"{s}_mask.bin", dtype=np.uint8) for s in ("train", "val")}
    want = compute_baselines(
        ids["train"], ids["val"], meta["vocab_size"], train_mask=mask["train"], val_mask=mask["val"]
    )
    unmasked = compute_baselines(ids["train"], ids["val"], meta["vocab_size"])
    assert meta["unigram_entropy"] == pytest.approx(want["unigram_entropy"], abs=1e-6)
    assert meta["bigram_entropy"] == pytest.approx(want["bigram_entropy"], abs=1e-6)
    assert want != pytest.approx(unmasked)

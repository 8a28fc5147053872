"""TokenDataset: windows, determinism, ranks, masks, fixed eval batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archlab.data import TokenDataset, prepare_dataset
from archlab.errors import UserError


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_dataset("stories", out, num_stories=400, vocab_size=512, verbose=False)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "chat"
    return prepare_dataset("rustgpt-chat", out, verbose=False)


def test_windows_are_contiguous_and_shifted(stories_dir):
    ds = TokenDataset(stories_dir, "train")
    assert isinstance(ds._tokens, np.memmap)  # constant memory: never loaded whole
    tokens = np.fromfile(stories_dir / "train.bin", dtype=np.uint16)
    assert ds.num_tokens == len(tokens) == ds.meta["train_tokens"]
    x, y = ds.get_batch(8, 32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        # every row is a real window of the file
        starts = np.flatnonzero(tokens[: len(tokens) - 32] == row_x[0])
        assert any(
            np.array_equal(tokens[s : s + 32], row_x) and tokens[s + 32] == row_y[-1]
            for s in starts
        )


def test_deterministic_under_generator(stories_dir):
    ds = TokenDataset(stories_dir, "train")
    a = ds.get_batch(4, 16, torch.Generator().manual_seed(7))
    b = ds.get_batch(4, 16, torch.Generator().manual_seed(7))
    c = ds.get_batch(4, 16, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_ranks_split_the_global_batch(stories_dir):
    full = TokenDataset(stories_dir, "train").get_batch(8, 16, torch.Generator().manual_seed(5))
    parts = [
        TokenDataset(stories_dir, "train", rank=r, world_size=2).get_batch(
            4, 16, torch.Generator().manual_seed(5)
        )
        for r in range(2)
    ]
    assert not torch.equal(parts[0][0], parts[1][0])  # different windows per rank
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0])  # together: one process' batch
    assert torch.equal(torch.cat([p[1] for p in parts]), full[1])


def test_eval_batches_fixed(stories_dir):
    ds = TokenDataset(stories_dir, "val")
    first = list(ds.eval_batches(4, 16, 3, seed=0))
    ds.get_batch(4, 16, torch.Generator().manual_seed(1))  # training draws do not matter
    again = list(
        TokenDataset(stories_dir, "val", rank=1, world_size=2).eval_batches(4, 16, 3, seed=0)
    )
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = list(ds.eval_batches(4, 16, 3, seed=1))
    assert not torch.equal(first[0][0], other[0][0])


def test_chat_mask_keeps_only_answers(chat_dir):
    ds = TokenDataset(chat_dir, "train")
    tok = ds.tokenizer
    assert ds.meta["has_mask"]
    x, y = ds.get_batch(16, 40, torch.Generator().manual_seed(0))
    assert (y == -100).any() and (y != -100).any()
    user, assistant = tok.token_to_id("User"), tok.token_to_id("Assistant")
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        counted = [t for t in row_y if t != -100]
        assert user not in counted and assistant not in counted  # prompts never count
        for i, t in enumerate(row_y):
            if t != -100 and i + 1 < len(row_x):
                assert row_x[i + 1] == t
    # the whole split: counted tokens are exactly the answers and their closing </s>
    tokens = np.fromfile(chat_dir / "train.bin", dtype=np.uint16)
    mask = np.fromfile(chat_dir / "train_mask.bin", dtype=np.uint8)
    text = tok.decode(tokens[mask == 1].tolist())
    from archlab.data.rustgpt_corpus import CHAT

    answers = {f"{tok.decode(tok.encode(a))} </s>" for _, a in CHAT}
    pieces = [p.strip() + " </s>" for p in text.split("</s>") if p.strip()]
    assert pieces and all(p in answers for p in pieces)
    assert int(mask.sum()) == ds.meta["train_loss_tokens"]


def test_too_short_split_is_a_user_error(stories_dir):
    ds = TokenDataset(stories_dir, "val")
    with pytest.raises(UserError, match="fewer than"):
        ds.get_batch(1, ds.num_tokens + 5, torch.Generator())

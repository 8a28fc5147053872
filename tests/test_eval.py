"""`archlab eval`: exact coverage, loss/perplexity/bits-per-byte arithmetic, MQAR accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from archlab import build_model, preset_config
from archlab.bench.eval.evaluate import evaluate_mqar, lm_windows, run_eval, text_bytes
from archlab.cli import main
from archlab.train.checkpoint import save_checkpoint

SMALL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    from archlab.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_dataset("stories", out, tokenizer="char", num_stories=40, verbose=False)


def _checkpoint(tmp: Path, data: Path, arch: str = "dense", **kw) -> Path:
    meta = json.loads((data / "meta.json").read_text())
    cfg = preset_config(arch, vocab_size=meta["vocab_size"], **{**SMALL, **kw})
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(tmp / "run", 1, model, cfg, data / "tokenizer.json", {"step": 1})


def test_windows_cover_every_target_once() -> None:
    assert list(lm_windows(10, 4, None)) == [(0, 4), (4, 4), (8, 1)]
    assert list(lm_windows(10, 4, 6)) == [(0, 4), (4, 2)]
    covered = [s + i + 1 for s, n in lm_windows(1000, 37, None) for i in range(n)]
    assert covered == list(range(1, 1000))


class _Tok:
    """decode() over a fixed table: '\u00e9' is two UTF-8 bytes, '\u20ac' three."""

    table = {0: "<|endoftext|>", 1: "\u00e9", 2: "a", 3: "\u20ac"}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.table[i] for i in ids)


def test_text_bytes_utf8_and_separators() -> None:
    targets = np.array([1, 2, 0, 3, 3, 2])
    every = np.ones(6, dtype=bool)
    assert text_bytes(targets, every, _Tok(), eot_id=0) == 2 + 1 + 1 + 3 + 3 + 1
    counted = np.array([True, False, True, True, False, False])
    assert text_bytes(targets, counted, _Tok(), eot_id=0) == 2 + 1 + 3


def test_eval_matches_a_direct_computation(stories: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, stories)
    res = run_eval(str(ckpt), str(stories), seq_len=48, batch_size=3)
    meta = json.loads((stories / "meta.json").read_text())
    val = np.fromfile(stories / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    # reference: one window at a time, summed cross-entropy over every target
    from archlab.train.checkpoint import load_model

    model, _, tok = load_model(ckpt)
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(val) - 1, 48):
            seg = torch.from_numpy(val[s : min(s + 49, len(val))])[None]
            logits = model(seg[:, :-1])
            nats += float(F.cross_entropy(logits[0], seg[0, 1:], reduction="sum"))
    n = len(val) - 1
    assert res.tokens == n
    assert res.loss == pytest.approx(nats / n, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nats / n), rel=1e-5)
    assert res.bits_per_token == pytest.approx(res.loss / math.log(2))
    text_len = len(tok.decode([t for t in val[1:].tolist() if t != meta["eot_id"]]).encode())
    n_eot = int((val[1:] == meta["eot_id"]).sum())
    assert res.bytes == text_len + n_eot
    assert res.bits_per_byte == pytest.approx(nats / math.log(2) / res.bytes, rel=1e-5)
    # the batch size changes nothing; --max-tokens takes a prefix
    again = run_eval(str(ckpt), str(stories), seq_len=48, batch_size=1)
    assert again.loss == pytest.approx(res.loss, rel=1e-6)
    part = run_eval(str(ckpt), str(stories), seq_len=48, max_tokens=100)
    assert part.tokens == 100


def test_mqar_accuracy_counts_answers(tmp_path: Path) -> None:
    from archlab.data.prepare import prepare_dataset

    data = prepare_dataset(
        "mqar",
        tmp_path / "mqar",
        mqar_vocab_size=64,
        mqar_pairs=4,
        mqar_seq_len=32,
        mqar_train_examples=64,
        mqar_val_examples=10,
        verbose=False,
    )
    meta = json.loads((data / "meta.json").read_text())
    L = meta["seq_len"]
    tokens = np.fromfile(data / "val.bin", dtype=meta["dtype"])
    mask = np.fromfile(data / "val_mask.bin", dtype=np.uint8)
    ex = torch.from_numpy(tokens.astype(np.int64).reshape(-1, L + 1))

    class Oracle:
        """Predicts the true next token everywhere, except answer number ``wrong``."""

        def __init__(self, wrong: int | None) -> None:
            self.wrong = wrong
            self.seen = 0

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            B, T = x.shape
            rows = ex[self.seen : self.seen + B]
            self.seen += B
            logits = torch.full((B, T, 64), -10.0)
            logits.scatter_(2, rows[:, 1:, None], 10.0)
            if self.wrong is not None and self.seen == B:  # first batch, first example
                t = int(np.flatnonzero(mask[1 : L + 1])[self.wrong])
                logits[0, t] = -10.0
                logits[0, t, 0] = 10.0
            return logits

    perfect = evaluate_mqar(Oracle(None), tokens, mask, L, 4, "cpu")
    n_answers = int(mask.sum())
    assert perfect["answers"] == n_answers == 10 * 4
    assert perfect["right"] == n_answers and perfect["all_right"] == 10
    one_off = evaluate_mqar(Oracle(0), tokens, mask, L, 4, "cpu")
    assert one_off["right"] == n_answers - 1 and one_off["all_right"] == 9

    # through the CLI, on an untrained model: accuracy is printed, near chance
    ckpt = _checkpoint(tmp_path, data, max_seq_len=L)
    res = run_eval(str(ckpt), str(data))
    assert res.task == "mqar" and res.tokens == n_answers and 0.0 <= res.accuracy <= 0.25
    assert res.bits_per_byte is None


def test_eval_cli_and_bad_input(stories: Path, tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path, stories)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "run"),
                "--data",
                str(stories),
                "--seq-len",
                "32",
                "--max-tokens",
                "200",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["tokens"] == 200 and doc["checkpoint"] == str(ckpt)
    assert doc["perplexity"] == pytest.approx(math.exp(doc["loss"]))
    for argv, message in (
        (["--checkpoint", str(tmp_path / "nope")], "checkpoint not found"),
        (
            ["--checkpoint", str(ckpt), "--data", str(stories), "--seq-len", "65"],
            "exceeds the model's max_seq_len 64",
        ),
        (
            ["--checkpoint", str(ckpt), "--data", str(stories), "--batch-size", "0"],
            "--batch-size: must be an integer >= 1",
        ),
        (["--checkpoint", str(ckpt)], "--data: give the data"),
    ):
        try:
            rc = main(["eval", *argv])
        except SystemExit as exc:  # refused by the flag's type (argparse, one line)
            rc = exc.code
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_eval_refuses_data_of_another_tokenizer(stories: Path, tmp_path: Path, capsys) -> None:
    from archlab.data.prepare import prepare_dataset

    text = tmp_path / "other.txt"
    text.write_text("Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 50)
    other = prepare_dataset(str(text), tmp_path / "other", tokenizer="char", verbose=False)
    (tmp_path / "a").mkdir()
    ckpt = _checkpoint(tmp_path / "a", stories)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(other)]) == 2
    assert "different tokenizer" in capsys.readouterr().err

"""End to end, as in RustGPT: pretrain the rustgpt preset on the built-in corpus, instruction
tune it (chat stage, --init-from), then `archlab chat` answers a training question."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from archlab.cli import main
from archlab.data.tokenizer import load_tokenizer


def train(stage: str, out: str, steps: int, seq_len: int, arch: str = "dense", *extra: str):
    argv = [
        "train", "--preset", "rustgpt", "--architecture", arch, "--stage", stage,
        "--out-dir", out, "--batch-size", "16", "--seq-len", str(seq_len),
        "--num-epochs", "1", "--steps-per-epoch", str(steps), "--learning-rate", "3e-3",
        "--warmup-steps", "5", "--eval-interval", "100000", "--eval-steps", "1",
        "--num-threads", "1", "--seed", "0", *extra,
    ]  # fmt: skip
    assert main(argv) == 0


def training_exchanges(workdir: Path) -> list[tuple[str, str]]:
    """(question, answer) pairs of the chat stage's TRAIN split, as the tokenizer sees them."""
    (data_dir,) = glob.glob(str(workdir / "data" / "rustgpt-chat*"))
    meta = json.loads(Path(data_dir, "meta.json").read_text())
    tok = load_tokenizer(Path(data_dir, "tokenizer.json"))
    ids = np.memmap(Path(data_dir, "train.bin"), dtype=meta["dtype"], mode="r")
    pairs = []
    for doc in tok.decode(ids.tolist()).split("</s>"):
        if "Assistant :" in doc:
            q, a = doc.split("Assistant :")
            pairs.append((q.replace("User :", "", 1).strip(), a.strip()))
    return pairs


def chat(run: Path, questions: list[str], *flags: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "archlab", "chat", "--checkpoint", str(run), "--greedy", *flags],
        input="".join(q + "\n" for q in questions), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_rustgpt_pretrain_then_chat_answers_a_training_question(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prepared data goes to ./data/
    train("language", "pretrain", steps=40, seq_len=32)
    train("chat", "chat", 250, 32, "dense", "--init-from", "pretrain")
    question, answer = training_exchanges(tmp_path)[0]
    assert chat(tmp_path / "chat", [question]) == [f"Assistant: {answer}"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dense", "hypermixer"])
def test_rustgpt_chat_answers_nearly_all_training_questions(tmp_path, monkeypatch, arch):
    """Full context (seq 80 = max_seq_len): >= 95% of the training questions answered word
    for word, each on its own; then a multi-turn session with history still answers."""
    monkeypatch.chdir(tmp_path)
    train("language", "pretrain", 150, 80, arch)
    train("chat", "chat", 400, 80, arch, "--init-from", "pretrain")
    pairs = training_exchanges(tmp_path)
    answers = chat(tmp_path / "chat", [q for q, _ in pairs], "--no-history")
    right = sum(got == f"Assistant: {a}" for got, (_, a) in zip(answers, pairs, strict=True))
    assert right >= 0.95 * len(pairs), f"{right}/{len(pairs)}"
    with_history = chat(tmp_path / "chat", [q for q, _ in pairs[:3]])
    assert (
        sum(g == f"Assistant: {a}" for g, (_, a) in zip(with_history, pairs[:3], strict=True)) >= 2
    )

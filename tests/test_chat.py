"""Chat: the session (format, history within the window, stop strings) and `archlab chat`."""

from __future__ import annotations

import builtins
import io
import sys

import pytest
import torch
from test_generate import (
    ByteTokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    save_test_checkpoint,
    tiny_model,
)

from archlab.cli import main
from archlab.data.tokenizer import train_word
from archlab.generate import (
    ChatSession,
    LoadedModel,
    SamplingParams,
    StopFilter,
    generate,
    generate_ids,
    load,
    normalise_words,
)

QA = [
    ("What is the sun?", "The sun is a star that gives light and heat."),
    ("Where do fish live?", "Fish live in rivers, lakes and the sea."),
]


def exchange(q: str, a: str) -> str:
    return f"User: {q} Assistant: {a} </s>"


@pytest.fixture(scope="module")
def word_tok():
    return train_word([exchange(q, a) for q, a in QA] + ["hello there friend"])


def loaded_of(model, tok) -> LoadedModel:
    return LoadedModel(model=model, config=model.cfg, tokenizer=tok, device=torch.device("cpu"))


# ---- stop strings -----------------------------------------------------------------------------


def test_stop_filter_cuts_before_a_stop_split_across_pieces():
    f = StopFilter(["</s>"], strip=True)
    shown = [f.push(p) for p in ["  Hello", " wor", "ld </", "s> more"]]
    assert shown == ["Hello", " wor", "ld", ""]  # "</" (and the space) were held back
    assert f.stopped and f.flush() == ""


def test_stop_filter_releases_a_partial_stop_at_the_end():
    f = StopFilter(["</s>"])
    assert f.push("a <") == "a "
    assert f.push("/") == ""
    assert f.flush() == "</"


def test_generate_text_stop_cuts_the_output():
    tok = ByteTokenizer()
    model = tiny_model("dense", vocab=257)
    free = generate(model, "abc", max_new_tokens=30, tokenizer=tok, greedy=True)
    assert len(free) > 6
    stop = free[4:6]
    cut = generate(model, "abc", max_new_tokens=30, tokenizer=tok, greedy=True, stop=[stop])
    assert cut == free[: free.index(stop)]


# ---- the session ------------------------------------------------------------------------------


def test_history_drops_oldest_turns_to_fit_the_window(word_tok):
    model = tiny_model("dense", "rustgpt", vocab=word_tok.vocab_size, max_seq_len=40)
    s = ChatSession(loaded_of(model, word_tok), max_new_tokens=10, greedy=True)
    s.turns = [[5] * 8, [6] * 8, [7] * 8, [8] * 8]
    history, q = s.build_prompt("What is the sun?")
    assert q == word_tok.encode("User: What is the sun? Assistant:")
    # budget = 40 - min(10, 20) = 30 tokens: the question (9) + the two newest turns (16)
    assert history == [7] * 8 + [8] * 8
    assert s.turns == [[7] * 8, [8] * 8]
    assert len(history) + len(q) <= 30


def test_ask_formats_the_question_and_records_the_turn(word_tok):
    model = tiny_model("dense", "rustgpt", vocab=word_tok.vocab_size)
    s = ChatSession(loaded_of(model, word_tok), max_new_tokens=12, greedy=True)
    pieces: list[str] = []
    answer = s.ask("What is the sun?", stream=pieces.append)
    prompt = word_tok.encode("User: What is the sun? Assistant:")
    ids = list(generate_ids(model, prompt, 12, SamplingParams(greedy=True), stop_ids=[1]))
    assert answer == word_tok.decode(ids).strip()
    assert "".join(pieces) == answer
    assert s.turns == [prompt + ids + [word_tok.eot_id]]
    # the next question sees the first turn
    second = s.ask("Where do fish live?")
    prompt2 = s.turns[0] + word_tok.encode("User: Where do fish live? Assistant:")
    ids2 = list(generate_ids(model, prompt2, 12, SamplingParams(greedy=True), stop_ids=[1]))
    assert second == word_tok.decode(ids2).strip()
    no_hist = ChatSession(loaded_of(model, word_tok), 12, greedy=True, keep_history=False)
    no_hist.ask("What is the sun?")
    assert no_hist.build_prompt("x")[0] == []


def test_overfit_model_answers_its_training_question(word_tok):
    """The chat format end to end in memory: a model trained on one exchange recalls it."""
    torch.manual_seed(0)
    model = (
        tiny_model("dense", "rustgpt", vocab=word_tok.vocab_size, d_model=48, d_ff=96)
        .float()
        .train()
    )
    q, a = QA[0]
    ids = torch.tensor([word_tok.encode(exchange(q, a))])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    s = ChatSession(loaded_of(model.eval(), word_tok), max_new_tokens=30, greedy=True)
    assert s.ask(q) == a  # "heat ." detokenised to the training text's "heat."
    # typed without capitals or "?": normalised to the trained spelling, the same answer
    assert s.ask("what IS the Sun") == a


def test_questions_are_normalised_to_the_word_vocabulary(word_tok):
    assert normalise_words(word_tok, "what is the sun") == "What is the sun ?"
    assert normalise_words(word_tok, "WHERE do Fish live?!") == "Where do fish live ? !"
    assert normalise_words(word_tok, "hello there, Zork") == "hello there , Zork"
    ids = word_tok.encode(normalise_words(word_tok, "what is the sun"))
    assert ids == word_tok.encode("What is the sun?")


def test_line_editing_uses_readline_where_python_has_it():
    """With readline imported, input() edits the line: Up recalls the last question instead
    of sending ^[[A to the model (checked on a pseudo-terminal below)."""
    from archlab.commands.chat import enable_line_editing

    pytest.importorskip("readline")
    assert enable_line_editing() is True and "readline" in sys.modules


@pytest.mark.slow  # a chat process on a pseudo-terminal: ~10 s on 2 cores
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_up_arrow_recalls_the_previous_question_on_a_terminal(run_dir):
    import os
    import pty
    import select
    import subprocess
    import time

    pytest.importorskip("readline")
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "archlab", "chat", "--checkpoint", str(run_dir), "--greedy",
           "--max-new-tokens", "3"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(needle: bytes, count: int, timeout: float = 60.0) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while seen.count(needle) < count and time.monotonic() < end:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        read_until(b"You: ", 1)
        os.write(master, b"where do fish live\r")
        read_until(b"You: ", 2)
        os.write(master, b"\x1b[A\r")  # Up arrow, Enter: the same question again
        read_until(b"You: ", 3)
        os.write(master, b"exit\r")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert text.count("Assistant: ") == 2 and "^[[A" not in text and "\x1b[A" not in text
    assert text.count("where do fish live") == 2  # typed, then recalled by readline


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, word_tok):
    run = tmp_path_factory.mktemp("chat") / "run"
    model = tiny_model("dense", "rustgpt", vocab=word_tok.vocab_size)
    save_test_checkpoint(run, model, word_tok)
    return run


def test_chat_reads_questions_from_stdin_when_not_a_terminal(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the sun?\n\nWhere do fish live?\n"))
    rc = main(["chat", "--checkpoint", str(run_dir), "--greedy", "--max-new-tokens", "8"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    s = ChatSession(load(run_dir, device="cpu"), max_new_tokens=8, greedy=True)
    expected = [s.ask("What is the sun?"), s.ask("Where do fish live?")]
    assert out == [f"Assistant: {a}" for a in expected]


def test_chat_stops_at_exit_and_ignores_the_rest(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the sun?\nquit\nWhere do fish live?\n"))
    assert main(["chat", "--checkpoint", str(run_dir), "--greedy", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("ending", [EOFError, KeyboardInterrupt, "exit"])
def test_interactive_chat_prompts_and_ends_cleanly(run_dir, monkeypatch, capsys, ending):
    prompts: list[str] = []
    lines = iter(["What is the sun?", ending])

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        item = next(lines)
        if isinstance(item, type):
            raise item()
        return item

    monkeypatch.setattr(sys, "stdin", _Tty())
    monkeypatch.setattr(builtins, "input", fake_input)
    rc = main(["chat", "--checkpoint", str(run_dir), "--greedy", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert prompts == ["You: ", "You: "]
    answer_lines = [line for line in out.splitlines() if line.startswith("Assistant: ")]
    assert len(answer_lines) == 1


def test_ctrl_c_while_answering_ends_cleanly(run_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the sun?\n"))
    monkeypatch.setattr(ChatSession, "ask", interrupted)
    assert main(["chat", "--checkpoint", str(run_dir)]) == 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--checkpoint", "/nonexistent/run"], "does not exist"),
        (["--checkpoint", "RUN", "--temperature", "-2"], "--temperature"),
        (["--checkpoint", "RUN", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_chat_bad_input_is_one_line_exit_2(run_dir, capsys, argv, needle):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    try:  # argparse's own refusals (a flag's checked type) leave through SystemExit
        rc = main(["chat", *argv])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]

"""Progress output: live bars on a terminal, plain lines (no carriage returns) elsewhere,
nothing with --quiet; the model summary and run folder before the first training step."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from archlab import build_model, preset_config
from archlab import progress as progress_mod
from archlab.bench.compare import loop as compare
from archlab.bench.eval.evaluate import evaluate_lm
from archlab.progress import Progress, eta_seconds, format_count, format_duration, progress_mode
from archlab.train.progress import TrainProgress

SMALL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff", "64"]
STEP_LINE = re.compile(
    r"^step (\d+)/(\d+) loss \d+\.\d{4} lr \d\.\d\de[-+]\d\d [\d,]+ tok/s "
    r"elapsed \d\d:\d\d eta \d\d:\d\d$"
)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- the shared Progress ---------------------------------------------------------------------
def test_mode_follows_quiet_and_the_terminal():
    assert progress_mode(quiet=True, stream=FakeTTY()) == "off"
    assert progress_mode(stream=FakeTTY()) == "bar"
    assert progress_mode(stream=io.StringIO()) == "plain"


def test_formatting_and_eta():
    assert format_duration(5) == "00:05"
    assert format_duration(125.4) == "02:05"
    assert format_duration(3 * 3600 + 62) == "3:01:02"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"
    assert format_count(12345) == "12,345"
    assert format_count(12345, scale=True) == "12.3k" and format_count(4.56e6, True) == "4.56M"
    assert eta_seconds(done=10, remaining=30, elapsed=5.0) == 15.0
    assert eta_seconds(done=0, remaining=30, elapsed=5.0) is None


def test_plain_lines_have_no_carriage_returns_and_respect_the_interval():
    out = io.StringIO()
    with Progress(8, "work", "item", mode="plain", stream=out, every_s=0) as bar:
        for _ in range(8):
            bar.update(1, postfix="loss 1.0")
    lines = out.getvalue().splitlines()
    assert len(lines) == 8 and "\r" not in out.getvalue()
    assert re.fullmatch(r"work 3/8 item \(38%\) elapsed 00:00 eta 00:00 loss 1\.0", lines[2])
    assert lines[-1].startswith("work 8/8 item (100%)")
    # a long interval: updates print nothing; line() prints now
    out = io.StringIO()
    bar = Progress(None, "read", "doc", mode="plain", stream=out, every_s=3600)
    bar.update(5)
    assert out.getvalue() == ""
    bar.line()
    assert out.getvalue() == "read 5 doc elapsed 00:00\n"


def test_bar_mode_redraws_in_place_and_off_prints_nothing():
    tty = FakeTTY()
    with Progress(4, "work", "item", mode="bar", stream=tty) as bar:
        for _ in range(4):
            bar.update(1, postfix="x=1")
    text = tty.getvalue()
    assert "\r" in text and "4/4" in text and "x=1" in text
    quiet = FakeTTY()
    with Progress(4, "work", mode="off", stream=quiet) as bar:
        bar.update(4)
        bar.line()
        bar.write("message")
    assert quiet.getvalue() == ""


# ---- the trainer's sink ------------------------------------------------------------------------
def test_train_progress_bar_shows_loss_lr_tokens_per_second():
    tty = FakeTTY()
    sink = TrainProgress(total_steps=5, initial_step=0, tokens_per_step=64, desc="train dense",
                         mode="bar", stream=tty)  # fmt: skip
    sink.start("=== Model Architecture Summary ===\n...", "runs/x")
    for step in range(1, 6):
        sink.step(step, loss=5.0 - 0.1 * step, lr=1e-3, seconds=0.01)
    sink.eval(5, 4.5)
    sink.close()
    text = tty.getvalue()
    head = "=== Model Architecture Summary ===\n...\nRun folder: runs/x\nTraining: 5 steps of 64"
    assert text.startswith(head)
    assert "5/5" in text and "loss=4.5000" in text and "lr=1.00e-03" in text
    assert "tok/s=6,400" in text and "step 5: val loss 4.5000" in text


def test_train_progress_plain_lines_and_quiet():
    out = io.StringIO()
    sink = TrainProgress(total_steps=100, initial_step=40, tokens_per_step=64, desc="t",
                         log_interval=10, mode="plain", stream=out)  # fmt: skip
    sink.start("SUMMARY", "r")
    for step in range(41, 51):  # a line after the first step, then only at the log interval
        sink.step(step, 2.5, 1e-3, 0.1)
    sink.log(50, {"loss": 2.0, "tokens_per_s": 1234.4}, 1e-3)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["SUMMARY", "Run folder: r"]
    assert lines[2] == "Training: 60 steps of 64 tokens (3,840 tokens), resuming at step 40 of 100"
    assert STEP_LINE.match(lines[3]) and lines[3].startswith(
        "step 41/100 loss 2.5000 lr 1.00e-03 640 tok/s"
    )
    assert STEP_LINE.match(lines[4]) and lines[4].startswith("step 50/100 loss 2.0000")
    assert len(lines) == 5
    quiet = io.StringIO()
    sink = TrainProgress(total_steps=10, initial_step=0, tokens_per_step=1, desc="t",
                         mode="off", stream=quiet)  # fmt: skip
    sink.start("SUMMARY", "r")
    sink.log(10, {"loss": 2.0, "tokens_per_s": 1.0}, 1e-3)
    sink.eval(10, 2.0)
    assert quiet.getvalue() == ""
    sink.message("step 3: non-finite loss")  # warnings still print
    assert quiet.getvalue() == "step 3: non-finite loss\n"


# ---- archlab train end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def chars(tmp_path_factory) -> Path:
    from archlab.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("progress_data") / "chars"
    return prepare_dataset("stories", out, tokenizer="char", num_stories=200, verbose=False)


def _train(tmp_path: Path, data: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    run = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "archlab", "train", *SMALL, "--data", str(data),
           "--batch-size", "2", "--seq-len", "16", "--steps-per-epoch", "12",
           "--log-interval", "4", "--eval-interval", "6", "--eval-steps", "1",
           "--num-threads", "1", "--out-dir", str(run), *extra]  # fmt: skip
    with err.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=300)
    proc.stderr = err.read_text()
    return proc, run


def test_train_to_a_file_prints_summary_then_plain_lines(tmp_path, chars, capsys):
    proc, run = _train(tmp_path, chars)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert "\r" not in err
    lines = err.splitlines()
    step_lines = [ln for ln in lines if STEP_LINE.match(ln)]
    assert [STEP_LINE.match(ln).group(1, 2) for ln in step_lines] == [
        ("1", "12"),  # the first step at once, then every --log-interval
        ("4", "12"),
        ("8", "12"),
        ("12", "12"),
    ]
    assert [ln for ln in lines if "val loss" in ln] == [
        ln for ln in lines if re.fullmatch(r"step (6|12): val loss \d+\.\d{4}", ln)
    ] and sum("val loss" in ln for ln in lines) == 2
    # the model summary (exactly `archlab summary`'s) and the run folder come first
    from archlab.cli import main

    vocab = json.loads((chars / "meta.json").read_text())["vocab_size"]
    assert main(["summary", *SMALL, "--vocab-size", str(vocab)]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    first_step = err.index(step_lines[0])
    assert expected in err and err.index(expected) < first_step
    assert err.index(f"Run folder: {run}") < first_step
    assert "Training: 12 steps of 32 tokens (384 tokens)" in err
    # stdout keeps the result only
    assert proc.stdout.startswith("=== Training Summary ===")
    assert "Model Architecture Summary" not in proc.stdout


def test_train_quiet_prints_no_progress(tmp_path, chars):
    proc, run = _train(tmp_path, chars, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    assert "=== Training Summary ===" in proc.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


# ---- compare: overall and current run ----------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, pathlib, sys
    arch, run_dir = sys.argv[1], pathlib.Path(sys.argv[2])
    for s in range(1, 5):
        sys.stderr.write(f"step {s}/4 loss {5 - s / 10:.4f} lr 1.00e-03 100 tok/s "
                         f"elapsed 00:01 eta 00:02\\n")
    sys.stderr.write("step 4: val loss 4.0000\\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps(
        {"kind": "eval", "step": 4, "tokens": 64, "val_loss": 4.0, "elapsed_s": 0.3}) + "\\n")
    (run_dir / "summary.json").write_text(json.dumps(dict(
        architecture=arch, total_params=100, active_params=100, steps=4, tokens_seen=64,
        train_time_s=1.0, tokens_per_s=100.0, peak_mem_bytes=2**20, final_val_loss=4.0,
        nan_count=0, mfu=0.1, entropy_floor=0.5, status="ok", error=None)))
    """
)


@pytest.fixture
def fake_compare(tmp_path, monkeypatch):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    monkeypatch.setattr(
        compare,
        "child_command",
        lambda s, arch, seed, run_dir, resume, learning_rate=None: [
            sys.executable,
            str(script),
            arch,
            str(run_dir),
        ],
    )
    s = compare.settings_from_flags(
        dict(architectures=["dense", "moe"], max_tokens=64, seq_len=16, batch_size=1)
    )
    s.data = "unused"
    assert s.total_steps == 4
    return s


def test_compare_plain_progress_shows_runs_done_and_eta(tmp_path, fake_compare, monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    compare.run_compare(fake_compare, tmp_path / "cmp", resume=False, meta={}, stream=out)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    status = [ln for ln in lines if " | compare: " in ln]
    assert len(status) == 8
    assert status[0].startswith("[1/2 dense] step 1/4 loss 4.9000")
    assert re.search(r" \| compare: 0/2 runs done, eta \d\d:\d\d$", status[0])
    assert status[4].startswith("[2/2 moe] step 1/4") and "1/2 runs done" in status[4]
    assert "[1/2 dense] step 4: val loss 4.0000" in lines
    assert any(ln.startswith("[2/2 moe] done in") for ln in lines)
    # quiet: the outcome of each run, no progress
    quiet = io.StringIO()
    compare.run_compare(
        fake_compare, tmp_path / "cmp2", resume=False, meta={}, stream=quiet, quiet=True
    )
    q = quiet.getvalue()
    assert "step " not in q and "training ..." not in q
    assert "[1/2 dense] done in" in q and "[2/2 moe] done in" in q


def test_compare_bar_shows_overall_and_current_run(tmp_path, fake_compare):
    tty = FakeTTY()
    compare.run_compare(fake_compare, tmp_path / "cmp", resume=False, meta={}, stream=tty)
    text = tty.getvalue()
    assert "\r" in text
    assert "compare: 100%" in text and "8/8" in text and "2/2 runs done" in text
    assert "[2/2 moe]" in text and "4/4" in text and "loss 4.6000 lr 1.00e-03 100 tok/s" in text


# ---- eval and prepare ----------------------------------------------------------------------------
def test_eval_shows_its_batches_without_changing_the_result(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_INTERVAL_S", 0.0)
    torch.manual_seed(0)
    model = build_model(
        preset_config("dense", vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    ).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 200).astype(np.uint16)
    quiet = evaluate_lm(model, tokens, None, 16, 4, "cpu")
    capsys.readouterr()
    shown = evaluate_lm(model, tokens, None, 16, 4, "cpu", progress_mode="plain")
    assert shown[:2] == quiet[:2]
    lines = capsys.readouterr().err.splitlines()
    # 199 targets in 13 windows (12 of 16, one of 7): batches of 4, 4, 4, then the 16s left
    # (none) and the short window alone
    assert len(lines) == 4 and all(ln.startswith("eval ") for ln in lines)
    assert lines[0].startswith("eval 64/199 tok (32%)")
    assert lines[-1].startswith("eval 199/199 tok (100%)")


def test_prepare_shows_tokenizing_progress_in_characters(tmp_path, capsys, monkeypatch):
    from archlab.data.prepare import prepare_dataset

    monkeypatch.setattr(progress_mod, "PLAIN_INTERVAL_S", 0.0)
    corpus = tmp_path / "corpus.txt"
    docs = [f"document {i} " + "some words here. " * 20 for i in range(1200)]
    corpus.write_text("<|endoftext|>".join(docs))
    prepare_dataset(str(corpus), tmp_path / "out", tokenizer="char")
    err = capsys.readouterr().err
    assert "\r" not in err
    tok = [ln for ln in err.splitlines() if ln.startswith("archlab prepare: tokenizing ")]
    assert len(tok) == 3  # 1,200 documents in batches of 512
    assert re.match(r"archlab prepare: tokenizing \S+/\S+ char \(\d+%\)", tok[0])
    assert "(100%)" in tok[-1]
    capsys.readouterr()
    prepare_dataset(str(corpus), tmp_path / "out2", tokenizer="char", verbose=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("tty", "start"), [(True, "\r\x1b[K"), (False, "")])
def test_the_stop_notice_gets_a_line_of_its_own_on_a_terminal(monkeypatch, capfd, tty, start):
    """On a terminal the cursor is on the bar's line: the notice clears it first."""
    import signal

    from archlab.train.stop import StopRequest

    monkeypatch.setattr("os.isatty", lambda fd: tty)
    StopRequest()._handle(signal.SIGINT, None)
    err = capfd.readouterr().err
    assert err.startswith(start + "archlab train: SIGINT: finishing the current step")
    assert err.endswith("abort without saving)\n")

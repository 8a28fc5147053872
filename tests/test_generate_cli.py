"""`archlab generate`, `load` and the Python API against real checkpoint folders."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from test_generate import (
    ByteTokenizer,
    one_thread,  # noqa: F401  (autouse fixture)
    save_test_checkpoint,
    tiny_model,
)

import archlab
from archlab.cli import main
from archlab.data.tokenizer import train_bpe, train_word
from archlab.generate import LoadedModel, SamplingParams, generate, generate_ids, load

TEXTS = ["the sun is a star", "the moon moves around the earth", "rain falls from clouds"]


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    tok = train_word(TEXTS)
    run = tmp_path_factory.mktemp("gen") / "word"
    save_test_checkpoint(run, tiny_model("dense", "rustgpt", vocab=tok.vocab_size), tok)
    return run


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tok = train_bpe(TEXTS * 20 + ["héllo wörld 🙂 ünïcode"] * 5, vocab_size=300)
    run = tmp_path_factory.mktemp("gen") / "bpe"
    save_test_checkpoint(run, tiny_model("dense", vocab=tok.vocab_size, use_rope=True), tok)
    return run


def copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst, dst / "checkpoints" / (dst / "checkpoints" / "latest").read_text().strip()


def test_load_returns_model_config_tokenizer_device(word_run):
    loaded = load(word_run, device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.device == torch.device("cpu")
    assert loaded.config.preset == "rustgpt" and not loaded.model.training
    assert loaded.tokenizer.kind == "word"
    ref = tiny_model("dense", "rustgpt", vocab=loaded.tokenizer.vocab_size).float()
    got, want = loaded.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a checkpoint folder loads the same as its run folder
    ckpt = word_run / "checkpoints" / (word_run / "checkpoints" / "latest").read_text().strip()
    assert load(ckpt, device="cpu").generate("the sun", greedy=True, max_new_tokens=5) == (
        loaded.generate("the sun", greedy=True, max_new_tokens=5)
    )


def test_python_api_is_exported_from_the_package():
    """`from archlab import load, generate` gives the functions even after the submodule
    was imported first (a fresh interpreter, so import order is what we say it is)."""
    code = (
        "import types, archlab.generate\n"
        "from archlab import generate, load\n"
        "assert not isinstance(generate, types.ModuleType)\n"
        "assert generate.__name__ == 'generate' and load.__name__ == 'load'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert archlab.load is load and archlab.generate is generate


@pytest.mark.parametrize("stream", [False, True])
def test_cli_prints_the_continuation(word_run, capsys, stream):
    argv = [
        "generate",
        "--checkpoint",
        str(word_run),
        "--prompt",
        "the sun is",
        "--greedy",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]
    assert main(argv + (["--stream"] if stream else [])) == 0
    out = capsys.readouterr().out
    expected = generate(load(word_run, "cpu"), "the sun is", max_new_tokens=6, greedy=True)
    assert out == expected + "\n"


def test_cli_seed_reproduces_and_sampling_flags_apply(bpe_run, capsys):
    def run(*extra):
        argv = [
            "generate",
            "--checkpoint",
            str(bpe_run),
            "--prompt",
            "héllo",
            "--max-new-tokens",
            "20",
            *extra,
        ]
        assert main(argv) == 0
        return capsys.readouterr().out

    a = run("--seed", "3", "--temperature", "1.2", "--top-p", "0.95")
    assert a == run("--seed", "3", "--temperature", "1.2", "--top-p", "0.95")
    assert a != run("--seed", "4", "--temperature", "1.2", "--top-p", "0.95")
    assert run("--top-k", "1", "--seed", "9") == run("--greedy")
    loaded = load(bpe_run, "cpu")
    assert a == generate(loaded, "héllo", 20, temperature=1.2, top_p=0.95, seed=3) + "\n"


def test_cli_warns_once_when_the_prompt_is_truncated(tmp_path, capsys):
    tok = train_word(TEXTS)
    run = tmp_path / "short"
    save_test_checkpoint(run, tiny_model("dense", vocab=tok.vocab_size, max_seq_len=8), tok)
    prompt = " ".join(["the sun is a star"] * 4)  # 20 tokens > 8
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(run),
                "--prompt",
                prompt,
                "--greedy",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1
    assert "warning: prompt of 20 tokens exceeds the context window of 8" in cap.err
    expected = generate(load(run, "cpu"), " ".join(prompt.split()[-8:]), 3, greedy=True)
    assert cap.out == expected + "\n"


# ---- bad input: one line, exit 2 --------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_checkpoint(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "no checkpoint" in one_error_line(capsys)


def test_corrupt_weights(word_run, tmp_path, capsys):
    _, ckpt = copy_run(word_run, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "the sun"]) == 2
    line = one_error_line(capsys)
    assert "corrupt" in line or "cannot load" in line


def test_checkpoint_without_tokenizer(word_run, tmp_path, capsys):
    run, ckpt = copy_run(word_run, tmp_path)
    (ckpt / "tokenizer.json").unlink()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the sun"]) == 2
    assert "tokenizer.json" in one_error_line(capsys)


def test_checkpoint_with_garbage_tokenizer_and_config(word_run, tmp_path, capsys):
    run, ckpt = copy_run(word_run, tmp_path)
    (ckpt / "checksums.json").unlink()  # so the loader parses the files themselves
    argv = ["generate", "--checkpoint", str(run), "--prompt", "the sun"]
    assert main(argv) == 2  # without checksums: refused unless the user says so
    assert "no checksums.json" in one_error_line(capsys)
    (ckpt / "tokenizer.json").write_text("{not json")
    assert main([*argv, "--skip-checksums"]) == 2
    assert "tokenizer" in one_error_line(capsys)
    shutil.copy(word_run / "tokenizer.json", ckpt / "tokenizer.json")
    (ckpt / "config.json").write_text('{"architecture": "dense", "d_model": -3}')
    assert main([*argv, "--skip-checksums"]) == 2
    assert "config.json" in one_error_line(capsys)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--prompt", ""], "--prompt: empty value"),
        (["--prompt", "   "], "--prompt: empty value"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--top-k", "0"], "--top-k"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--device", "nonsense"], "--device"),
    ],
)
def test_bad_values(word_run, capsys, extra, needle):
    try:  # values refused by the flag's type leave through argparse's SystemExit
        rc = main(["generate", "--checkpoint", str(word_run), *extra])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert needle in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_unavailable_device(word_run, capsys):
    assert (
        main(["generate", "--checkpoint", str(word_run), "--prompt", "x", "--device", "cuda"]) == 2
    )
    assert "CUDA is not available" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "x", "--prompt", "y", "--bogus"],
        ["generate", "--checkpoint", "x", "--prompt", "y", "--top-k", "two"],
        ["generate", "--prompt", "y"],
        ["chat", "--checkpoint", "x", "--prompt", "y"],
    ],
)
def test_unknown_or_malformed_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bare_model_api_with_byte_tokenizer():
    model = tiny_model("dense", vocab=257)
    tok = ByteTokenizer()
    text = archlab.generate(model, "hé", max_new_tokens=10, greedy=True, tokenizer=tok)
    ids = generate_ids(model, tok.encode("hé"), 10, SamplingParams(greedy=True), stop_ids=[256])
    assert text == tok.decode(list(ids))  # invalid bytes from a random model decode lossily

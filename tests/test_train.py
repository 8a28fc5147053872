"""The training engine end to end: seed commands, exact resume, non-finite guard, data parallel,
staged training, learning, and one-line errors for bad input."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from archlab.cli import main
from archlab.train import checkpoint as ck
from archlab.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train.py")
# One intra-op thread in every process: CPU reductions depend on the thread count (exact
# resume compares processes), and tiny models gain nothing from more on a shared machine.
THREADS = ["--num-threads", "1"]
SMALL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train_data")


@pytest.fixture(scope="session")
def char_data(data_root):
    """Built-in stories, character level (small vocabulary keeps the tests fast)."""
    from archlab.data.prepare import prepare_dataset

    return prepare_dataset(
        "stories", data_root / "stories_char", tokenizer="char", num_stories=1500, verbose=False
    )


@pytest.fixture(scope="session")
def bpe_data(data_root):
    """Built-in stories with a small byte-level BPE (word-like tokens: fast to learn)."""
    from archlab.data.prepare import prepare_dataset

    return prepare_dataset(
        "stories", data_root / "stories_bpe", tokenizer="bpe", vocab_size=512, num_stories=1500,
        verbose=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def chat_data(data_root):
    from archlab.data.prepare import prepare_dataset

    return prepare_dataset("rustgpt-chat", data_root / "chat", verbose=False)


def train(*args: str | os.PathLike) -> int:
    return main(["train", *map(str, args), *THREADS])


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]


def eval_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run) if r["kind"] == "eval"]


def _require(arch: str) -> None:
    module = {
        "dense": "dense",
        "moe": "moe",
        "mamba": "mamba",
        "hybrid": "hybrid",
        "hypermixer": "hypermixer",
    }[arch]
    try:
        importlib.import_module(f"archlab.models.{module}")
    except ModuleNotFoundError:
        pytest.skip(f"{arch} block not built yet")


# ---- the seed commands ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["dense", "mamba", "moe", "hybrid"])
def test_seed_command_runs_at_nano(tmp_path, char_data, arch):
    """The seed's flags (AMP, gradient checkpointing, epochs x steps) at --model-size nano."""
    _require(arch)
    run = tmp_path / "run"
    rc = train(
        "--architecture", arch, "--stage", "language", "--model-size", "nano",
        "--batch-size", "2", "--gradient-accumulation-steps", "1", "--num-epochs", "1",
        "--steps-per-epoch", "2", "--learning-rate", "3e-4", "--warmup-steps", "1",
        "--use-amp", "--use-gradient-checkpointing", "--seq-len", "32", "--eval-steps", "1",
        "--data", char_data, "--out-dir", run,
    )  # fmt: skip
    assert rc == 0
    s = summary(run)
    assert s["status"] == "ok" and s["architecture"] == arch and s["steps"] == 2
    assert s["tokens_seen"] == 2 * 2 * 32 and math.isfinite(s["final_val_loss"])
    assert s["amp_dtype"] in ("bfloat16", "float16") and s["nan_count"] == 0
    assert s["train_config"]["use_gradient_checkpointing"] is True
    assert s["total_params"] > 0 and 0 < s["mfu"] < 1
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == [2]
    model, cfg, _ = ck.load_model(run)
    assert cfg.architecture == arch
    assert cfg.vocab_size == json.loads((char_data / "meta.json").read_text())["vocab_size"]
    if arch == "moe":
        rec = [r for r in recs if r["kind"] == "train"][-1]
        load = np.array(rec["expert_load"])
        assert load.shape == (cfg.n_layers, cfg.num_experts)
        assert np.allclose(load.sum(axis=1), 1.0, atol=1e-3) and rec["aux_loss"] > 0


def test_summary_and_metrics_follow_the_contract(tmp_path, char_data):
    run = tmp_path / "run"
    assert train("--data", char_data, *SMALL, "--seq-len", "32", "--batch-size", "4",
                 "--max-tokens", "1000", "--eval-interval", "4", "--eval-steps", "2",
                 "--log-interval", "2", "--checkpoint-interval", "4", "--keep-checkpoints", "2",
                 "--out-dir", run) == 0  # fmt: skip
    s = summary(run)
    for key in ("architecture", "total_params", "active_params", "steps", "tokens_seen",
                "train_time_s", "tokens_per_s", "peak_mem_bytes", "final_val_loss", "nan_count",
                "mfu", "entropy_floor", "status", "error", "model_config", "train_config"):  # fmt: skip
        assert key in s, key
    assert s["steps"] == math.ceil(1000 / (4 * 32)) == 8  # the token budget sets the steps
    from archlab.train.peak import peak  # the machine's peak, as this process sees it (cached)

    assert s["peak_flops"] == peak("cpu").flops and s["peak_flops_source"] in (
        "measured once (cached)", "stated"
    )  # fmt: skip
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / s["peak_flops"])
    assert s["tokens_seen"] == 8 * 4 * 32 and s["error"] is None
    assert (
        s["model_config"]["vocab_size"]
        == json.loads((char_data / "meta.json").read_text())["vocab_size"]
    )  # the vocabulary comes from the data
    recs = read_metrics(run)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    for r in train_recs:
        assert set(r) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s",
                          "peak_mem_bytes", "elapsed_s", "nan_count"}  # fmt: skip
        assert r["tokens"] == r["step"] * 128 and r["peak_mem_bytes"] > 0
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [4, 8]
    assert eval_losses(run)[-1][1] == pytest.approx(s["final_val_loss"])
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_0000004", "step_0000008"]
    # The final checkpoint reproduces the final validation loss exactly as evaluated.
    model, _, _ = ck.load_model(run)
    from archlab.data.loader import TokenDataset

    total, count = 0.0, 0
    for x, y in TokenDataset(char_data, "val").eval_batches(4, 32, 2, 0):
        with torch.no_grad():
            logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                 reduction="sum").item()  # fmt: skip
        count += y.numel()
    assert total / count == pytest.approx(s["final_val_loss"], rel=1e-5)


# ---- exact resume --------------------------------------------------------------------------
def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, char_data):
    common = [*SMALL, "--data", char_data, "--seq-len", "32", "--batch-size", "4",
              "--steps-per-epoch", "10", "--log-interval", "1", "--eval-interval", "3",
              "--eval-steps", "2", "--learning-rate", "1e-2", "--warmup-steps", "2",
              "--checkpoint-interval", "4", "--dropout", "0.1", "--seed", "3"]  # fmt: skip
    common = [str(c) for c in common]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert train(*common, "--out-dir", full) == 0
    proc = subprocess.run(
        [sys.executable, SCRIPT, *common, *THREADS, "--out-dir", str(killed),
         "--debug-sigkill-at-step", "6"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL, mid-run (via scripts/train.py)
    assert ck.latest_checkpoint(killed).name == "step_0000004"
    assert not (killed / "summary.json").exists()
    assert train("--resume", killed) == 0
    # every later step: the same loss, bit for bit (CPU, float32, dropout on)
    assert train_losses(killed) == train_losses(full)
    assert eval_losses(killed) == eval_losses(full)
    assert [s for s, _ in train_losses(killed)] == list(range(1, 11))
    s = summary(killed)
    assert s["status"] == "ok" and s["steps"] == 10 and s["resumed_from"].endswith("step_0000004")
    a = torch.load(ck.latest_checkpoint(full) / "trainer_state.pt", weights_only=True)
    b = torch.load(ck.latest_checkpoint(killed) / "trainer_state.pt", weights_only=True)
    assert a["step"] == b["step"] == 10 and torch.equal(a["data_rng"], b["data_rng"])


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "2",
                 "--steps-per-epoch", "2", "--out-dir", run) == 0  # fmt: skip
    before = sorted(p.name for p in ck.list_checkpoints(run))
    capsys.readouterr()
    assert train("--resume", run, "--learning-rate", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "--learning-rate 1.0 differs from the run being resumed" in err and "\n" not in err
    # a fresh run into a folder with checkpoints would overwrite them: refused
    assert train(*SMALL, "--data", char_data, "--out-dir", run) == 2
    assert "--resume" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train("--resume", tmp_path / "empty") == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert train("--resume", "--out-dir", tmp_path / "absent") == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in ck.list_checkpoints(run)) == before
    assert summary(run)["status"] == "ok"  # the refused commands left the run alone


def test_resume_refuses_a_model_size_that_does_not_fit(tmp_path, char_data, capsys):
    """--model-size with --resume used to be ignored silently; now it must match the run."""
    run = tmp_path / "run"
    assert train("--model-size", "nano", "--data", char_data, "--seq-len", "16", "--batch-size",
                 "2", "--steps-per-epoch", "2", "--out-dir", run) == 0  # fmt: skip
    before = sorted(p.name for p in ck.list_checkpoints(run))
    capsys.readouterr()
    assert train("--resume", run, "--model-size", "micro") == 2
    err = capsys.readouterr().err.strip()
    assert "--model-size micro does not fit checkpoint" in err and "d_model = 128" in err
    assert "\n" not in err
    assert sorted(p.name for p in ck.list_checkpoints(run)) == before
    # the size the run was built with fits (compare --resume passes it to every child)
    assert train("--resume", run, "--model-size", "nano", "--steps-per-epoch", "3") == 0
    assert summary(run)["steps"] == 3
    # a run built from explicit shapes is not "nano"
    small = tmp_path / "small"
    assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "2",
                 "--steps-per-epoch", "2", "--out-dir", small) == 0  # fmt: skip
    capsys.readouterr()
    assert train("--resume", small, "--model-size", "nano") == 2
    assert "--model-size nano does not fit checkpoint" in capsys.readouterr().err


def test_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "2",
                 "--steps-per-epoch", "4", "--checkpoint-interval", "2", "--out-dir", run) == 0  # fmt: skip
    latest = ck.latest_checkpoint(run)
    f = latest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert train("--resume", run) == 2
    err = capsys.readouterr().err.strip()
    assert "step_0000004" in err and "step_0000002" in err and "\n" not in err
    earlier = run / "checkpoints" / "step_0000002"
    ck.verify_checkpoint(earlier)  # still intact
    assert train("--resume", earlier, "--steps-per-epoch", "4") == 0  # and usable
    assert summary(run)["steps"] == 4


# ---- non-finite guard ------------------------------------------------------------------------
def test_nan_step_is_skipped_counted_once_and_leaves_weights_unchanged(tmp_path, char_data):
    run = tmp_path / "run"
    assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "2",
                 "--steps-per-epoch", "5", "--log-interval", "1", "--checkpoint-interval", "1",
                 "--keep-checkpoints", "10", "--debug-nan-at-step", "3", "--out-dir", run) == 0  # fmt: skip
    recs = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}
    assert [recs[s]["nan_count"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert math.isnan(float(recs[3]["loss"])) and all(
        math.isfinite(recs[s]["loss"]) for s in (1, 2, 4, 5)
    )
    s = summary(run)
    assert s["status"] == "ok" and s["nan_count"] == 1 and math.isfinite(s["final_val_loss"])

    def weights(step):
        from safetensors.torch import load_file

        return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))

    def adam_steps(step):
        st = torch.load(run / "checkpoints" / f"step_{step:07d}" / "trainer_state.pt",
                        weights_only=True)  # fmt: skip
        return {int(v["step"]) for v in st["optimizer"]["state"].values()}

    w2, w3, w4 = weights(2), weights(3), weights(4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the poisoned step changed nothing
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the next one trains again
    assert adam_steps(2) == adam_steps(3) == {2} and adam_steps(4) == {3}


def test_too_many_nan_steps_stop_the_run_without_a_bad_checkpoint(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    rc = train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "2",
               "--steps-per-epoch", "10", "--checkpoint-interval", "1", "--max-nan-steps", "3",
               *[a for s in (3, 4, 5, 6) for a in ("--debug-nan-at-step", str(s))],
               "--out-dir", run)  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 non-finite steps in a row" in err and "--max-nan-steps" in err
    s = summary(run)
    assert s["status"] == "failed" and "non-finite" in s["error"] and s["nan_count"] == 3
    assert s["steps"] == 5
    # skipped steps leave the last good weights in place; those are what got checkpointed
    from safetensors.torch import load_file

    names = [p.name for p in ck.list_checkpoints(run)]
    assert names[-1] == "step_0000004" and "step_0000005" not in names
    good = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    last = load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert all(torch.equal(good[k], last[k]) for k in good)


# ---- equivalences ----------------------------------------------------------------------------
def _losses_for(tmp_path, name, data, *extra):
    run = tmp_path / name
    assert train(*SMALL, "--data", data, "--seq-len", "24", "--steps-per-epoch", "4",
                 "--log-interval", "1", "--eval-steps", "2", "--learning-rate", "5e-3",
                 "--warmup-steps", "1", "--out-dir", run, *extra) == 0  # fmt: skip
    return train_losses(run), eval_losses(run)


@pytest.mark.parametrize("which", ["lm", "chat"])
def test_gradient_accumulation_matches_a_larger_batch(tmp_path, char_data, chat_data, which):
    """4 x 1 and 2 x 2 see the same windows; the loss is normalised by all counted tokens."""
    data = char_data if which == "lm" else chat_data
    big = _losses_for(tmp_path, "big", data, "--batch-size", "4", "--eval-steps", "1")
    acc = _losses_for(tmp_path, "acc", data, "--batch-size", "2",
                      "--gradient-accumulation-steps", "2", "--eval-steps", "2")  # fmt: skip
    for (s1, a), (s2, b) in zip(big[0], acc[0], strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=2e-5)


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, char_data):
    plain = _losses_for(tmp_path, "plain", char_data, "--batch-size", "2")
    ckpt = _losses_for(tmp_path, "gc", char_data, "--batch-size", "2",
                       "--use-gradient-checkpointing")  # fmt: skip
    for (s1, a), (s2, b) in zip(plain[0], ckpt[0], strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-6)


def _two_process_run(tmp_path, common, run):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), SCRIPT, *common,
           "--num-threads", "1", "--out-dir", str(run)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_gloo_matches_one_process_at_equal_global_batch(tmp_path, char_data):
    """2 ranks x batch 2 x accumulation 2 against 1 process x batch 4 x accumulation 2."""
    common = [*SMALL, "--data", str(char_data), "--seq-len", "32", "--steps-per-epoch", "5",
              "--log-interval", "1", "--eval-interval", "5", "--eval-steps", "4",
              "--learning-rate", "1e-2", "--warmup-steps", "1", "--device", "cpu",
              "--gradient-accumulation-steps", "2"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert train(*common, "--batch-size", "4", "--out-dir", one) == 0
    _two_process_run(tmp_path, [*common, "--batch-size", "2"], two)
    for (s1, a), (s2, b) in zip(train_losses(one), train_losses(two), strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
    for (s1, a), (s2, b) in zip(eval_losses(one), eval_losses(two), strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
    s = summary(two)
    assert s["world_size"] == 2 and s["tokens_seen"] == summary(one)["tokens_seen"]
    # rank 0 alone logged and checkpointed: one record per step, one checkpoint folder
    assert len(train_losses(two)) == 5 and [p.name for p in ck.list_checkpoints(two)] == [
        "step_0000005"
    ]


# ---- learning ------------------------------------------------------------------------------
def unigram_entropy(data_dir: Path) -> float:
    """H of the train split's token frequencies, nats/token: what a context-free model reaches."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.memmap(data_dir / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    p = np.bincount(tokens, minlength=meta["vocab_size"]).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def test_small_model_learns_well_below_the_unigram_entropy(tmp_path, bpe_data):
    run = tmp_path / "run"
    assert train("--d-model", "64", "--n-heads", "4", "--n-layers", "2", "--d-ff", "256",
                 "--data", bpe_data, "--seq-len", "64", "--batch-size", "16",
                 "--steps-per-epoch", "150", "--learning-rate", "1e-2", "--warmup-steps", "10",
                 "--eval-interval", "0", "--eval-steps", "8", "--out-dir", run) == 0  # fmt: skip
    h = unigram_entropy(bpe_data)
    assert h > 4.5  # word-like tokens of the stories
    assert summary(run)["final_val_loss"] < 0.55 * h


@pytest.mark.slow
def test_nano_dense_learns_stories_well_below_the_unigram_entropy(tmp_path, bpe_data):
    run = tmp_path / "run"
    assert train("--model-size", "nano", "--data", bpe_data, "--seq-len", "128",
                 "--batch-size", "16", "--steps-per-epoch", "400", "--learning-rate", "3e-3",
                 "--warmup-steps", "20", "--eval-interval", "0", "--eval-steps", "8",
                 "--out-dir", run) == 0  # fmt: skip
    h = unigram_entropy(bpe_data)
    assert summary(run)["final_val_loss"] < 0.4 * h


# ---- stages -------------------------------------------------------------------------------
def test_code_stage_continues_from_the_language_checkpoint(
    tmp_path, char_data, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # data prepared from a source goes to ./data
    lang = tmp_path / "lang"
    assert train(*SMALL, "--data", char_data, "--seq-len", "32", "--batch-size", "2",
                 "--steps-per-epoch", "2", "--out-dir", lang) == 0  # fmt: skip
    code_src = tmp_path / "code"
    code_src.mkdir()
    for f in sorted((ROOT / "src" / "archlab" / "train").glob("*.py")):
        shutil.copy(f, code_src / (f.stem + ".txt"))
    from archlab.train.config import TrainConfig
    from archlab.train.trainer import Trainer

    cfg = TrainConfig(stage="code", data=str(code_src), init_from=str(lang), seq_len=32,
                      batch_size=2, steps_per_epoch=2, out_dir=str(tmp_path / "code_run"))  # fmt: skip
    trainer = Trainer(cfg, None, progress=False)
    # the code data was encoded with the language checkpoint's tokenizer ...
    assert (trainer.data_dir / "tokenizer.json").read_text() == (
        ck.latest_checkpoint(lang) / "tokenizer.json"
    ).read_text()
    # ... and training starts from its weights
    start, _, _ = ck.load_model(lang)
    for (n, a), (_, b) in zip(start.state_dict().items(), trainer.model.state_dict().items(),
                              strict=True):  # fmt: skip
        assert torch.equal(a, b), n
    s = trainer.fit()
    assert s["status"] == "ok" and s["init_from"] == str(lang) and s["steps"] == 2
    # shapes that do not fit the checkpoint: one clear line, exit 2
    capsys.readouterr()
    assert train("--stage", "code", "--data", code_src, "--init-from", lang, "--d-model", "64",
                 "--out-dir", tmp_path / "bad") == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--d-model 64 does not fit checkpoint" in err and "\n" not in err
    # a prepared folder with another tokenizer does not fit either
    assert train("--stage", "code", "--data", chat_data_dir(tmp_path), "--init-from", lang,
                 "--out-dir", tmp_path / "bad2") == 2  # fmt: skip
    assert "different tokenizer" in capsys.readouterr().err


def chat_data_dir(tmp_path: Path) -> Path:
    from archlab.data.prepare import prepare_dataset

    return prepare_dataset("rustgpt-chat", tmp_path / "other_chat", verbose=False)


def test_rustgpt_language_then_chat_end_to_end(tmp_path, monkeypatch):
    """--preset rustgpt on the built-in corpus, then chat from it: loss on assistant tokens."""
    monkeypatch.chdir(tmp_path)  # default data folders go to ./data
    assert train("--preset", "rustgpt", "--stage", "language", "--batch-size", "4",
                 "--steps-per-epoch", "3", "--eval-steps", "2", "--out-dir", "pre") == 0  # fmt: skip
    pre = summary(tmp_path / "pre")
    assert pre["model_config"]["preset"] == "rustgpt" and pre["seq_len"] == 80
    assert Path(pre["data_dir"]).name.startswith("rustgpt")
    assert train("--stage", "chat", "--init-from", "pre", "--batch-size", "4",
                 "--steps-per-epoch", "3", "--eval-steps", "2", "--out-dir", "chat") == 0  # fmt: skip
    s = summary(tmp_path / "chat")
    assert s["status"] == "ok" and s["model_config"] == pre["model_config"]
    meta = json.loads((Path(s["data_dir"]) / "meta.json").read_text())
    assert meta["has_mask"] and meta["source"] == "rustgpt-chat"
    # the reported validation loss is the mean CE over assistant tokens only
    from archlab.data.loader import TokenDataset

    model, _, _ = ck.load_model(tmp_path / "chat")
    total, count, all_tokens = 0.0, 0, 0
    for x, y in TokenDataset(s["data_dir"], "val").eval_batches(4, 80, 2, 0):
        with torch.no_grad():
            logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()  # fmt: skip
        count += int((y != -100).sum())
        all_tokens += y.numel()
    assert 0 < count < all_tokens
    assert total / count == pytest.approx(s["final_val_loss"], rel=1e-5)


def test_chat_stage_needs_masked_data(tmp_path, char_data, capsys):
    assert train("--stage", "chat", *SMALL, "--data", char_data, "--out-dir", tmp_path / "r") == 2
    assert "no assistant-token mask" in capsys.readouterr().err


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_2(tmp_path, char_data, capsys):
    cases = [
        (["--data", tmp_path / "missing_dir"], "--data"),
        (["--data", char_data, "--seq-len", "4096"], "exceeds the model's max_seq_len"),
        (["--data", char_data, "--vocab-size", "10"], "smaller than the data's vocabulary"),
        (["--data", char_data, "--architecture", "rnn"], "unknown architecture"),
        (["--data", char_data, "--device", "cuda"] if not torch.cuda.is_available() else
         ["--data", char_data, "--batch-size", "0"], "--"),
    ]  # fmt: skip
    for args, needle in cases:
        capsys.readouterr()
        assert train(*SMALL, *args, "--out-dir", tmp_path / "r") == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_out_of_memory_is_one_line_and_the_run_is_marked_failed(
    tmp_path, char_data, capsys, monkeypatch
):
    from archlab.train.step import StepRunner

    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StepRunner, "forward_backward", boom)
    run = tmp_path / "r"
    # --quiet: no model summary / progress before the error, so stderr is exactly one line
    assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--out-dir", run, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert (
        "out of memory" in err
        and "--batch-size" in err
        and "--use-gradient-checkpointing" in err
        and "2.00 GiB" in err
    )
    assert len(err.splitlines()) == 1
    s = summary(run)
    assert s["status"] == "failed" and "OutOfMemoryError" in s["error"]


def test_logging_backends_are_optional(tmp_path, char_data, capsys):
    """Used when installed (TensorBoard events written); one clear line when not."""
    import importlib.util

    for flag, pkg in (("--tensorboard", "tensorboard"), ("--wandb", "wandb")):
        run = tmp_path / pkg
        if importlib.util.find_spec(pkg) is None:
            capsys.readouterr()
            assert train(*SMALL, "--data", char_data, flag, "--out-dir", run) == 2
            assert f"{flag}: the {pkg} package is not installed" in capsys.readouterr().err
        elif pkg == "tensorboard":
            assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "2",
                         "--steps-per-epoch", "2", flag, "--out-dir", run) == 0  # fmt: skip
            events = list((run / "tensorboard").glob("events.out.tfevents.*"))
            assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, char_data):
    eager = _losses_for(tmp_path, "eager", char_data, "--batch-size", "2")
    compiled = _losses_for(tmp_path, "compiled", char_data, "--batch-size", "2", "--use-compile")
    for (s1, a), (s2, b) in zip(eager[0], compiled[0], strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-4)


def test_fp16_with_a_gradient_scaler_where_bf16_is_missing(tmp_path, char_data, monkeypatch):
    """The fallback path of --use-amp (fp16 autocast + GradScaler), forced on this CPU."""
    from archlab.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "amp_dtype", lambda device: (torch.float16, True))
    run = tmp_path / "run"
    assert train(*SMALL, "--data", char_data, "--seq-len", "16", "--batch-size", "4",
                 "--steps-per-epoch", "6", "--learning-rate", "1e-2", "--log-interval", "1",
                 "--use-amp", "--out-dir", run) == 0  # fmt: skip
    s = summary(run)
    assert s["status"] == "ok" and s["amp_dtype"] == "float16" and s["nan_count"] == 0
    losses = [loss for _, loss in train_losses(run)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    state = torch.load(ck.latest_checkpoint(run) / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler's state is checkpointed for resume


def test_scripts_train_without_the_dependencies_says_to_install_them(tmp_path):
    """scripts/train.py on a Python without torch (the package not installed): one line, exit 2."""
    blocker = "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['train.py', '--help']; "
    proc = subprocess.run(
        [sys.executable, "-c", blocker + f"runpy.run_path({SCRIPT!r}, run_name='__main__')"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "dependencies are not installed" in proc.stderr and "pip install -e ." in proc.stderr

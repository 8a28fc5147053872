"""Nothing lost, round two (issue 20): every user or environment mistake is one line, a
non-zero exit (0 only where nothing was asked of the command) and nothing of the user's touched.

One table drives the cases: each runs the CLI in-process, and the whole tree of run folders,
data and exports beside it is hashed before and after (only lock files, which record the
holder's pid, may change).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from archlab.cli import main
from archlab.fsutil import lock_beside

THREADS = ["--num-threads", "1"]
NANO = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32",
        "--max-seq-len", "32", "--seq-len", "16", "--batch-size", "2"]  # fmt: skip


# ---- one tree of real folders, built once -------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/data/chars (prepared), root/runs/{a,b} (finished 4-step runs), root/export (an
    export of a, when transformers is installed), root/mine (a user's folder)."""
    from archlab.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("nothing_lost")
    data = prepare_dataset(
        "stories", root / "data" / "chars", tokenizer="char", num_stories=120, verbose=False
    )
    for seed, name in enumerate(("a", "b")):
        argv = ["train", *NANO, "--steps-per-epoch", "4", "--eval-steps", "1", "--quiet",
                "--seed", str(seed),
                "--data", str(data), "--out-dir", str(root / "runs" / name), *THREADS]  # fmt: skip
        assert main(argv) == 0
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own file\n")
    configs = root / "configs"
    configs.mkdir()
    for name, text in CONFIGS.items():
        (configs / f"{name}.yaml").write_text(text + "\n")
    (configs / "garbage-tokenizer.json").write_text('{"garbage": true}\n')
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\n  bad: [indent\n")
    # token ids at or above the vocabulary: meta.json's vocabulary too small for train.bin;
    # a val.bin holding id 60000 (and, like an older folder, no max id in meta.json)
    small = root / "data" / "small-vocab"
    shutil.copytree(data, small)
    meta = json.loads((small / "meta.json").read_text())
    meta["vocab_size"] = 5
    (small / "meta.json").write_text(json.dumps(meta))
    high = root / "data" / "high-id"
    shutil.copytree(data, high)
    meta = json.loads((high / "meta.json").read_text())
    meta.pop("val_max_id")
    (high / "meta.json").write_text(json.dumps(meta))
    with open(high / "val.bin", "r+b") as f:
        f.seek(10)
        f.write(np.array([60000], dtype=meta["dtype"]).tobytes())
    unsealed = root / "runs" / "unsealed"
    shutil.copytree(root / "runs" / "a", unsealed)
    for sums in unsealed.rglob("checksums.json"):
        sums.unlink()
    try:
        import transformers  # noqa: F401

        assert main(["export", "--checkpoint", str(root / "runs" / "a"),
                     "--out", str(root / "export")]) == 0  # fmt: skip
    except ImportError:
        pass
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content (lock files hold the last holder's pid: skipped)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(argv: list[str]) -> int:
    """main()'s exit code; argparse's own refusals leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    code: int
    says: str  # a part of the one stderr line
    needs_hf: bool = False
    cwd: str | None = None  # relative to the tree's root
    needs: str | None = None  # a module to import, or "no-cuda"
    creates: str | None = None  # the new run folder that records its own failure
    slow: bool = False


CONFIGS = {
    "max-tokens-overflow": "max_tokens: 1e400",
    "seq-len-inf": "seq_len: .inf",
    "out-dir-list": "out_dir: [a, b]",
    "architecture-list": "architecture: [dense]",
    "init-from-number": "init_from: 3",
    "seed-huge": "seed: 1.0e+23",
    "beta-out-of-range": "beta2: 1.5",
}


def _cfg(name: str) -> Callable[[Path], list[str]]:
    return lambda r: ["train", "--config", str(r / "configs" / f"{name}.yaml")]


def _run(*argv: str) -> Callable[[Path], list[str]]:
    """argv with {root} filled in."""
    return lambda r: [a.format(root=r) for a in argv]


def _export(out: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda r: ["export", "--checkpoint", str(r / "runs" / "a"), "--out",
                      out.format(root=r), *extra]  # fmt: skip


CASES = [
    # ---- export --force never deletes what it did not write (real run folders) ----
    Case("export onto its run folder", _export("{root}/runs/a", "--force"), 2,
         "is or contains the checkpoint", needs_hf=True),
    Case("export onto the parent of the runs", _export("{root}/runs", "--force"), 2,
         "is or contains the checkpoint", needs_hf=True),
    Case("export onto another run", _export("{root}/runs/b", "--force"), 2,
         "holds files an export did not write", needs_hf=True),
    Case('export --out "" (an unset variable)', _export("", "--force"), 2,
         "--out: empty value", needs_hf=True, cwd="mine"),
    Case("export onto the current directory", _export(".", "--force"), 2,
         "is or contains the current directory", needs_hf=True, cwd="mine"),
    Case("export onto a user's folder", _export("{root}/mine", "--force"), 2,
         "holds files an export did not write", needs_hf=True),
    Case("export onto an earlier export without --force", _export("{root}/export"), 2,
         "exists and is not empty (use --force", needs_hf=True),
    Case("export onto a file", _export("{root}/mine/notes.txt", "--force"), 2,
         "exists and is not a folder", needs_hf=True),
    # ---- numbers, from flags and from --config files --------------------------------------
    Case("train --seed -1", _run("train", "--seed", "-1"), 2,
         "argument --seed: must be an integer in [0, 4294967295] (got '-1')"),
    Case("train --seed 1e23", _run("train", "--seed", "1e23"), 2, "argument --seed: must be"),
    Case("generate --seed -1", _run("generate", "--checkpoint", "{root}/runs/a", "--prompt",
                                    "a", "--seed", "-1"), 2, "argument --seed: must be"),
    Case("compare --seed 1e23", _run("compare", "--seed", "1e23"), 2, "argument --seed"),
    Case("bench recall --seed -1", _run("bench", "recall", "--seed", "-1"), 2,
         "argument --seed"),
    Case("eval --seed 1e23", _run("eval", "--checkpoint", "{root}/runs/a", "--tasks", "x",
                                  "--seed", "1e23"), 2, "argument --seed"),
    Case("train --max-tokens 1e400", _run("train", "--max-tokens", "1e400"), 2,
         "argument --max-tokens: must be a token count"),
    Case("train --learning-rate nan", _run("train", "--learning-rate", "nan"), 2,
         "argument --learning-rate: must be a finite number > 0 (got 'nan')"),
    Case("train --dropout inf", _run("train", "--dropout", "inf"), 2, "argument --dropout"),
    Case("eval --limit nan", _run("eval", "--checkpoint", "{root}/runs/a", "--tasks", "x",
                                  "--limit", "nan"), 2, "argument --limit: must be"),
    Case("eval --limit inf", _run("eval", "--checkpoint", "{root}/runs/a", "--tasks", "x",
                                  "--limit", "inf"), 2, "argument --limit: must be"),
    Case("eval --limit 1e30", _run("eval", "--checkpoint", "{root}/runs/a", "--tasks", "x",
                                   "--limit", "1e30"), 2, "argument --limit: must be"),
    Case("eval --num-fewshot -3", _run("eval", "--checkpoint", "{root}/runs/a", "--tasks", "x",
                                       "--num-fewshot", "-3"), 2,
         "argument --num-fewshot: must be an integer >= 0"),
    Case("config max_tokens: 1e400", _cfg("max-tokens-overflow"), 2,
         "max_tokens: must be a token count"),
    Case("config seq_len: .inf", _cfg("seq-len-inf"), 2,
         "seq_len: must be an integer >= 1 (got inf)"),
    Case("config out_dir: [a, b]", _cfg("out-dir-list"), 2, "out_dir: expected text (got a list"),
    Case("config architecture: [dense]", _cfg("architecture-list"), 2,
         "architecture: expected text (got a list"),
    Case("config init_from: 3", _cfg("init-from-number"), 2, "init_from: expected text"),
    Case("config seed: 1e23", _cfg("seed-huge"), 2, "seed: must be an integer in"),
    Case("config beta2: 1.5", _cfg("beta-out-of-range"), 2, "beta2: must be a number in [0, 1)"),
    # ---- empty values -----------------------------------------------------------------------
    Case('train --out-dir ""', _run("train", "--out-dir", ""), 2, "argument --out-dir: empty value"),
    Case('train --data ""', _run("train", "--data", ""), 2, "argument --data: empty value"),
    Case('bench recall --d-models ""', _run("bench", "recall", "--d-models", ""), 2,
         "argument --d-models: empty value"),
    Case('bench recall --kv-pairs ""', _run("bench", "recall", "--kv-pairs", ""), 2,
         "argument --kv-pairs: empty value"),
    Case('bench recall --learning-rates ""', _run("bench", "recall", "--learning-rates", ""), 2,
         "argument --learning-rates: empty value"),
    Case('prepare --out ""', _run("prepare", "stories", "--out", ""), 2,
         "argument --out/--out-dir: empty value"),
    # ---- flags that would change nothing, wrong names -------------------------------------
    Case("eval --limit without --tasks", _run("eval", "--checkpoint", "{root}/runs/a",
                                              "--limit", "5"), 2,
         "--limit apply only with --tasks"),
    Case("eval --include-path without --tasks",
         _run("eval", "--checkpoint", "{root}/runs/a", "--include-path", "{root}/tasks"), 2,
         "--include-path apply only with --tasks"),
    Case("train --top-k on dense", _run("train", "--top-k", "2", "--data", "{root}/data/chars"),
         2, "--top-k: not used by --architecture dense"),
    Case("rustgpt preset on mamba", _run("train", "--preset", "rustgpt", "--architecture",
                                         "mamba", "--data", "{root}/data/chars"), 2,
         "--preset rustgpt: only defined for --architecture dense or hypermixer"),
    Case("--init-from differs on resume", _run("train", "--resume", "{root}/runs/a",
                                               "--init-from", "{root}/runs/b"), 2,
         "differs from the run being resumed (--init-from: not given)"),
    Case("--seq-len beyond the window, data not prepared",
         _run("train", "--seq-len", "100000", "--data", "{root}/mine/notes.txt"), 2,
         "--seq-len 100000 exceeds the model's max_seq_len 256", cwd="mine"),
    # ---- files that are not what their name says ----------------------------------------
    Case("data ids above meta.json's vocabulary",
         _run("train", *NANO, "--data", "{root}/data/small-vocab", "--out-dir",
              "{root}/mine/new-run"), 2,
         "train.bin holds token id", creates="mine/new-run"),
    Case("eval on a val.bin holding id 60000",
         _run("eval", "--checkpoint", "{root}/runs/a", "--data", "{root}/data/high-id"), 2,
         "val.bin holds token id 60000"),
    Case("a checkpoint without checksums.json",
         _run("generate", "--checkpoint", "{root}/runs/unsealed", "--prompt", "a"), 2,
         "has no checksums.json"),
    Case("a JSON file that is not a tokenizer",
         _run("prepare", "stories", "--tokenizer", "{root}/configs/garbage-tokenizer.json",
              "--out", "{root}/mine/d", "--quiet"), 2, "garbage-tokenizer.json is not a tokenizer"),
    Case("a task YAML with a syntax error",
         _run("eval", "--checkpoint", "{root}/runs/a", "--tasks", "broken", "--include-path",
              "{root}/tasks"), 2, "broken.yaml: YAML syntax error at line 3", needs="lm_eval",
         slow=True),
    Case("--resume of a file", _run("train", "--resume", "{root}/runs/a/summary.json"), 2,
         "summary.json is a file, not a run or checkpoint folder"),
    Case("--num-threads 100000 (OpenMP would crash)", _run("train", "--num-threads", "100000"),
         2, "argument --num-threads: must be an integer in [1, 1024]"),
    # ---- the environment --------------------------------------------------------------------
    Case("out of memory (one allocation of TiBs)",
         _run("train", *NANO, "--vocab-size", "1000000000000", "--data", "{root}/data/chars",
              "--quiet", "--out-dir", "{root}/mine/oom"), 2,
         "out of memory: one allocation of", creates="mine/oom"),
    Case("compare --device cuda without CUDA",
         _run("compare", "--device", "cuda", "--architectures", "dense", "--data",
              "{root}/data/chars", "--out-dir", "{root}/mine/cmp"), 2,
         "--device cuda: no CUDA device is available", needs="no-cuda"),
    # ---- resume -------------------------------------------------------------------------
    Case("resume of a finished run", lambda r: ["train", "--resume", str(r / "runs" / "a")], 0,
         "already finished at step 4; give a larger --max-tokens to continue"),
    Case("resume with a budget below what was trained",
         lambda r: ["train", "--resume", str(r / "runs" / "a"), "--max-tokens", "40"], 2,
         "--max-tokens 40 is 2 steps, fewer than the 4 this run already trained"),
    Case("resume with fewer steps per epoch",
         lambda r: ["train", "--resume", str(r / "runs" / "a"), "--steps-per-epoch", "3"], 2,
         "--steps-per-epoch 3 is 3 steps, fewer than the 4"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES],
)
def test_each_mistake_is_one_line_and_touches_nothing(case, tree, capsys, monkeypatch):
    if case.needs_hf:
        pytest.importorskip("transformers")
    if case.needs == "no-cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    elif case.needs is not None:
        pytest.importorskip(case.needs)
    if case.cwd is not None:
        monkeypatch.chdir(tree / case.cwd)
    before = snapshot(tree)
    rc = run_cli([*case.argv(tree), *(THREADS if case.argv(tree)[0] == "train" else [])])
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert rc == case.code, line
    assert case.says in line, line
    after = snapshot(tree)
    if case.creates is not None:  # a new run's folder holds its failure summary, nothing else
        new = {k for k in after if k.startswith(case.creates + "/")}
        assert new == {f"{case.creates}/summary.json"}, new
        shutil.rmtree(tree / case.creates)
        after = {k: v for k, v in after.items() if k not in new}
    assert after == before
    assert not [p for p in tree.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


# ---- export: the cases that need a setting of their own ----------------------------------------
def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")


@pytest.fixture
def mount(tmp_path):
    made: list[Path] = []

    def make(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, options)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_export_onto_a_mount_point_keeps_its_contents(tree, mount, capsys):
    pytest.importorskip("transformers")
    point = mount("mnt", "size=4m")
    (point / "data.txt").write_text("on the mount\n")
    rc = main(["export", "--checkpoint", str(tree / "runs" / "a"), "--out", str(point),
               "--force"])  # fmt: skip
    assert rc == 2
    assert "is a mount point" in one_line(capsys.readouterr().err)
    assert [p.name for p in point.iterdir()] == ["data.txt"]


def test_export_force_replaces_its_own_export_only_after_verifying(tree, tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "exp"
    shutil.copytree(tree / "export", out)
    old = snapshot(out)
    ckpt_b = tree / "runs" / "b"
    assert main(["export", "--checkpoint", str(ckpt_b), "--out", str(out), "--force"]) == 0
    assert "verified" in capsys.readouterr().out
    new = snapshot(out)
    assert new.keys() == old.keys() and new["model.safetensors"] != old["model.safetensors"]
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "config.json").stat().st_mode & 0o777  # 0644 like the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary, no lock left


def test_two_exports_to_one_folder_the_second_is_refused(tree, tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "exp"
    with lock_beside(out, "export folder"):
        rc = main(["export", "--checkpoint", str(tree / "runs" / "a"), "--out", str(out)])
        line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"export folder {out} is in use" in line and f"pid {os.getpid()}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_onto_a_full_disk_is_one_line_and_keeps_the_earlier_export(tree, mount, capsys):
    pytest.importorskip("transformers")
    disk = mount("small", "size=56k")  # one export (9 pages of 4 kB) fits, not a second
    out = disk / "exp"
    shutil.copytree(tree / "export", out)
    before = snapshot(out)
    rc = main(["export", "--checkpoint", str(tree / "runs" / "b"), "--out", str(out), "--force"])
    line = one_line(capsys.readouterr().err)
    assert rc == 1
    assert line == (
        f"archlab export: error: no space left on device writing the export to {out}; "
        "the earlier export there is intact"
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in disk.iterdir()) == ["exp"]


def _poison(ckpt: Path) -> None:
    """Write a NaN into a checkpoint's weights and re-seal its checksums (a real NaN model)."""
    from safetensors.torch import load_file, save_file

    from archlab.train.checkpoint import CHECKPOINT_FILES, _sha256

    weights = load_file(ckpt / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, ckpt / "model.safetensors")
    sums = {f: _sha256(ckpt / f) for f in CHECKPOINT_FILES}
    (ckpt / "checksums.json").write_text(json.dumps(sums))


@pytest.fixture(scope="module")
def nan_run(tree, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(tree / "runs" / "a", run)
    from archlab.train.checkpoint import latest_checkpoint

    _poison(latest_checkpoint(run))
    return run


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "{run}", "--prompt", "a", "--max-new-tokens", "3"],
        ["generate", "--checkpoint", "{run}", "--prompt", "a", "--temperature", "0"],
        ["eval", "--checkpoint", "{run}"],
        ["train", "--resume", "{run}", "--steps-per-epoch", "6"],
        ["train", "--init-from", "{run}", "--out-dir", "{tmp}/child", "--data", "{data}"],
        ["export", "--checkpoint", "{run}", "--out", "{tmp}/exp"],
    ],
    ids=["generate", "greedy", "eval", "resume", "init-from", "export"],
)
def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(
    argv, nan_run, tree, tmp_path, capsys
):
    if argv[0] == "export":
        pytest.importorskip("transformers")
    data = tree / "data" / "chars"
    argv = [a.format(run=nan_run, tmp=tmp_path, data=data) for a in argv]
    before = snapshot(nan_run)
    rc = main([*argv, *(THREADS if argv[0] == "train" else [])])
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert rc == 2, line
    assert "holds non-finite weights (NaN or Inf)" in line
    assert captured.out == ""
    assert snapshot(nan_run) == before
    assert not (tmp_path / "exp").exists() and not (tmp_path / "child" / "checkpoints").exists()


def test_a_binary_latest_pointer_falls_back_to_the_newest_checkpoint(tree, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tree / "runs" / "a", run)
    (run / "checkpoints" / "latest").write_bytes(bytes(range(256)))
    rc = main(["train", "--resume", str(run), "--steps-per-epoch", "5", "--quiet", *THREADS])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


# ---- streams that cannot be written --------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _archlab(*argv: str, **kw) -> subprocess.CompletedProcess:
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "archlab", *argv], env=env, text=True, **kw)


def test_closed_or_full_streams_never_kill_a_run_and_a_lost_result_is_one_line(tree, tmp_path):
    run = str(tree / "runs" / "a")
    # generate with standard output closed (>&-): nothing could show the text
    gen = ["generate", "--checkpoint", run, "--prompt", "a", "--max-new-tokens", "2"]
    r = _archlab(*gen, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert r.returncode == 1 and one_line(r.stderr).endswith(
        "standard output is closed; nothing could show the result (redirect it to a file instead)"
    )
    # training with stderr closed and stdout on a full device: the run finishes and is saved
    out = tmp_path / "run"
    argv = ["train", *NANO, "--steps-per-epoch", "3", "--eval-steps", "1", *THREADS,
            "--data", str(tree / "data" / "chars"), "--out-dir", str(out)]  # fmt: skip
    with open("/dev/full", "w") as full:
        r = _archlab(*argv, stdout=full, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2))
    assert r.returncode == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"


# ---- prepare ------------------------------------------------------------------------------------
def test_prepare_bounds_a_huge_bpe_vocabulary_and_leaves_no_lock_or_temporary(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["prepare", "stories", "--tokenizer", "bpe", "--vocab-size", "1000000000",
            "--num-stories", "60", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["requested_vocab_size"] == 1_000_000_000
    assert 256 < meta["vocab_size"] < 10_000  # what the corpus gives, not a billion
    assert meta["dtype"] == "uint16" and meta["train_max_id"] < meta["vocab_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no .d.lock, no .d.tmp-*


# ---- every flag of every command goes through values.py ------------------------------------------
def test_every_flag_has_a_checked_type():
    """A new flag declares type=int/float (ranges in values.RANGES) or a values type; a text
    flag is a values.Text. Anything else would skip the finiteness/range/empty checks."""
    import argparse

    from archlab.cli import build_parser
    from archlab.values import CHECKED

    unchecked = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())
            elif action.type is not None and not isinstance(action.type, CHECKED):
                unchecked.append(f"{name} {action.option_strings or action.dest}")

    walk(build_parser(), "")
    assert unchecked == []

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

import pytest
import torch

from archlab.cli import main
from archlab.fsutil import lock_beside

THREADS = ["--num-threads", "1"]
NANO = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32",
        "--max-seq-len", "32", "--seq-len", "16", "--batch-size", "2"]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_mistake_is_one_line_and_touches_nothing(case, tree, capsys, monkeypatch):
    if case.needs_hf:
        pytest.importorskip("transformers")
    if case.cwd is not None:
        monkeypatch.chdir(tree / case.cwd)
    before = snapshot(tree)
    rc = run_cli([*case.argv(tree), *(THREADS if case.argv(tree)[0] == "train" else [])])
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert rc == case.code, line
    assert case.says in line, line
    assert snapshot(tree) == before
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

"""`archlab compare`: the end-to-end run on the real trainer, failures, resume, bad input."""

from __future__ import annotations

import json
import math
import shlex
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import pytest

from archlab.bench.compare import loop as compare
from archlab.bench.compare import report
from archlab.cli import build_parser, main
from archlab.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
C = {name: i for i, name in enumerate(report.TABLE_COLUMNS)}  # column index by header
OUTPUTS = (
    "report.md",
    "results.json",
    "results.csv",
    "loss_vs_tokens.png",
    "loss_vs_time.png",
    "loss_vs_flops.png",
    "compare.json",
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Built-in stories, char-level, a few hundred stories: prepared in well under a second."""
    from archlab.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "stories-char"
    return prepare_dataset("stories", out, tokenizer="char", num_stories=200, verbose=False)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_rows(text: str) -> dict[str, list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert _cells(lines[0])[0] == "Architecture"
    return {_cells(ln)[0]: _cells(ln) for ln in lines[1:]}


def test_compare_end_to_end(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--architectures",
        "transformer,hypermixer",
        "--data",
        str(tiny_data),
        "--max-tokens",
        "192",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--eval-interval",
        "1",
        "--eval-steps",
        "1",
        "--checkpoint-interval",
        "0",
        "--num-threads",
        "1",
        "--out-dir",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    meta = json.loads((tiny_data / "meta.json").read_text())

    # the printed table, report.md's table and results.json are the same numbers...
    printed_rows = _table_rows(printed.out)
    report = (out / "report.md").read_text()
    assert _table_rows(report) == printed_rows
    assert [printed_rows[a] for a in ("dense", "hypermixer")] == doc["table"]["rows"]
    # ... and those are the runs' own summary.json / metrics.jsonl
    for arch in ("dense", "hypermixer"):
        run = out / arch
        summary = json.loads((run / "summary.json").read_text())
        evals = [
            json.loads(ln)
            for ln in (run / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in ln
        ]
        assert summary["status"] == "ok" and summary["steps"] == 3 and len(evals) == 3
        stats = next(a for a in doc["architectures"] if a["architecture"] == arch)["stats"]
        for key in (
            "total_params",
            "tokens_per_s",
            "peak_mem_bytes",
            "final_val_loss",
            "train_time_s",
            "nan_count",
        ):
            assert stats[key]["mean"] == summary[key], key
        assert summary["final_val_loss"] == evals[-1]["val_loss"]
        row = printed_rows[arch]
        # no --learning-rate: each architecture at its shipped table rate (modern recipe)
        assert float(row[C["LR"]]) == doc["settings"]["table_rates"][arch]
        assert row[C["Params (total / active)"]].replace(",", "") == str(summary["total_params"])
        assert float(row[C["Time (s)"]]) == pytest.approx(summary["train_time_s"], abs=0.0501)
        tps = float(row[C["Tokens/s"]].replace(",", ""))
        assert tps == pytest.approx(summary["tokens_per_s"], abs=0.501)
        peak = float(row[C["Peak memory (MiB)"]])
        assert peak == pytest.approx(summary["peak_mem_bytes"] / 2**20, abs=0.0501)
        # the model's own memory: the peak minus the process before the model was built
        own = summary["peak_mem_bytes"] - summary["mem_before_model_bytes"]
        assert summary["model_mem_bytes"] == own and 0 < own < summary["peak_mem_bytes"]
        assert float(row[C["Model memory (MiB)"]]) == pytest.approx(own / 2**20, abs=0.0501)
        loss = summary["final_val_loss"]
        assert float(row[C["Final val loss"]]) == pytest.approx(loss, abs=5.01e-5)
        bpb = loss / math.log(2) / doc["baselines"]["val_bytes_per_token"]
        assert float(row[C["Bits/byte"]]) == pytest.approx(bpb, abs=5.01e-5)
        gap = summary["final_val_loss"] - meta["entropy_floor"]
        assert float(row[C["Gap to floor"]]) == pytest.approx(gap, abs=5.01e-5)
        assert int(row[C["NaN/skipped"]]) == summary["nan_count"] == 0
        # compute: FLOPs per token from train/flops.py, in total per run
        fpt, total = summary["flops_per_token"], summary["flops_per_token"] * summary["tokens_seen"]
        assert float(row[C["FLOPs/token"]]) == pytest.approx(fpt, rel=5.01e-3)
        assert float(row[C["Train FLOPs"]]) == pytest.approx(total, rel=5.01e-3)
        assert stats["train_flops"]["mean"] == total
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith(
        f"dense,{doc['settings']['table_rates']['dense']:g},0,ok,"
    )

    # winners: one line per criterion, printed and in the report
    for crit in ("fastest", "least memory", "best loss", "most stable"):
        # one seed: a leader at most, never "Winner"
        assert f", {crit}: " in printed.out and f"{crit}: " in report
        assert f"Winner, {crit}: " not in printed.out
    # live progress named the architectures
    assert "[1/2 dense] training" in printed.err and "[2/2 hypermixer] done in" in printed.err

    # plots: valid PNGs, decodable
    for name in ("loss_vs_tokens.png", "loss_vs_time.png", "loss_vs_flops.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(out / name).ndim == 3

    # the report names the machine, torch and its threads, and every setting
    import torch

    assert f"torch {torch.__version__}" in report and "intra-op" in report and "CPU: " in report
    for key in compare.CompareSettings.__dataclass_fields__:
        assert f"- `{key}`: " in report, key
    # the rerun command parses back to the same protocol
    rerun = shlex.split(doc["command"])
    assert rerun[:2] == ["archlab", "compare"] and doc["command"] in report
    args = build_parser().parse_args(rerun[1:])
    from archlab.commands.compare import SETTING_KEYS

    raw = {k: getattr(args, k) for k in SETTING_KEYS}
    raw["architectures"] = args.architectures.split(",")
    again = compare.settings_from_flags(raw)
    again.data = args.data
    saved = {k: v for k, v in doc["settings"].items() if k in again.to_dict()}
    assert again.to_dict() == saved

    # --resume on the finished folder does nothing and says so
    def stamps() -> dict:  # the lock file records who holds the folder; it is not output
        return {
            p: p.stat().st_mtime_ns
            for p in out.rglob("*")
            if p.is_file() and p.name != ".archlab.lock"
        }

    before = stamps()
    assert main(["compare", "--resume", "--out-dir", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert stamps() == before


# ---- the runner with fake children (no training: fast) ------------------------------------
FAKE_CHILD = textwrap.dedent(
    """
    import json, sys, pathlib
    arch, seed, run_dir, fail = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4]
    with open(run_dir.parent / "launches.txt", "a") as f:
        f.write(f"{arch}-{seed}\\n")
    if arch in fail.split(","):
        sys.stderr.write("step 1/3 loss 9.0 lr 1e-3 10 tok/s\\n")
        sys.stderr.write("Traceback (most recent call last):\\n  File \\"x.py\\", line 1\\n")
        sys.stderr.write("RuntimeError: out of memory (fake)\\n")
        sys.exit(3)
    run_dir.mkdir(parents=True, exist_ok=True)
    loss = {"dense": 2.0, "mamba": 2.5, "moe": 1.8}[arch] + 0.1 * seed
    recs = [{"kind": "train", "step": s, "tokens": 64 * s, "loss": loss + 1 / s,
             "elapsed_s": 0.1 * s} for s in (1, 2, 3)]
    recs += [{"kind": "eval", "step": s, "tokens": 64 * s, "val_loss": loss + 0.5 / s,
              "elapsed_s": 0.1 * s} for s in (1, 2)]
    recs.append({"kind": "eval", "step": 3, "tokens": 192, "val_loss": loss, "elapsed_s": 0.3})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in recs))
    summary = dict(architecture=arch, total_params=100, active_params=100, steps=3,
                   tokens_seen=192, train_time_s=1.0 + seed, tokens_per_s=1000.0 * (1 + seed),
                   peak_mem_bytes=2**20, final_val_loss=loss, nan_count=0, mfu=0.1,
                   entropy_floor=0.5, status="ok", error=None)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    print("=== Training Summary ===")
    """
)


@pytest.fixture
def fake_children(tmp_path: Path, monkeypatch):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    state = {"fail": ""}

    def fake(s, arch, seed, run_dir, resume, learning_rate=None):
        return [sys.executable, str(script), arch, str(seed), str(run_dir), state["fail"]]

    monkeypatch.setattr(compare, "child_command", fake)
    return state


def _settings(archs: list[str], seeds: int = 1) -> compare.CompareSettings:
    s = compare.settings_from_flags(
        dict(architectures=archs, max_tokens=192, seq_len=16, batch_size=4, seeds=seeds)
    )
    s.data = "unused"
    return s


def test_failed_run_gets_its_error_and_the_others_go_on(
    tmp_path: Path, fake_children, capsys
) -> None:
    fake_children["fail"] = "mamba"
    out = tmp_path / "cmp"
    res = compare.run_compare(
        _settings(["dense", "mamba", "moe"]), out, resume=False, meta={"entropy_floor": 0.5}
    )
    assert res.exit_code == 0
    assert [r.ok for r in res.runs] == [True, False, True]
    mamba = res.runs[1]
    assert mamba.error == "RuntimeError: out of memory (fake)" and mamba.returncode == 3
    row = _table_rows(res.table)["mamba"]
    assert row[C["Notes"]] == "failed: seed 0: RuntimeError: out of memory (fake)"
    assert row[C["Final val loss"]] == "-"
    assert "[2/3 mamba] FAILED: RuntimeError: out of memory (fake)" in capsys.readouterr().err
    wins = {w.criterion: w.architecture for w in res.winners}
    assert wins["best loss"] == "moe"
    # the failed architecture has no line in the plot; the others do
    doc = json.loads((out / "results.json").read_text())
    assert doc["architectures"][1]["status"] == "failed"
    assert (out / "logs" / "mamba.log").read_text().count("out of memory (fake)") == 1

    # --resume reruns only what did not finish
    fake_children["fail"] = ""
    res = compare.run_compare(
        _settings(["dense", "mamba", "moe"]), out, resume=True, meta={"entropy_floor": 0.5}
    )
    assert all(r.ok for r in res.runs)
    launches = (out / "launches.txt").read_text().split()
    assert launches == ["dense-0", "mamba-0", "moe-0", "mamba-0"]
    assert compare.comparison_finished(_settings(["dense", "mamba", "moe"]), out)


def test_every_run_failing_exits_1(tmp_path: Path, fake_children) -> None:
    fake_children["fail"] = "dense,moe"
    res = compare.run_compare(_settings(["dense", "moe"]), tmp_path / "c", resume=False, meta={})
    assert res.exit_code == 1 and not any(r.ok for r in res.runs)
    assert all(w.architecture is None for w in res.winners)


def test_seeds_give_mean_and_std(tmp_path: Path, fake_children) -> None:
    res = compare.run_compare(
        _settings(["dense", "moe"], seeds=3),
        tmp_path / "c",
        resume=False,
        meta={"entropy_floor": 0.5},
    )
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("dense")) == [
        "dense-seed0",
        "dense-seed1",
        "dense-seed2",
    ]
    dense = res.archs[0]
    assert dense.stats["final_val_loss"].mean == pytest.approx(2.1)
    assert dense.stats["final_val_loss"].std == pytest.approx(0.1)
    assert dense.stats["tokens_per_s"].mean == pytest.approx(2000.0)
    row = _table_rows(res.table)["dense"]
    # mean ± the 95% confidence half-width: t(0.975, 2) * std / sqrt(3) = 4.3027 * std / 1.7321
    assert row[C["Final val loss"]] == "2.1000 ± 0.2484" and row[C["Notes"]] == "3 seeds"
    assert row[C["Tokens/s"]] == "2,000 ± 2,484"
    # the recipe is named in the protocol and results.json; each rate's source too
    from archlab.train.lr_table import table_learning_rate

    doc = json.loads((tmp_path / "c" / "results.json").read_text())
    assert doc["settings"]["recipe"] == "modern"
    assert doc["settings"]["learning_rate"] is None
    moe = table_learning_rate("moe", "nano", "modern")
    assert doc["settings"]["table_rates"]["moe"] == moe.rate
    md = (tmp_path / "c" / "report.md").read_text()
    assert "- Recipe: modern (RMSNorm everywhere, RoPE in every attention layer" in md
    assert f"moe {moe.rate:g} ({moe.source})" in md
    assert res.runs[1].learning_rate == moe.rate


def test_child_command_spells_out_the_protocol() -> None:
    from archlab.train.lr_table import table_learning_rate

    s = compare.settings_from_flags(
        dict(
            architectures=["mamba"],
            max_tokens=10_000,
            seq_len=32,
            batch_size=4,
            gradient_accumulation_steps=2,
            use_amp=True,
            use_rope=False,
        )
    )
    s.data = "/d"
    cmd = compare.child_command(s, "mamba", 7, Path("/o/mamba"), resume=True)
    assert cmd[:4] == [sys.executable, "-m", "archlab", "train"]
    text = shlex.join(cmd)
    for part in (
        "--architecture mamba",
        "--model-size nano",
        "--data /d",
        "--seq-len 32",
        "--batch-size 4",
        "--gradient-accumulation-steps 2",
        "--max-tokens 10000",
        "--seed 7",
        "--use-amp",
        "--no-use-compile",
        "--no-use-rope",
        "--out-dir /o/mamba",
        f"--learning-rate {table_learning_rate('mamba', 'nano', 'modern').rate!r}",
        "--recipe modern",
        "--warmup-steps 2",  # 5% of the 40 steps
    ):
        assert part in text, part
    assert cmd[-1] == "--resume" and "--use-rmsnorm" not in text
    # steps = ceil(10000 / 256) = 40; defaults follow from it
    assert (s.total_steps, s.eval_interval, s.log_interval) == (40, 5, 1)
    # the trainer's own parser accepts the command
    args = build_parser().parse_args(cmd[3:])
    assert args.max_tokens == 10_000 and args.use_amp is True and args.resume is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--architectures", "dense,gpt"], "--architectures: unknown architecture 'gpt'"),
        (["--architectures", "dense,transformer"], "listed twice"),
        (
            ["--max-tokens", "100", "--seq-len", "32", "--batch-size", "4"],
            "smaller than one optimizer step",
        ),
        (["--max-tokens", "1M", "--num-epochs", "1"], "exclusive"),
        (["--num-epochs", "2"], "--num-epochs and --steps-per-epoch go together"),
        (["--seeds", "0"], "--seeds: must be an integer >= 1"),
        (["--model-size", "nano,micro"], "one size per comparison"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, tmp_path: Path, capsys) -> None:
    try:
        rc = main(["compare", "--out-dir", str(tmp_path / "o"), *argv])
    except SystemExit as exc:  # refused by the flag's checked type (argparse, one line)
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_seq_len_beyond_learned_positions(tiny_data: Path, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "compare",
            "--architectures",
            "dense",
            "--data",
            str(tiny_data),
            "--seq-len",
            "300",
            "--recipe",
            "classic",  # learned positions (the modern recipe's RoPE has no length limit)
            "--out-dir",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "exceeds dense's max_seq_len 256" in err


def test_existing_out_dir_and_resume_errors(tmp_path: Path, capsys) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert main(["compare", "--out-dir", str(busy)]) == 2
    assert "exists and is not empty; pass --resume" in capsys.readouterr().err
    assert main(["compare", "--resume", "--out-dir", str(busy)]) == 2
    assert "not an archlab compare folder" in capsys.readouterr().err
    assert main(["compare", "--resume"]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert (busy / "x").read_text() == "keep me"


def test_resume_refuses_a_different_protocol(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    out.mkdir()
    s = _settings(["dense", "moe"])
    (out / "compare.json").write_text(json.dumps({"settings": s.to_dict()}))
    assert main(["compare", "--resume", "--out-dir", str(out), "--seq-len", "64"]) == 2
    assert "--seq-len 64 differs from this comparison's 16" in capsys.readouterr().err
    assert main(["compare", "--resume", "--out-dir", str(out), "--architectures", "dense"]) == 2
    capsys.readouterr()
    assert main(["compare", "--resume", "--out-dir", str(out), "--data", "stories"]) == 2
    assert "drop --data" in capsys.readouterr().err


def test_mqar_data_sets_the_seq_len() -> None:
    meta = {
        "task": "mqar",
        "seq_len": 64,
        "vocab_size": 256,
        "train_tokens": 65 * 1000,
        "val_tokens": 65 * 100,
    }
    raw = dict(architectures=["dense"], max_tokens=64 * 16 * 10, batch_size=16)
    s = compare.settings_for_data(raw, Path("/d"), meta)
    assert (s.seq_len, s.total_steps, s.data) == (64, 10, "/d")
    with pytest.raises(UserError, match="has sequences of 64 tokens; pass --seq-len 64"):
        compare.settings_for_data(dict(raw, seq_len=128), Path("/d"), meta)


def test_selective_copy_data_sets_the_seq_len() -> None:
    meta = {
        "task": "selective-copy",
        "seq_len": 16,
        "vocab_size": 16,
        "train_tokens": 17 * 50,
        "val_tokens": 17 * 10,
    }
    raw = dict(architectures=["dense"], max_tokens=16 * 4 * 10, batch_size=4)
    s = compare.settings_for_data(raw, Path("/d"), meta)
    assert (s.seq_len, s.total_steps, s.data) == (16, 10, "/d")
    with pytest.raises(UserError, match="has sequences of 16 tokens; pass --seq-len 16"):
        compare.settings_for_data(dict(raw, seq_len=128), Path("/d"), meta)
    # a single whole example per split is enough for aligned data (the loader reads rows)
    one = dict(meta, train_tokens=17, val_tokens=17)
    assert compare.settings_for_data(raw, Path("/d"), one).seq_len == 16
    with pytest.raises(UserError, match="val split of /d holds no whole selective-copy example"):
        compare.settings_for_data(raw, Path("/d"), dict(meta, val_tokens=16))


def test_compare_on_selective_copy_data_trains_at_its_seq_len(
    tmp_path: Path, fake_children, monkeypatch, capsys
) -> None:
    """`archlab compare --data <selective-copy folder>` without --seq-len: every child is
    launched with the data's sequence length (the default 128 would fail in each child)."""
    from archlab.bench.compare.plan import child_command
    from archlab.data.prepare import prepare_dataset

    sc = prepare_dataset(
        "selective-copy",
        tmp_path / "sc",
        verbose=False,
        sc_tokens=4,
        sc_seq_len=16,
        sc_train_examples=50,
        sc_val_examples=10,
    )
    launched: list[list[str]] = []
    fake = compare.child_command  # the fixture's fake child

    def recording(s, arch, seed, run_dir, resume, learning_rate=None):
        launched.append(child_command(s, arch, seed, run_dir, resume, learning_rate))
        return fake(s, arch, seed, run_dir, resume, learning_rate)

    monkeypatch.setattr(compare, "child_command", recording)
    out = tmp_path / "cmp"
    argv = ["compare", "--architectures", "dense", "--data", str(sc), "--max-tokens", "640"]
    assert main([*argv, "--batch-size", "4", "--out-dir", str(out)]) == 0
    assert launched  # the run's command, then the same line for report.md
    for cmd in launched:
        assert cmd[cmd.index("--seq-len") + 1] == "16" and cmd[cmd.index("--data") + 1] == str(sc)
    assert "--seq-len 16" in (out / "report.md").read_text()
    assert json.loads((out / "compare.json").read_text())["settings"]["seq_len"] == 16
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main([*argv, "--seq-len", "32", "--out-dir", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has sequences of 16 tokens; pass --seq-len 16"), err
    assert len(err.splitlines()) == 1

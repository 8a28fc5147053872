"""`archlab scale`: a tiny ladder end to end (real trainer), resume, refused input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from archlab.bench import plots
from archlab.bench.scaling_laws import report, settings
from archlab.cli import main

TINY = [
    "--depths",
    "1,2",
    "--tokens-per-param",
    "0.3",
    "--learning-rate",
    "0.01",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--eval-steps",
    "1",
    "--num-threads",
    "1",
    "--bootstrap",
    "100",
]  # fmt: skip (lr 0.01: every tiny run learns, so both are fitted)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    from archlab.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "stories-char"
    return prepare_dataset("stories", out, tokenizer="char", num_stories=200, verbose=False)


def _rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[1:]]


@pytest.mark.slow  # four training processes; fits fail under the table's rates (open, see #21 note)
def test_tiny_ladder_writes_everything_and_resumes_without_rerunning(
    char_data: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "study"
    figures = []
    real_save = plots.save_figure

    def keep(fig, path):  # noqa: ANN001, ANN202
        figures.append((Path(path).name, fig))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    argv = ["scale", "--architectures", "dense,moe", "--data", str(char_data), *TINY]
    assert main([*argv, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr()
    for name in (*report.OUTPUT_FILES, "scale.json"):
        assert (out / name).stat().st_size > 0, name
    names = [f"{a}-d{d}-seed0" for d in (1, 2) for a in ("dense", "moe")]
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "ok", name
    # the table: printed = scale.md = results.json, and its numbers are the runs' own
    doc = json.loads((out / "results.json").read_text())
    md = (out / "scale.md").read_text()
    table = doc["table"]["rows"]
    assert doc["table"]["columns"] == list(report.TABLE_COLUMNS)
    assert _rows(printed.out)[: len(table)] == table
    assert _rows(md)[: len(table)] == table
    col = {c: i for i, c in enumerate(report.TABLE_COLUMNS)}
    for row in table:
        run = out / f"{row[col['Architecture']]}-d{row[col['Depth']]}-seed0"
        summary = json.loads((run / "summary.json").read_text())
        assert float(row[col["Final val loss"]]) == pytest.approx(
            summary["final_val_loss"], abs=5e-5
        )
        assert int(row[col["Params (active)"]].replace(",", "")) == summary["active_params"]
        assert int(row[col["Tokens"]].replace(",", "")) == summary["tokens_seen"]
        flops = summary["flops_per_token"] * summary["tokens_seen"]
        assert float(row[col["Train FLOPs"]]) == pytest.approx(flops, rel=5e-3)
    # a budget proportional to parameters: the bigger rung trains on more tokens
    ladder = {r["architecture"] + str(r["depth"]): r for r in doc["ladder"]}
    assert ladder["dense2"]["tokens"] > ladder["dense1"]["tokens"]
    for r in doc["ladder"]:
        assert r["tokens"] >= 0.3 * r["params"] and r["tokens"] - 64 < 0.3 * r["params"]
    with (out / "results.csv").open() as f:
        assert sorted(r["run_dir"] for r in csv.DictReader(f)) == sorted(
            str(out / n) for n in names
        )
    assert [f["architecture"] for f in doc["fits"]] == ["dense", "moe"]
    assert len(doc["crossovers"]) == 1 and set(doc["predictions"]) == {"dense", "moe"}
    # the plot: one fitted curve and one set of points per architecture, the frontier
    [fig] = [f for name, f in figures if name == "loss_vs_flops.png"]
    assert sorted(plots.data_lines(fig, "fit")) == ["dense", "moe"]
    assert sorted(plots.data_lines(fig, "points")) == ["dense", "moe"]
    assert "all" in plots.data_lines(fig, "frontier")
    # progress named the runs and the grid
    assert "[1/4 dense-d1-seed0] training" in printed.err and "4 runs" in printed.err

    # resume: a finished study has nothing to do
    assert main(["scale", "--resume", "--out-dir", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # ... and with the outputs gone (a study killed while writing them) no run trains again
    from archlab.bench import compare

    def never(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare, "train_one", never)
    (out / "scale.md").unlink()
    assert main(["scale", "--resume", "--out-dir", str(out)]) == 0
    assert (out / "scale.md").exists() and "already finished; skipped" in capsys.readouterr().err
    # changed settings are refused
    assert main(["scale", "--resume", "--tokens-per-param", "5", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tokens-per-param 5.0 differs" in err and "\n" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--depths", "3"], "--depths 3: a ladder of one size cannot fit"),
        (["--tokens-per-param", "0"], "--tokens-per-param: must be a positive number"),
        (["--tokens-per-param", "-2"], "--tokens-per-param: must be a positive number"),
        (["--architectures", "dense,nope"], "--architectures: unknown architecture 'nope'"),
        (["--width-per-depth", "25", "--depths", "2,3"], "--depths 2: dense refuses the shape"),
        (["--depths", "1,x"], "--depths: expected comma-separated integers"),
        (["--depths", "2,2"], "--depths: 2,2 repeats a depth"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    assert main(["scale", *extra, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()  # nothing made


def test_the_dial_keeps_parameters_comparable() -> None:
    """Every architecture's rung within 35% of dense's parameters (the presets' rules; the
    hybrid's even layer count at odd depths is 30% over). Mamba-2 is the exception, stated:
    its preset rule keeps state size 128 at widths outside its table (d_model 16-64 here),
    measured 42-58% over dense; allowed up to 60% until that rule scales the state."""
    from archlab.models import registry

    s = settings.settings_from_flags({"architectures": list(registry.SPECS)})
    rungs = settings.build_ladder(s, 1024)
    dense = {r.depth: r.params for r in rungs if r.architecture == "dense"}
    for r in rungs:
        # mamba2 keeps its state size 128 off its table; hybrid under the modern recipe's SwiGLU
        tolerance = {"mamba2": 0.75, "hybrid": 0.40}.get(r.architecture, 0.35)
        assert abs(r.params / dense[r.depth] - 1) < tolerance, (r.name, r.params, dense[r.depth])
        assert r.shape["d_model"] == 16 * r.depth
    assert settings.dense_shape(4, s) == dict(
        d_model=64, n_layers=4, n_heads=4, d_ff=256, max_seq_len=128
    )


def test_the_eta_is_weighted_by_each_runs_flops(tmp_path: Path) -> None:
    """Rungs differ in cost: after a 1-unit run took 10 s, 3 units are left -> about 30 s."""
    import io
    import time

    from archlab.bench.scaling_laws.plan import LadderProgress, LadderRun

    def run(name: str, flops: float, steps: int) -> LadderRun:
        rung = settings.Rung("dense", 1, {"d_model": 16, "n_layers": 1}, 10, 10, flops, steps,
                             steps, 1e-3, "given")  # fmt: skip
        from archlab.bench.compare_plan import RunSpec

        return LadderRun(rung, 0, None, RunSpec("dense", 0, tmp_path / name))  # type: ignore[arg-type]

    runs = [run("a", 1.0, 10), run("b", 1.0, 10), run("c", 2.0, 10)]
    p = LadderProgress(io.StringIO(), runs, finished=set(), mode="plain", every_s=0)
    p.start(runs[0])
    p.begin_run("[1/3 a]")
    assert p.eta() is None  # nothing finished yet: unknown, not a wild guess
    p.status("[1/3 a]", "step 1/10 loss 1.0")
    p.status("[1/3 a]", "step 10/10 loss 1.0")
    p.end_run()
    p.t0 = time.monotonic() - 10.0
    p.start(runs[1])
    p.begin_run("[2/3 b]")
    assert p.eta() == pytest.approx(30.0, rel=0.01)
    p.status("[2/3 b]", "step 1/10 loss 1.0")
    p.status("[2/3 b]", "step 5/10 loss 1.0")  # half of b: 1.5 units in 10 s, 2.5 left
    assert p.eta() == pytest.approx(10.0 * 2.5 / 1.5, rel=0.01)
    assert "scale: 1/3 runs done, eta 00:1" in p.stream.getvalue()


def test_the_study_folder_is_locked(tmp_path: Path, capsys) -> None:
    """A second `archlab scale` into a folder another process holds: one line, exit 2."""
    import subprocess
    import sys

    from archlab.fsutil import LOCK_NAME

    out = tmp_path / "study"
    out.mkdir()
    (out / "scale.json").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid())\n"
         "print('locked', flush=True); time.sleep(60)", str(out / LOCK_NAME)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["scale", "--resume", "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"(pid {holder.pid})" in err and "\n" not in err
    finally:
        holder.kill()
        holder.wait()


def test_an_interrupted_study_says_how_to_continue_it(tmp_path: Path) -> None:
    import signal

    from archlab.bench.compare_plan import RunSpec
    from archlab.bench.compare_runner import _interrupt_message
    from archlab.bench.scaling_laws.plan import LadderProgress

    spec = RunSpec("dense", 0, tmp_path / "study" / "dense-d2-seed0")
    text = _interrupt_message(spec, signal.SIGINT, LadderProgress.label)
    assert text == (
        "SIGINT: dense-d2-seed0 stopped before its first checkpoint; continue the study with: "
        f"archlab scale --resume --out-dir {tmp_path / 'study'}"
    )


def test_runs_that_did_not_learn_are_shown_but_not_fitted() -> None:
    from archlab.bench.results import RunResult

    s = settings.settings_from_flags({"architectures": ["dense"], "bootstrap": 100})
    runs = []
    for k, (c, loss) in enumerate([(1e9, 6.1), (1e10, 3.0), (1e11, 2.4), (1e12, 2.1), (1e13, 2.0)]):
        r = RunResult("dense", 0, f"r{k}", status="ok", final_val_loss=loss, train_flops=c)
        r.learned = loss < 5.4  # the first one is above the unigram baseline
        runs.append(r)
    [f] = report.fit_all(s, runs)
    assert f.n_points == 4 and 1e9 not in f.compute
    assert f.note.startswith("1 run(s) that did not learn left out")

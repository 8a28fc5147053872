"""Report, aggregation and plots of `archlab compare`, on synthetic run folders."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from archlab.bench.common import plots
from archlab.bench.common.hardware import format_bytes, hardware_info, hardware_lines
from archlab.bench.common.results import aggregate, read_metrics, read_run, roughness
from archlab.bench.compare import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(
    root: Path,
    name: str,
    *,
    arch: str,
    final: float,
    tps: float,
    mem: float,
    nan: int = 0,
    status: str = "ok",
    n_eval: int = 5,
    floor: float | None = 1.5,
    noise: float = 0.0,
) -> Path:
    """A run folder as the trainer writes it: metrics.jsonl then summary.json."""
    d = root / name
    d.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        loss = final + 2.0 / step + (noise if step % 2 else -noise)
        lines.append(
            {
                "kind": "train",
                "step": step,
                "tokens": step * 100,
                "loss": loss,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": tps,
                "peak_mem_bytes": mem,
                "elapsed_s": step * 0.1,
                "nan_count": nan,
            }
        )
        if step % (20 // n_eval) == 0:
            lines.append(
                {
                    "kind": "eval",
                    "step": step,
                    "tokens": step * 100,
                    "val_loss": final + 1.0 / step - 1.0 / 20,
                    "elapsed_s": step * 0.1,
                }
            )
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    summary = {
        "architecture": arch,
        "total_params": 1000,
        "active_params": 800 if arch == "moe" else 1000,
        "steps": 20,
        "tokens_seen": 2000,
        "train_time_s": 2000 / tps,
        "tokens_per_s": tps,
        "peak_mem_bytes": mem,
        "final_val_loss": final,
        "nan_count": nan,
        "mfu": 0.01,
        "entropy_floor": floor,
        "status": status,
        "error": None if status == "ok" else "loss diverged (NaN)",
        "model_config": {},
        "train_config": {},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_read_run_and_aggregate_over_seeds(tmp_path: Path) -> None:
    runs = [
        read_run(
            fake_run(tmp_path, "dense-seed0", arch="dense", final=2.0, tps=1000, mem=100e6),
            "dense",
            0,
        ),
        read_run(
            fake_run(tmp_path, "dense-seed1", arch="dense", final=2.2, tps=1200, mem=110e6),
            "dense",
            1,
        ),
        read_run(
            fake_run(tmp_path, "mamba-seed0", arch="mamba", final=2.5, tps=3000, mem=90e6),
            "mamba",
            0,
        ),
        read_run(tmp_path / "missing", "mamba", 1, returncode=-9),
    ]
    assert runs[0].ok and runs[0].last_eval_val_loss == pytest.approx(2.0)
    assert runs[0].gap_to_floor == pytest.approx(0.5)
    assert len(runs[0].val_curve.loss) == 5 and len(runs[0].train_curve.loss) == 20
    assert not runs[3].ok and runs[3].error == "killed by SIGKILL (out of memory?)"
    archs = aggregate(runs, ["dense", "mamba"])
    dense, mamba = archs
    assert dense.status == "ok" and mamba.status == "partial"
    loss = dense.stats["final_val_loss"]
    assert loss.mean == pytest.approx(2.1) and loss.n == 2
    assert loss.std == pytest.approx(statistics.stdev([2.0, 2.2]))
    assert mamba.stats["tokens_per_s"].mean == 3000 and mamba.stats["tokens_per_s"].n == 1
    # two seeds: ± the 95% confidence half-width, t(0.975, 1) = 12.706 times std / sqrt(2)
    assert loss.ci95 == pytest.approx(12.7062 * statistics.stdev([2.0, 2.2]) / math.sqrt(2), 1e-4)
    rows = report.table_rows(archs)
    col = {name: i for i, name in enumerate(report.TABLE_COLUMNS)}
    assert rows[0][col["Final val loss"]] == "2.1000 ± 1.2706"
    assert rows[0][col["Tokens/s"]] == "1,100 ± 1,271"
    assert rows[1][col["Final val loss"]] == "2.5000"  # one ok seed: no spread
    assert "1 of 2 seeds failed" in rows[1][col["Notes"]] and "SIGKILL" in rows[1][col["Notes"]]


def test_resumed_run_is_flagged(tmp_path: Path) -> None:
    d = fake_run(tmp_path, "dense", arch="dense", final=2.0, tps=1, mem=1)
    summary = json.loads((d / "summary.json").read_text())
    summary["resumed_from"] = str(d / "checkpoints" / "step_0000004")
    (d / "summary.json").write_text(json.dumps(summary))
    archs = aggregate([read_run(d, "dense", 3)], ["dense"])
    notes = report.table_rows(archs)[0][report.TABLE_COLUMNS.index("Notes")]
    assert notes == "resumed (seed 3): time covers the last process only"


def test_failure_messages(tmp_path: Path) -> None:
    failed = read_run(
        fake_run(tmp_path, "moe", arch="moe", final=float("nan"), tps=1, mem=1, status="failed"),
        "moe",
        0,
        returncode=2,
    )
    assert failed.status == "failed" and failed.error == "loss diverged (NaN)"
    nosummary = read_run(
        tmp_path / "nothing",
        "dense",
        0,
        returncode=2,
        stderr_tail="archlab train: error: out of memory; try ...",
    )
    assert nosummary.error == "archlab train: error: out of memory; try ..."
    # exit 0 but the summary says ok with a NaN loss: still a failure
    nanrun = read_run(
        fake_run(tmp_path, "x", arch="dense", final=float("nan"), tps=1, mem=1),
        "dense",
        0,
        returncode=0,
    )
    assert not nanrun.ok and "nan" in nanrun.error.lower()
    # a torn final line (killed mid-write) is skipped
    d = fake_run(tmp_path, "torn", arch="dense", final=2.0, tps=1, mem=1)
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    assert len(read_metrics(d)) == 25


def test_winners_and_table_columns(tmp_path: Path) -> None:
    specs = {
        "dense": dict(final=2.0, tps=1000, mem=200e6, noise=0.0),
        "mamba": dict(final=2.4, tps=4000, mem=150e6, noise=0.3),
        "moe": dict(final=1.9, tps=800, mem=300e6, nan=2),
        "hypermixer": dict(final=3.0, tps=2000, mem=100e6, noise=0.1),
    }
    runs = [read_run(fake_run(tmp_path, a, arch=a, **kw), a, 0) for a, kw in specs.items()]
    archs = aggregate(runs, list(specs))
    wins = {w.criterion: w for w in report.winners(archs)}
    assert wins["fastest"].architecture == "mamba"
    assert wins["least memory"].architecture == "hypermixer"
    assert wins["best loss"].architecture == "moe"
    # moe has NaN steps; among 0-NaN runs dense has the smoothest loss
    assert wins["most stable"].architecture == "dense"
    assert wins["fastest"].line() == "fastest: mamba (4,000 tokens/s)"
    assert wins["fastest"].headline() == (
        "Leader (one seed: no significance can be claimed), fastest: mamba (4,000 tokens/s)"
    )
    table = report.markdown_table(archs)
    lines = table.splitlines()
    assert len(lines) == 2 + len(specs)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(report.TABLE_COLUMNS)
    moe = [c.strip() for c in lines[4].strip("|").split("|")]
    col = {name: i for i, name in enumerate(report.TABLE_COLUMNS)}
    assert moe[0] == "moe" and moe[col["Params (total / active)"]] == "1,000 / 800"
    assert moe[col["Peak memory (MiB)"]] == f"{300e6 / 2**20:.1f}"
    assert moe[col["Gap to floor"]] == "+0.4000" and moe[col["NaN/skipped"]] == "2"
    # all failed: no winner
    failed = aggregate([read_run(tmp_path / "none", "dense", 0, returncode=1)], ["dense"])
    assert all(w.architecture is None for w in report.winners(failed))


def test_roughness_tracks_oscillation(tmp_path: Path) -> None:
    smooth = read_run(fake_run(tmp_path, "a", arch="dense", final=2, tps=1, mem=1), "dense", 0)
    spiky = read_run(
        fake_run(tmp_path, "b", arch="dense", final=2, tps=1, mem=1, noise=0.5), "dense", 0
    )
    assert roughness(smooth.train_curve) < 0.01
    assert roughness(spiky.train_curve) == pytest.approx(1.0, abs=0.01)  # +-0.5 alternation


def test_loss_plots_one_line_per_architecture(tmp_path: Path) -> None:
    by_arch = {}
    for a, final in (("dense", 2.0), ("mamba", 2.3), ("hybrid", 2.1)):
        by_arch[a] = [
            read_run(
                fake_run(tmp_path, f"{a}-{s}", arch=a, final=final + 0.1 * s, tps=1, mem=1), a, s
            )
            for s in range(2)
        ]
    for x in ("tokens", "time"):
        fig = plots.loss_figure(by_arch, x=x, entropy_floor=1.5)
        val = plots.data_lines(fig, "val")
        assert sorted(val) == ["dense", "hybrid", "mamba"]
        assert len(plots.data_lines(fig, "train")) == 3
        # the plotted validation points are the mean over the two seeds
        xs, ys = val["mamba"].get_data()
        run0 = by_arch["mamba"][0].val_curve
        expect_x = run0.tokens if x == "tokens" else run0.elapsed_s
        assert list(xs) == pytest.approx(expect_x)
        assert ys[-1] == pytest.approx(2.35)
        path = plots.save_figure(fig, tmp_path / f"loss_{x}.png")
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = matplotlib.image.imread(path)
        assert img.shape[0] == 500 and img.shape[1] == 800
    with pytest.raises(ValueError):
        plots.loss_figure(by_arch, x="steps")


def test_loglog_panels() -> None:
    fig = plots.loglog_figure(
        [
            ("fwd", "s", {"dense": ([64, 128], [1e-3, 4e-3]), "mamba": ([64, 128], [1e-3, 2e-3])}),
            ("mem", "B", {"dense": ([64, 128], [None, 5.0])}),
        ],
        xlabel="T",
    )
    assert sorted(plots.data_lines(fig, "fwd")) == ["dense", "mamba"]
    assert list(plots.data_lines(fig, "mem")["dense"].get_xdata()) == [128]
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"


def test_results_files_round_trip(tmp_path: Path) -> None:
    runs = [
        read_run(fake_run(tmp_path, a, arch=a, final=f, tps=t, mem=m), a, 0)
        for a, f, t, m in (("dense", 2.0, 1000.0, 1e8), ("moe", 1.9, 900.0, 2e8))
    ]
    archs = aggregate(runs, ["dense", "moe"])
    wins = report.winners(archs)
    hw = hardware_info()
    report.write_results_json(
        tmp_path / "results.json",
        archs,
        runs,
        wins,
        {"seq_len": 32},
        hw,
        {"vocab_size": 99},
        "archlab compare",
    )
    report.write_results_csv(tmp_path / "results.csv", runs)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["table"]["rows"] == report.table_rows(archs)
    assert doc["architectures"][1]["stats"]["final_val_loss"]["mean"] == 1.9
    assert doc["hardware"]["torch_threads"] >= 1
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["architecture"] for r in rows] == ["dense", "moe"]
    assert float(rows[1]["tokens_per_s"]) == 900.0 and rows[1]["error"] == ""
    md = report.report_markdown(
        title="t",
        archs=archs,
        wins=wins,
        settings={"seq_len": 32},
        hardware=hw,
        data_meta={"vocab_size": 99},
        command="archlab compare --seq-len 32",
        child_commands={"dense": "python -m archlab train ..."},
        plots=[("loss_vs_tokens.png", "loss vs tokens")],
        protocol_notes=["same data"],
    )
    assert report.markdown_table(archs) in md
    assert "archlab compare --seq-len 32" in md and "- `seq_len`: 32" in md
    assert f"torch {hw['torch']}" in md and "intra-op" in md
    assert "![loss vs tokens](loss_vs_tokens.png)" in md


def test_hardware_lines() -> None:
    info = hardware_info()
    text = "\n".join(hardware_lines(info))
    import torch

    assert torch.__version__ in text and f"{torch.get_num_threads()} intra-op" in text
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(None) == "-"
    assert not math.isnan(info["memory_bytes"] or 0)


def test_the_terminal_table_is_narrowed_only_where_it_would_wrap(tmp_path: Path) -> None:
    """A terminal narrower than the full table gets the short form (notes below it); the
    full table, as report.md has it, where it fits."""
    runs = [
        read_run(
            fake_run(tmp_path, f"{a}{seed}", arch=a, final=2.0 + k + seed / 10, tps=1000, mem=9e7),
            a,
            seed,
        )
        for k, a in enumerate(("dense", "mamba"))
        for seed in (0, 1)
    ]
    archs = aggregate(runs, ["dense", "mamba"])
    full = report.markdown_table(archs, unigram=2.5)
    assert report.terminal_table(archs, 2.5, width=1000) == full
    short = report.terminal_table(archs, 2.5, width=100).splitlines()
    assert max(map(len, short)) <= 100 < max(map(len, full.splitlines()))
    assert short[0].split("|")[1].strip() == "Architecture" and "Val loss" in short[0]
    rows = {line.split("|")[1].strip(): line for line in short if line.startswith("| ")}
    full_rows = {r[0]: r for r in report.table_rows(archs, 2.5)}
    for arch in ("dense", "mamba"):  # the values are the full table's, unrounded further
        loss, tps = (report.TABLE_COLUMNS.index(c) for c in ("Final val loss", "Tokens/s"))
        assert full_rows[arch][loss] in rows[arch] and full_rows[arch][tps] in rows[arch]
    assert "  mamba: 2 seeds" in short  # the notes column, under the table


def test_the_report_names_the_mfu_peak_and_where_it_came_from(tmp_path: Path) -> None:
    runs = []
    for k, arch in enumerate(("dense", "mamba")):
        d = fake_run(tmp_path, arch, arch=arch, final=2.0, tps=1000, mem=9e7)
        s = json.loads((d / "summary.json").read_text())
        s |= {"mfu": 0.02 * (k + 1), "peak_flops": 2.5e11, "peak_flops_source": "stated"}
        s["peak_flops_how"] = "ARCHLAB_PEAK_FLOPS=2.5e11"
        (d / "summary.json").write_text(json.dumps(s))
        runs.append(read_run(d, arch, 0))
    archs = aggregate(runs, ["dense", "mamba"])
    lines = report.mfu_lines(archs)
    assert lines[1] == "MFU (model FLOPs / peak FLOP/s): dense 2.00%, mamba 4.00%."
    assert lines[2:] == ["- peak 250.0 GFLOP/s per device, stated: ARCHLAB_PEAK_FLOPS=2.5e11"]
    runs[1].peak_flops = 3e11  # runs measured against different peaks are flagged
    assert "not comparable" in report.mfu_lines(archs)[-1]


def test_pareto_frontier_and_the_flops_plot() -> None:
    """The frontier keeps each point cheaper-and-better than all before it; the plot draws
    one marker set per architecture and the frontier through exactly those points."""
    from archlab.bench.common import plots

    pts = {"dense": [(1e9, 3.0), (4e9, 2.5)], "mamba": [(2e9, 2.9), (3e9, 3.1), (8e9, 2.6)]}
    front = plots.pareto_frontier([p for v in pts.values() for p in v])
    assert front == [(1e9, 3.0), (2e9, 2.9), (4e9, 2.5)]
    fig = plots.loss_vs_flops_figure(pts)
    assert sorted(plots.data_lines(fig, "points")) == ["dense", "mamba"]
    line = plots.data_lines(fig, "frontier")["all"]
    assert list(line.get_xdata()) == [1e9, 2e9, 4e9]
    assert fig.axes[0].get_xscale() == "log"
    assert report.format_flops(5_519_000.0) == "5.52e6"


def test_report_says_how_far_the_ranking_holds():
    """The default protocol quotes its 4x-budget check; any other protocol says it was not
    checked (issue #24: a default budget that tells the same story, or says how far)."""
    from archlab.bench.compare.outputs import protocol_notes
    from archlab.bench.compare.settings import DEFAULT_BUDGET_CHECK, settings_from_flags

    meta = {"source": "stories", "tokenizer": "bpe", "vocab_size": 1441}
    default = settings_from_flags({"architectures": ["dense", "mamba"]})
    [line] = [n for n in protocol_notes(default, meta) if n.startswith("How far")]
    assert line == "How far the ranking holds: " + DEFAULT_BUDGET_CHECK
    assert "640k" in line and "not where it ends" in line
    longer = settings_from_flags({"architectures": ["dense", "mamba"], "max_tokens": 640_000})
    [line] = [n for n in protocol_notes(longer, meta) if n.startswith("How far")]
    assert "not checked at other budgets" in line
    [line] = [n for n in protocol_notes(default, {"source": "shakespeare"}) if "How far" in n]
    assert "not checked" in line
    given = settings_from_flags({"architectures": ["dense", "mamba"], "learning_rate": 1e-3})
    [line] = [n for n in protocol_notes(given, meta) if n.startswith("How far")]
    assert "not checked" in line  # the check was at the table's rates

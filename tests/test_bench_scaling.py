"""`archlab bench lengths` (formerly `bench scaling`): exponent fit, crossovers, fresh-process
memory, the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from archlab.bench.lengths import measure as scaling
from archlab.bench.lengths import report as scaling_report
from archlab.bench.lengths.measure import Point, ScalingSettings
from archlab.bench.lengths.report import analyse, crossover, fit_exponent
from archlab.cli import main

HAS_MAMBA = importlib.util.find_spec("archlab.models.mamba") is not None


def test_fit_exponent_recovers_power_laws() -> None:
    xs = [64, 128, 256, 512, 1024]
    assert fit_exponent(xs, [3e-5 * x**1.7 for x in xs]) == pytest.approx(1.7)
    assert fit_exponent(xs, [0.5 * x for x in xs]) == pytest.approx(1.0)
    assert fit_exponent([64], [1.0]) is None
    # a failed (None) point is left out of the fit
    assert fit_exponent(xs, [x**2 if x != 256 else None for x in xs]) == pytest.approx(2.0)


def test_crossover_interpolates_in_log_space() -> None:
    ts = [32, 64, 128, 256, 512]
    dense = [t * t / 1000 for t in ts]  # quadratic
    other = [t / 10 for t in ts]  # linear: equal at T = 100
    T, kind = crossover(ts, dense, other)
    assert kind == "crossing" and T == pytest.approx(100.0)
    assert crossover(ts, dense, [d * 0.5 for d in dense]) == (32.0, "throughout")
    assert crossover(ts, dense, [d * 2 for d in dense]) == (None, "none")
    # cheaper in the middle only, back above dense at the end: none
    assert crossover(ts, dense, [1, 1e-9, 1e-9, 1e-9, 1e9])[1] == "none"
    # noise dip before the real crossing: the LAST crossing counts
    T, kind = crossover([1, 2, 4, 8], [1, 1, 1, 1], [2, 0.5, 2, 0.5])
    assert kind == "crossing" and T == pytest.approx(math.exp(math.log(4) + 0.5 * math.log(2)))


def test_analyse_on_synthetic_points() -> None:
    pts = []
    for T in (128, 256, 512, 1024):
        pts.append(Point("dense", "nano", T, 1, 10, fwd_s=T**2 * 1e-6, fwd_bwd_s=3 * T**2 * 1e-6))
        pts.append(Point("mamba", "nano", T, 1, 10, fwd_s=T * 1e-3, fwd_bwd_s=3 * T * 1e-3))
    res = analyse(pts)
    assert res["exponents"]["dense/nano"]["fwd_bwd"] == pytest.approx(2.0)
    assert res["exponents"]["mamba/nano"]["fwd"] == pytest.approx(1.0)
    (fwd, fwd_bwd) = res["crossovers"]
    assert fwd.kind == "crossing" and fwd.seq_len == pytest.approx(1000.0)
    assert "cheaper from T ~ 1000" in fwd_bwd.describe()


def test_memory_point_in_fresh_process_grows_with_T() -> None:
    """The fresh-process peak for a training step grows with the activations it holds."""
    cfg = scaling.bench_config(
        "dense", "nano", 1024, vocab_size=4096, overrides=dict(d_model=32, n_layers=1, n_heads=2)
    )
    settings = ScalingSettings(["dense"], threads=1)
    small = scaling.measure_memory(cfg, 64, "fwd_bwd", settings, "cpu")
    big = scaling.measure_memory(cfg, 1024, "fwd_bwd", settings, "cpu")
    assert small["delta_bytes"] > 0 and big["peak_bytes"] >= big["base_bytes"]
    # logits and their gradient alone: 2 x T x V x 4 bytes = 32 MiB at T=1024
    assert big["delta_bytes"] - small["delta_bytes"] > 20 * 2**20


@pytest.mark.slow  # a timing assertion: flaky on a shared machine, so not in the default suite
@pytest.mark.skipif(not HAS_MAMBA, reason="mamba block not built in this checkout")
def test_dense_time_grows_faster_in_T_than_mamba() -> None:
    """Attention is O(T^2), the selective scan O(T): the fitted exponents must show it."""
    settings = ScalingSettings(
        ["dense", "mamba"],
        seq_lens=[256, 512, 1024, 2048],
        batch_size=1,
        warmup=1,
        repeats=3,
        threads=1,
        memory=False,
        vocab_size=64,
        overrides=dict(d_model=32, n_layers=1, n_heads=4, d_ff=64),
    )
    points = scaling.run_sweep(settings, progress=lambda s: None)
    exps = analyse(points)["exponents"]
    dense, mamba = exps["dense/nano"]["fwd_bwd"], exps["mamba/nano"]["fwd_bwd"]
    assert dense > mamba + 0.2, (dense, mamba)
    assert dense > 1.2


def test_cli_scaling_writes_consistent_outputs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sc"
    rc = main(
        [
            "bench",
            "scaling",
            "--architectures",
            "dense,moe",
            "--seq-lens",
            "16,32",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-memory",
            "--threads",
            "1",
            "--d-model",
            "32",
            "--n-layers",
            "1",
            "--n-heads",
            "2",
            "--vocab-size",
            "64",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "scaling.json").read_text())
    pts = doc["points"]
    assert [(p["architecture"], p["seq_len"]) for p in pts] == [
        ("dense", 16),
        ("dense", 32),
        ("moe", 16),
        ("moe", 32),
    ]
    assert all(p["fwd_s"] > 0 and p["fwd_bwd_s"] > 0 for p in pts)
    assert all(p["fwd_bwd_mem_bytes"] is None for p in pts)  # --no-memory
    md = (out / "scaling.md").read_text()
    text = capsys.readouterr().out
    for p in pts:
        row = f"| {p['architecture']} | nano | {p['seq_len']} | {p['total_params']:,} | "
        row += f"{p['fwd_s'] * 1e3:.2f} | {p['fwd_bwd_s'] * 1e3:.2f} |"
        assert row in md and row in text
    assert "--seq-lens 16,32" in doc["command"] and "--no-memory" in doc["command"]
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["exponents"]["dense/nano"]["fwd"] is not None
    # the log-log plot: one line per architecture in each panel, the measured times
    from archlab.bench.common.plots import data_lines

    points = [scaling.Point(**p) for p in pts]
    fig = scaling_report.figure(points)
    fb = data_lines(fig, "fwd_bwd")
    assert sorted(fb) == ["dense", "moe"] and len(fig.axes) == 2  # no memory panel
    assert list(fb["moe"].get_ydata()) == [p["fwd_bwd_s"] for p in pts[2:]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--architectures", "dense,gpt5"], "unknown architecture 'gpt5'"),
        (["--seq-lens", "64,abc"], "--seq-lens: expected comma-separated integers"),
        (["--model-size", "huge"], "--model-size: unknown size 'huge'"),
        (["--repeats", "0"], "--repeats: must be an integer >= 1"),
        (["--d-model", "30", "--n-heads", "4"], "--n-heads"),
    ],
)
def test_cli_scaling_bad_input(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    try:  # argparse's own refusals (a flag's checked type) leave through SystemExit
        rc = main(["bench", "scaling", "--out-dir", str(tmp_path / "x"), *argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_crossover_is_named_only_where_the_spreads_allow() -> None:
    """Overlapping interquartile ranges make a point undecided: no T 'to the token' from
    single noisy points (issue 22: MoE 33.9 ms at T=64 against 10.8 ms at T=128)."""
    from archlab.bench.lengths.report import crossover_with_spread, verdict

    assert verdict((1.0, 2.0), (0.5, 0.9)) == -1 and verdict((1.0, 2.0), (2.1, 3)) == 1
    assert verdict((1.0, 2.0), (1.5, 2.5)) == 0
    ts, dense, other = [64, 128, 256, 512], [1.0, 2.0, 4.0, 8.0], [2.0, 2.5, 3.0, 3.5]
    # decided on both sides of the crossing: interpolated between 128 and 256
    T, kind, low = crossover_with_spread(ts, dense, other, [1, 1, -1, -1])
    assert kind == "crossing" and 128 < T < 256 and low == 128
    # an undecided point between: a range, no value
    assert crossover_with_spread(ts, dense, other, [1, 0, -1, -1]) == (256.0, "range", 64.0)
    assert crossover_with_spread(ts, dense, other, [0, 0, 0, -1]) == (512.0, "range", 64.0)
    assert crossover_with_spread(ts, dense, other, [-1, -1, -1, -1])[1] == "throughout"
    assert crossover_with_spread(ts, dense, other, [1, -1, -1, 0])[1] == "undecided"
    assert crossover_with_spread(ts, dense, other, [-1, -1, -1, 1])[1] == "none"


def test_points_keep_their_repeats_and_the_table_shows_the_spread() -> None:
    from archlab.bench.lengths.report import analyse, table

    pts = []
    for T in (64, 128, 256):
        noisy = [0.9, 1.0, 1.1, 5.0, 0.95]  # one slow outlier: the IQR, not the range
        pts.append(Point("dense", "nano", T, 1, 10, fwd_s=T * 1e-3, fwd_bwd_s=T * 1e-3,
                         fwd_samples=[x * T * 1e-3 for x in noisy],
                         fwd_bwd_samples=[x * T * 1e-3 for x in noisy]))  # fmt: skip
        pts.append(Point("mamba", "nano", T, 1, 10, fwd_s=0.15, fwd_bwd_s=0.15,
                         fwd_samples=[0.1, 0.15, 0.2, 0.12],
                         fwd_bwd_samples=[0.1, 0.15, 0.2, 0.12]))  # fmt: skip
    q1, q3 = pts[0].spread("fwd")
    assert q1 == pytest.approx(0.95 * 0.064) and q3 == pytest.approx(1.1 * 0.064)
    assert "| 64.00 [60.80, 70.40] |" in table(pts)
    # mamba's [0.105, 0.1625] overlaps dense's T=128 spread [0.1216, 0.1408], is decidedly
    # dearer at 64 and decidedly cheaper at 256: a range, not a value
    (c, _) = analyse(pts)["crossovers"]
    assert (c.kind, c.low, c.seq_len) == ("range", 64.0, 256.0)
    assert "between T=64 and T=256" in c.describe()


def test_the_first_step_setup_memory_is_reported_apart() -> None:
    """A fresh process's first Mamba step loads the fused kernels (~125 MiB): measured on a
    tiny step and kept out of the step's own memory, which then grows with T from near 0."""
    pytest.importorskip("numba")
    cfg = scaling.bench_config("mamba", "nano", 64, vocab_size=256)
    mem = scaling.measure_memory(cfg, 64, "fwd", scaling.ScalingSettings(["mamba"]), "cpu")
    assert "error" not in mem, mem
    assert mem["setup_bytes"] > 20 * 2**20  # the kernels' one-time share, reported apart
    assert mem["delta_bytes"] < 40 * 2**20  # the step itself: no constant ~125 MiB


def test_lengths_is_the_name_and_scaling_is_still_accepted(tmp_path: Path, capsys) -> None:
    """`bench lengths` is the command; `bench scaling` runs the same sweep for one more release,
    records the name it was given (its rerun command) and says so after the run."""
    tiny = ["--architectures", "dense", "--seq-lens", "8,16", "--warmup", "0", "--repeats", "1",
            "--no-memory", "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32",
            "--vocab-size", "32", "--threads", "1"]  # fmt: skip
    for name in ("lengths", "scaling"):
        out = tmp_path / name
        assert main(["bench", name, *tiny, "--out-dir", str(out)]) == 0
        err = capsys.readouterr().err
        doc = json.loads((out / "scaling.json").read_text())
        assert doc["command"].startswith(f"archlab bench {name} --architectures dense")
        assert [p["seq_len"] for p in doc["points"]] == [8, 16]
        renamed = "note: `archlab bench scaling` is now `archlab bench lengths`"
        assert (renamed in err) == (name == "scaling"), err

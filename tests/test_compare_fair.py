"""Winners that survive failure (issue #24), on constructed run folders read by compare's code:
a diverged seed loses its architecture "best loss" and "most stable" and shows in its row, a
rate with a failed seed is never chosen, "learned" needs a margin, a tiny difference ties,
and one seed crowns a leader, not a winner."""

from __future__ import annotations

import json
from pathlib import Path

from archlab.bench.common.reference import LEARNED_MARGIN, Reference
from archlab.bench.common.results import aggregate, best_points, read_run
from archlab.bench.compare import report

C = {name: i for i, name in enumerate(report.TABLE_COLUMNS)}
UNIGRAM = 5.0


def run_folder(
    root: Path,
    name: str,
    final: float | None,
    *,
    nan: int = 0,
    diverged: bool = False,
    wobble: float = 0.01,
    tps: float = 1000.0,
    lr: float = 1e-3,
) -> Path:
    """What the trainer leaves: metrics.jsonl, then summary.json ("failed" when the NaN
    guard stopped it)."""
    d = root / name
    d.mkdir(parents=True)
    recs = [
        {"kind": "train", "step": s, "tokens": 100 * s, "loss": 3 + 1 / s + wobble * (-1) ** s}
        for s in range(1, 21)
    ]
    recs.append({"kind": "eval", "step": 20, "tokens": 2000, "val_loss": final or 9.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {
        "status": "failed" if diverged else "ok",
        "error": "TrainingDiverged: 10 non-finite steps in a row" if diverged else None,
        "final_val_loss": None if diverged else final,
        "nan_count": nan,
        "tokens_per_s": None if diverged else tps,
        "peak_mem_bytes": 1e8,
        "model_mem_bytes": 5e7,
        "total_params": 1000,
        "active_params": 1000,
        "train_config": {"learning_rate": lr},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _read(root: Path, arch: str, seeds: dict[int, dict], lr: float = 1e-3):
    ref = Reference(unigram_entropy=UNIGRAM)
    out = []
    for seed, kw in seeds.items():
        r = read_run(run_folder(root, f"{arch}-lr{lr}-s{seed}", lr=lr, **kw), arch, seed)
        if r.ok:
            r.learned = ref.learned(r.final_val_loss)
        out.append(r)
    return out


def test_a_diverged_seed_loses_best_loss_and_most_stable_and_shows(tmp_path):
    # moe's two survivors have the lowest loss and the smoothest curves; its third seed diverged
    runs = _read(
        tmp_path,
        "moe",
        {
            0: dict(final=1.50, wobble=0.0),
            1: dict(final=1.51, wobble=0.0),
            2: dict(final=None, diverged=True, nan=10),
        },
    )
    runs += _read(tmp_path, "dense", {s: dict(final=2.0 + 0.01 * s) for s in range(3)})
    runs += _read(tmp_path, "mamba", {s: dict(final=2.5 + 0.01 * s) for s in range(3)})
    archs = aggregate(runs, ["moe", "dense", "mamba"])
    wins = {w.criterion: w for w in report.winners(archs)}
    assert wins["best loss"].architecture == "dense"
    assert "excluded, a seed failed: moe" in wins["best loss"].line()
    assert wins["most stable"].architecture != "moe" and "moe" not in wins["most stable"].tied
    row = report.table_rows(archs, UNIGRAM)[0]
    assert row[C["Notes"]].startswith("1 of 3 seeds failed; seed 2: TrainingDiverged")
    # the NaN column counts the failed seed's steps: mean 10/3 over the three seeds
    assert row[C["NaN/skipped"]].startswith("3 ± ")
    assert archs[0].stats["nan_count"].values == [0.0, 0.0, 10.0]


def test_a_rate_with_a_failed_seed_is_never_chosen(tmp_path):
    runs = []
    grid = {3e-4: (3.0, 3.1), 1e-3: (2.4, 2.5), 3e-3: (1.0, None), 1e-2: (4.0, 4.1)}
    for lr, (a, b) in grid.items():
        seeds = {0: dict(final=a), 1: dict(final=b) if b else dict(final=None, diverged=True)}
        runs += _read(tmp_path, "dense", seeds, lr=lr)
    points = aggregate(runs, ["dense"], list(grid))
    best = best_points(points, ["dense"])[0]
    assert best.learning_rate == 1e-3 and not best.every_rate_failed
    # a seed failed at every rate: the row says so
    runs = []
    for lr, final in ((1e-3, 2.0), (3e-3, 1.5)):
        runs += _read(
            tmp_path / "b", "moe", {0: dict(final=final), 1: dict(diverged=True, final=None)}, lr=lr
        )
    best = best_points(aggregate(runs, ["moe"], [1e-3, 3e-3]), ["moe"])[0]
    assert best.every_rate_failed
    assert "a seed failed at every rate" in report.table_rows([best], UNIGRAM)[0][C["Notes"]]


def test_just_below_the_unigram_is_not_learned(tmp_path):
    ref = Reference(unigram_entropy=UNIGRAM)
    assert ref.learned(UNIGRAM - 0.001) is False
    assert ref.learned(UNIGRAM - LEARNED_MARGIN) is False
    assert ref.learned(UNIGRAM - LEARNED_MARGIN - 1e-6) is True
    runs = _read(tmp_path, "hypermixer", {0: dict(final=UNIGRAM - 0.001, wobble=0.0)})
    runs += _read(tmp_path, "dense", {0: dict(final=3.0)})
    archs = aggregate(runs, ["hypermixer", "dense"])
    assert archs[0].learned is False
    assert all("hypermixer" not in (w.architecture or "") for w in report.winners(archs))
    assert report.table_rows(archs, UNIGRAM)[0][C["Notes"]].startswith("did not learn")


def test_a_significant_but_tiny_difference_is_a_tie(tmp_path):
    # every seed agrees dense is ahead (p < 0.05) but by 0.005 nats: below the minimum effect
    runs = _read(tmp_path, "dense", {s: dict(final=2.000 + 0.0001 * s) for s in range(4)})
    runs += _read(tmp_path, "moe", {s: dict(final=2.005 + 0.0001 * s) for s in range(4)})
    wins = {w.criterion: w for w in report.winners(aggregate(runs, ["dense", "moe"]))}
    best = wins["best loss"]
    assert best.kind == "tie" and best.architecture is None and best.tied == ["dense", "moe"]
    assert best.p_value is not None and best.p_value < 0.05
    assert "below the minimum effect 0.02" in best.line()
    assert best.headline().startswith("No winner, best loss: tie: dense, moe")
    # the same seeds 0.1 nats apart: a winner
    runs = _read(tmp_path / "w", "dense", {s: dict(final=2.0 + 0.0001 * s) for s in range(4)})
    runs += _read(tmp_path / "w", "moe", {s: dict(final=2.1 + 0.0001 * s) for s in range(4)})
    best = {w.criterion: w for w in report.winners(aggregate(runs, ["dense", "moe"]))}
    assert best["best loss"].kind == "winner" and best["best loss"].architecture == "dense"
    assert best["best loss"].headline().startswith("Winner, best loss: dense")


def test_most_stable_is_a_test_or_no_crown(tmp_path):
    # roughness 0.02 vs 0.021 over 3 seeds each: not a winner
    runs = _read(
        tmp_path, "dense", {s: dict(final=2.0, wobble=0.010 + 0.001 * s) for s in range(3)}
    )
    runs += _read(
        tmp_path, "moe", {s: dict(final=2.5, wobble=0.0105 + 0.001 * s) for s in range(3)}
    )
    stable = {w.criterion: w for w in report.winners(aggregate(runs, ["dense", "moe"]))}
    assert stable["most stable"].kind == "tie" and stable["most stable"].architecture is None
    # clearly smoother on every seed: a winner by Welch's test
    runs = _read(
        tmp_path / "b", "dense", {s: dict(final=2.0, wobble=0.01 + 1e-4 * s) for s in range(3)}
    )
    runs += _read(
        tmp_path / "b", "moe", {s: dict(final=2.5, wobble=0.2 + 1e-3 * s) for s in range(3)}
    )
    stable = {w.criterion: w for w in report.winners(aggregate(runs, ["dense", "moe"]))}
    assert stable["most stable"].kind == "winner" and stable["most stable"].architecture == "dense"
    assert "Welch's t-test vs moe" in stable["most stable"].line()


def test_one_seed_gives_a_leader_not_a_winner(tmp_path):
    runs = _read(tmp_path, "dense", {0: dict(final=2.0)})
    runs += _read(tmp_path, "moe", {0: dict(final=2.5)})
    wins = report.winners(aggregate(runs, ["dense", "moe"]))
    best = {w.criterion: w for w in wins}["best loss"]
    assert best.headline() == (
        "Leader (one seed: no significance can be claimed), best loss: dense (final val loss "
        "2.0000)"
    )
    assert not any(w.headline().startswith("Winner") for w in wins)


def test_a_single_candidate_is_not_crowned(tmp_path):
    """One architecture (a one-rate sweep, or every other row excluded): nothing was compared,
    so no line may read "Winner"."""
    runs = _read(tmp_path, "hybrid", {0: dict(final=1.14)})
    wins = report.winners(aggregate(runs, ["hybrid"]))
    best = {w.criterion: w for w in wins}["best loss"]
    assert best.kind == "only"
    assert best.headline() == "Only candidate, best loss: hybrid (final val loss 1.1400)"
    assert not any(w.headline().startswith("Winner") for w in wins)
    # two seeds change nothing: there is still no one to beat
    runs = _read(tmp_path / "two", "hybrid", {0: dict(final=1.14), 1: dict(final=1.15)})
    wins = report.winners(aggregate(runs, ["hybrid"]))
    assert all(w.kind in ("only", "none") for w in wins)

"""`archlab bench recall` across sessions: an interrupt names the --resume command, the grid
wall time is the total over every session, and cells whose training had not converged are
marked instead of being presented as the architecture's ability."""

from __future__ import annotations

import json
import math

import pytest

from archlab.bench.recall import loop as recall
from archlab.bench.recall import report as recall_report
from archlab.bench.recall.settings import RecallSettings
from archlab.bench.recall.worker import training_trend
from archlab.errors import Interrupted

LN13 = math.log(13)


def test_training_trend_tells_settled_falling_and_chance_plateau_apart() -> None:
    steps = 100
    flat_low = [(s, 0.05) for s in range(2, 101, 2)]
    assert training_trend(flat_low, steps, 13) == {
        "late_loss": 0.05, "loss_falling": False, "at_chance_loss": False, "converged": True,
    }  # fmt: skip
    falling = [(s, 2.0 - 0.015 * s) for s in range(2, 101, 2)]  # 1.1 -> 0.5 over the last 40%
    t = training_trend(falling, steps, 13)
    assert t["loss_falling"] is True and t["converged"] is False
    # the selective-copying plateau: ln(13) all the way (Mamba, 800 steps, 0.081 accuracy)
    plateau = [(s, LN13 + (0.01 if s % 4 else -0.01)) for s in range(16, 801, 16)]
    t = training_trend(plateau, 800, 13)
    assert t["at_chance_loss"] is True and t["loss_falling"] is False and not t["converged"]
    # noise around a settled value does not count as falling
    noisy = [(s, 0.3 + (0.02 if s % 4 else -0.02)) for s in range(2, 101, 2)]
    assert training_trend(noisy, steps, 13)["converged"] is True
    assert training_trend([], steps, 13)["converged"] is None


def test_unconverged_cells_are_marked_in_the_table() -> None:
    s = RecallSettings(
        task="selective-copy", architectures=["dense", "mamba"], d_models=[64], kv_pairs=[8],
        vocab_size=16,
    )  # fmt: skip
    base = dict(d_model=64, pairs=8, seed=0, ok=True, long_accuracy=None, learning_rate=3e-3)
    results = [
        dict(base, architecture="dense", val_accuracy=0.9, test_accuracy=0.91,
             loss_falling=False, at_chance_loss=False, converged=True),
        dict(base, architecture="mamba", val_accuracy=0.08, test_accuracy=0.081,
             loss_falling=False, at_chance_loss=True, converged=False),
    ]  # fmt: skip
    cells = {c["architecture"]: c for c in recall.aggregate(s, results)}
    assert cells["mamba"]["at_chance_loss"] == 1 and cells["dense"]["at_chance_loss"] == 0
    table = recall_report.tables(s, list(cells.values()))[8]
    assert "| 0.081 ‡ (lr 0.003" in table and "| 0.910 (lr 0.003" in table
    parsed = recall_report.parse_table(table)
    assert parsed[("mamba", 64)] == pytest.approx(0.081)


def _fake_result(spec) -> dict:
    return {
        "task": spec.task, "architecture": spec.architecture, "d_model": spec.d_model,
        "pairs": spec.pairs, "learning_rate": spec.learning_rate, "seed": spec.seed,
        "seq_len": spec.seq_len, "test_factor": spec.test_factor, "ok": True,
        "val_accuracy": 0.5, "test_accuracy": 0.5, "long_accuracy": 0.4, "long_note": None,
        "final_train_loss": 1.0, "parameters": 10, "state_elements": 4, "cache_elements": 4,
        "train_seconds": 0.1, "wall_seconds": 0.1, "cpu_seconds": 0.1,
        "loss_falling": True, "at_chance_loss": False, "converged": False,
    }  # fmt: skip


def test_interrupt_names_the_resume_command_and_wall_time_adds_up(tmp_path, monkeypatch):
    s = RecallSettings(architectures=["dense", "mamba"], d_models=[16], kv_pairs=[2], vocab_size=32)
    out = tmp_path / "grid"
    calls = []

    def fake_run_one(run, log_path, t0):
        calls.append(run.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        run.run_dir.mkdir(parents=True, exist_ok=True)
        res = _fake_result(run.spec)
        (run.run_dir / "result.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(recall, "run_one", fake_run_one)
    with pytest.raises(Interrupted) as exc:
        recall.run_grid(s, out, say=lambda _: None)
    msg = str(exc.value)
    assert "1 of 2 runs finished" in msg and exc.value.exit_code == 130
    assert f"archlab bench recall --resume --out-dir {out}" in msg
    sessions = json.loads((out / "recall.json").read_text())["sessions"]
    assert len(sessions) == 1 and sessions[0]["interrupted"] is True
    # pretend the first session took 5 minutes: the report must add it to the second
    doc = json.loads((out / "recall.json").read_text())
    doc["sessions"][0]["wall_seconds"] = 300.0
    (out / "recall.json").write_text(json.dumps(doc))
    outcome = recall.run_grid(s, out, resume=True, say=lambda _: None)
    assert calls[-1] == "mamba-d16-kv2-lr0.003-s0" and len(calls) == 3
    res = json.loads((out / "results.json").read_text())
    assert len(res["sessions"]) == 2
    assert res["wall_seconds"] == pytest.approx(300.0 + res["sessions"][1]["wall_seconds"])
    md = (out / "recall.md").read_text()
    assert "grid wall time 5.0 min over 2 sessions (5.0 + 0.0 min)" in md
    assert "**2 of 2 cells had not converged**" in md and "0.500 †" in md
    assert len(outcome["results"]) == 2

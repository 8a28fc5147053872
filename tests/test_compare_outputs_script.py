"""scripts/compare_outputs.py: timings and timestamps are masked, everything else is compared."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_outputs.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, loss: float, elapsed: float, tokens_per_s: str) -> Path:
    (root / "run").mkdir(parents=True)
    metrics = {"step": 1, "val_loss": loss, "elapsed_s": elapsed, "path": str(root / "run")}
    (root / "run" / "metrics.jsonl").write_text(json.dumps(metrics) + "\n")
    table = f"| Architecture | Tokens/s | Final val loss |\n|---|---|---|\n| dense | {tokens_per_s} | {loss} |\n"
    (root / "report.md").write_text(f"Run on 2026-12-0{int(elapsed)}T20:11:01+00:00.\n\n{table}")
    (root / "train.bin").write_bytes(b"\x00\x01\x02")
    return root


def test_timings_are_masked_and_a_changed_loss_is_not(tmp_path, capsys):
    compare = _load()
    before = _tree(tmp_path / "before", 6.25, 1.0, "3,289")
    same = _tree(tmp_path / "after_", 6.25, 2.0, "1,821")  # same path length as "before"
    assert compare.main(before, same) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    changed = _tree(tmp_path / "chang_", 6.5, 2.0, "1,821")
    assert compare.main(before, changed) == 1
    out = capsys.readouterr().out
    assert "run/metrics.jsonl: jsonl differs: [0].val_loss: 6.25 vs 6.5" in out
    assert "report.md: text differs" in out

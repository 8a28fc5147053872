"""`archlab bench generate`: decode-state sizes and per-token latency against context."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from archlab.bench.common.plots import data_lines
from archlab.bench.decode import measure as decode_bench
from archlab.bench.decode.measure import DecodeSettings, run_decode_bench, state_bytes
from archlab.cli import main

SMALL = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64)


def _have(module: str) -> bool:
    return importlib.util.find_spec(f"archlab.models.{module}") is not None


def _bench(arch: str, contexts: list[int], **kw) -> list:
    settings = DecodeSettings(
        [arch],
        contexts=contexts,
        new_tokens=2,
        warmup=1,
        threads=1,
        vocab_size=64,
        overrides=dict(SMALL, **kw),
    )
    return run_decode_bench(settings, progress=lambda s: None)


def test_state_bytes_counts_nested_tensors() -> None:
    t = torch.zeros(2, 3, dtype=torch.float32)
    assert state_bytes([{"k": t, "v": t.half()}, {"s": (t, [t])}, {"pos": 3}]) == 24 + 12 + 48


def test_dense_kv_cache_is_exactly_2_L_C_D_floats() -> None:
    pts = _bench("dense", [8, 40])
    fig = decode_bench.figure(pts)
    state = data_lines(fig, "state")
    assert list(state) == ["dense"] and list(data_lines(fig, "latency")) == ["dense"]
    assert list(state["dense"].get_ydata()) == [p.state_bytes / 1024 for p in pts]
    for p in pts:
        assert p.error is None and p.token_s > 0 and p.prefill_s > 0
        # K and V per layer: (B=1, H, C, hd) float32 each
        assert p.state_bytes == 2 * SMALL["n_layers"] * p.context * SMALL["d_model"] * 4
        # after the warm-up and timed steps the cache holds 3 more positions
        assert p.state_bytes_end == 2 * SMALL["n_layers"] * (p.context + 3) * SMALL["d_model"] * 4


@pytest.mark.skipif(not _have("mamba"), reason="mamba block not built in this checkout")
def test_mamba_state_does_not_grow() -> None:
    pts = _bench("mamba", [8, 64, 256])
    sizes = {p.state_bytes for p in pts}
    assert len(sizes) == 1 and pts[0].state_bytes > 0


@pytest.mark.skipif(not _have("hybrid"), reason="hybrid block not built in this checkout")
def test_hybrid_state_is_capped_by_the_window() -> None:
    pts = _bench("hybrid", [16, 64, 128], local_window=32)
    assert pts[0].state_bytes < pts[1].state_bytes == pts[2].state_bytes


def test_cli_generate_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g"
    rc = main(
        [
            "bench",
            "generate",
            "--architectures",
            "transformer",
            "--contexts",
            "4,16",
            "--new-tokens",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--vocab-size",
            "64",
            "--d-model",
            "32",
            "--n-layers",
            "1",
            "--n-heads",
            "2",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "generate.json").read_text())
    pts = doc["points"]
    assert [(p["architecture"], p["context"]) for p in pts] == [("dense", 4), ("dense", 16)]
    text = capsys.readouterr().out
    for p in pts:
        assert (
            f"| dense | {p['context']} | {p['total_params']:,} | {p['token_s'] * 1e3:.3f} |" in text
        )
    assert pts[1]["state_bytes"] == 4 * pts[0]["state_bytes"]
    assert (out / "generate.png").read_bytes()[:4] == b"\x89PNG"
    assert "archlab bench generate --architectures dense" in doc["command"]


def test_cli_generate_bad_context(capsys) -> None:
    assert main(["bench", "generate", "--contexts", "-5"]) == 2
    assert "--contexts" in capsys.readouterr().err

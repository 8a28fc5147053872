"""Two output trees of the same tiny runs, compared with timings and timestamps masked.

Why: a refactor that moves code must not change what the commands write (issue 23). Make the
"before" tree from the old code and the "after" tree from the new, each in a folder whose path
has the same length (paths inside the files are replaced), one thread, on the same machine::

    export OMP_NUM_THREADS=1 PYTHONPATH=<checkout>/src; cd $OUT
    archlab compare --architectures dense,mamba --model-size nano --max-tokens 8192 --seeds 1 \
        --num-threads 1 --out-dir $OUT/compare > $OUT/compare.stdout 2> $OUT/compare.stderr
    archlab bench recall --architectures dense,mamba --d-models 16 --kv-pairs 2 --seq-len 16 \
        --steps 20 --num-train 256 --num-val 32 --num-test 32 --threads 1 --out-dir $OUT/recall \
        > $OUT/recall.stdout 2> $OUT/recall.stderr
    archlab bench scaling --architectures dense,mamba --threads 1 --seq-lens 16,32 --warmup 0 \
        --repeats 1 --out-dir $OUT/lengths > $OUT/lengths.stdout 2> $OUT/lengths.stderr
    archlab bench generate --architectures dense,mamba --threads 1 --contexts 8,16 \
        --new-tokens 4 --warmup 1 --out-dir $OUT/decode > $OUT/decode.stdout 2> $OUT/decode.stderr
    archlab export --checkpoint $OUT/compare/dense --out $OUT/export > $OUT/export.stdout \
        2> $OUT/export.stderr

then ``python scripts/compare_outputs.py BEFORE AFTER`` (exit 0: identical after masking).

Rules; everything not masked must match exactly:
- bytes equal first. Figures of wall time or measured speed (loss_vs_time.png, scaling.png,
  generate.png) are only checked to exist on both sides; a .lock file is ignored (a pid).
- .safetensors: the parsed header and the data bytes (safetensors writes its metadata map in
  a per-process order); checksums.json: the same files listed (their hashes follow from the
  files, each compared here on its own).
- trainer_state.pt: loaded and compared as data, ``elapsed_s`` masked.
- .json / .jsonl: parsed; a value whose key matches TIMING_KEY (measured seconds, speeds,
  memory, samples, MFU, the hardware block, creation times, exponents and crossovers fitted
  to timings) is masked, and a table's cells in timing columns (TIMING_COL).
- text (.md, .log, stdout, stderr): progress lines (they hold "elapsed") are dropped; table
  cells in TIMING_COL columns are masked and compared stripped (column widths follow the
  widest, possibly timing, value); elsewhere numbers with a time/speed/memory unit, dates,
  clock times, the MFU and load-average lines and crossover verdicts are masked.
- .csv: cells in columns matching TIMING_KEY masked.
"""

import csv
import io
import json
import re
import sys
from pathlib import Path

TIMING_KEY = re.compile(
    r"^(created|ended|started|finished|hardware|crossovers|exponents|mfu|tokens_per_s|s|date)$"
    r"|(_s|_seconds|seconds|_samples|mem_bytes|peak_bytes|setup_bytes|before_model_bytes)$|^elapsed"
)
TIMING_COL = re.compile(
    r"^time|tokens/s|tok/s|memory \(|mem \(|\(ms\)|us/token|ms/token|exponent|mfu|"
    r"(^|\s)s$",
    re.I,
)
UNIT = re.compile(
    r"\b\d[\d,]*(\.\d+)?(e[-+]?\d+)?\s?(s|ms|us|µs|min|tok/s|tokens/s|MiB|GiB|KiB|MB|GB|"
    r"GFLOP/s)(?!\w)|\b\d\d:\d\d(:\d\d)?\b|\d{4}-\d\d-\d\d(T[\d:+.]+)?|\b\d+m\d+s\b|"
    r"(Tokens/s|tok/s|MFU):? [\d,.]+%?|Load average.*$|^MFU \(model FLOPs.*$|(?<= vs )\w+ \((forward|forward\+backward), [^)]*\): .*$"
)
BINARY_TIME_FIGS = {"loss_vs_time.png", "scaling.png", "generate.png"}
masked = {"json": 0, "cells": 0, "text": 0}


def mask_json(v, key=""):
    if (
        isinstance(v, dict)
        and isinstance(v.get("rows"), list)
        and isinstance(v.get("columns"), list)
    ):
        cols = v["columns"]
        timing = [bool(TIMING_COL.search(str(c))) for c in cols]
        masked["cells"] += sum(timing) * len(v["rows"])
        v = dict(
            v,
            rows=[
                [("<t>" if t else c) for t, c in zip(timing, r, strict=False)] for r in v["rows"]
            ],
        )
    if isinstance(v, dict):
        return {k: ("<t>" if TIMING_KEY.search(k) else mask_json(x, k)) for k, x in v.items()}
    if isinstance(v, list):
        return [mask_json(x, key) for x in v]
    return v


def count_json_masks(a):
    return json.dumps(a).count('"<t>"')


def mask_text(text):
    out, header = [], None
    for line in text.split("\n"):
        if "elapsed" in line:  # progress lines: printed on a timer, their numbers are timings
            masked["progress_lines"] = masked.get("progress_lines", 0) + 1
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif all(set(c) <= set("-: ") for c in cells):
                pass
            else:
                cells = mask_cells(header, cells, TIMING_COL)
            out.append("|".join(cells))
            continue
        header = None
        n = len(UNIT.findall(line))
        masked["text"] += n
        out.append(UNIT.sub("<t>", line))
    return "\n".join(out)


def mask_cells(header, cells, pattern):
    """The row with every cell under a header that ``pattern`` matches replaced by <t>."""
    out = []
    for h, c in zip(header, cells, strict=False):
        if pattern.search(h):
            masked["cells"] += 1
            c = "<t>"
        out.append(c)
    return out


def mask_csv(text):
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return rows
    return [rows[0]] + [mask_cells(rows[0], r, TIMING_KEY) for r in rows[1:]]


def load_pt(p):
    import torch

    return torch.load(p, weights_only=False, map_location="cpu")


def to_plain(v):
    import torch

    if isinstance(v, torch.Tensor):
        return ["tensor", str(v.dtype), list(v.shape), v.flatten().tolist()]
    if isinstance(v, dict):
        return {str(k): to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def main(before, after):
    B, A = Path(before), Path(after)
    sb, sa = str(B).encode(), str(A).encode()
    assert len(sb) == len(sa)
    fb = {p.relative_to(B) for p in B.rglob("*") if p.is_file()}
    fa = {p.relative_to(A) for p in A.rglob("*") if p.is_file()}
    problems = []
    if fb != fa:
        problems.append(
            f"file sets differ: only before {sorted(map(str, fb - fa))}, only after {sorted(map(str, fa - fb))}"
        )
    checked = {"bytes": 0, "json": 0, "text": 0, "pt": 0, "exists": 0}
    for rel in sorted(fb & fa):
        name = rel.name
        if name == ".archlab.lock":
            continue
        x = (B / rel).read_bytes()
        y = (A / rel).read_bytes().replace(sa, sb)
        if name in BINARY_TIME_FIGS:
            checked["exists"] += 1
            continue
        if name.endswith(".pt"):
            checked["pt"] += 1
            px = mask_json(to_plain(load_pt(B / rel)))
            py = mask_json(to_plain(load_pt(A / rel)))
            py = json.loads(json.dumps(py, default=str).replace(str(A), str(B)))
            px = json.loads(json.dumps(px, default=str))
            if px != py:
                problems.append(f"{rel}: trainer state differs")
            continue
        if x == y:
            checked["bytes"] += 1
            continue
        if name.endswith(".safetensors"):
            import struct

            def split(raw):
                n = struct.unpack("<Q", raw[:8])[0]
                return json.loads(raw[8 : 8 + n]), raw[8 + n :]

            (hx, dx), (hy, dy) = split(x), split(y)
            checked["safetensors_parsed"] = checked.get("safetensors_parsed", 0) + 1
            if hx != hy or dx != dy:
                problems.append(f"{rel}: safetensors header or data differ")
            continue
        if name == "checksums.json":
            # sha256 of the folder's files: each file is compared above/below on its own (the
            # safetensors header's metadata order and trainer_state.pt's timings vary per run)
            jx, jy = json.loads(x), json.loads(y)
            checked["checksums_keys"] = checked.get("checksums_keys", 0) + 1
            if sorted(jx) != sorted(jy):
                problems.append(f"{rel}: checksummed files differ")
            continue
        try:
            tx, ty = x.decode(), y.decode()
        except UnicodeDecodeError:
            problems.append(f"{rel}: binary differs")
            continue
        if name.endswith(".json"):
            checked["json"] += 1
            jx, jy = mask_json(json.loads(tx)), mask_json(json.loads(ty))
            masked["json"] += count_json_masks(jx)
            if jx != jy:
                problems.append(f"{rel}: json differs: " + first_diff(jx, jy))
        elif name.endswith(".jsonl"):
            checked["json"] += 1
            lx = [mask_json(json.loads(line)) for line in tx.splitlines() if line.strip()]
            ly = [mask_json(json.loads(line)) for line in ty.splitlines() if line.strip()]
            masked["json"] += sum(count_json_masks(j) for j in lx)
            if lx != ly:
                problems.append(f"{rel}: jsonl differs: " + first_diff(lx, ly))
        elif name.endswith(".csv"):
            checked["text"] += 1
            if mask_csv(tx) != mask_csv(ty):
                problems.append(f"{rel}: csv differs")
        else:
            checked["text"] += 1
            mx, my = mask_text(tx), mask_text(ty)
            if mx != my:
                lx, ly = mx.split("\n"), my.split("\n")
                diffs = [(i, a, b) for i, (a, b) in enumerate(zip(lx, ly, strict=False)) if a != b][
                    :3
                ]
                problems.append(f"{rel}: text differs ({len(lx)} vs {len(ly)} lines): {diffs}")
    print("files compared:", len(fb & fa), checked, "masked values:", masked)
    if problems:
        print("DIFFERENCES:")
        [print(" -", p) for p in problems]
        return 1
    print("IDENTICAL after masking")
    return 0


def first_diff(a, b, path=""):
    if type(a) is not type(b):
        return f"{path}: {a!r} vs {b!r}"[:300]
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_diff(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return first_diff(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} vs {b!r}"[:300]


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

"""`archlab eval`: validation loss, perplexity and bits per byte of a checkpoint; MQAR accuracy.

Language data: the split is covered by consecutive, non-overlapping windows of ``seq_len``
inputs, so every target token (the split's tokens after the first, up to ``max_tokens``)
is predicted exactly once, deterministically. Loss is the mean cross-entropy in nats per
counted token (a loss mask, e.g. chat data, leaves tokens out); perplexity = exp(loss).

Bits per byte = total nats / ln 2 / total UTF-8 bytes of the covered target text: the
counted target tokens, decoded run by run with the data's tokenizer, each end-of-text
token counted as one byte (a document separator, not the bytes of its name). It compares
models with different tokenizers, which tokens/s and loss per token cannot.

MQAR data (meta ``task == "mqar"``): every validation example whole, accuracy of the argmax
prediction at the answer positions (and the fraction of examples with every answer right).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...data.generated import FIXED_LENGTH_TASKS
from ...errors import UserError
from ...progress import Progress

IGNORE_INDEX = -100


@dataclass
class EvalResult:
    checkpoint: str
    data: str
    split: str
    architecture: str
    task: str
    seq_len: int
    tokens: int  # counted target tokens
    loss: float  # nats per counted token
    perplexity: float
    bits_per_token: float
    bytes: int | None = None
    bits_per_byte: float | None = None
    accuracy: float | None = None  # MQAR: answer positions
    example_accuracy: float | None = None  # MQAR: examples with every answer right
    examples: int | None = None

    def lines(self) -> list[str]:
        out = [
            f"Checkpoint: {self.checkpoint} ({self.architecture})",
            f"Data: {self.data} ({self.split} split, {self.tokens:,} tokens counted, "
            f"seq-len {self.seq_len})",
            f"Loss: {self.loss:.4f} nats/token ({self.bits_per_token:.4f} bits/token)",
            f"Perplexity: {self.perplexity:.3f}",
        ]
        if self.bits_per_byte is not None:
            out.append(f"Bits per byte: {self.bits_per_byte:.4f} ({self.bytes:,} bytes)")
        if self.accuracy is not None:
            name = "MQAR" if self.task == "mqar" else "Selective-copy"
            out.append(
                f"{name} accuracy: {self.accuracy:.4f} per answer, {self.example_accuracy:.4f} "
                f"per example ({self.examples:,} examples)"
            )
        return out


def _split_arrays(data_dir: Path, meta: dict[str, Any], split: str):
    """(tokens, mask or None) of a split as read-only memmaps (the prepared-data format)."""
    n = int(meta[f"{split}_tokens"])
    if n < 2:
        raise UserError(f"{data_dir}: the {split} split has {n} tokens, too few to evaluate")
    tokens = np.memmap(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")[:n]
    mask = None
    if meta.get("has_mask"):
        mask = np.memmap(data_dir / f"{split}_mask.bin", dtype=np.uint8, mode="r")[:n]
    return tokens, mask


def lm_windows(n_tokens: int, seq_len: int, max_tokens: int | None) -> Iterator[tuple[int, int]]:
    """(start, length) of consecutive windows whose targets cover tokens 1 .. end exactly once."""
    end = n_tokens - 1  # number of predictable targets
    if max_tokens is not None:
        end = min(end, max_tokens)
    start = 0
    while start < end:
        length = min(seq_len, end - start)
        yield start, length
        start += length


def text_bytes(targets: np.ndarray, counted: np.ndarray, tokenizer: Any, eot_id: int) -> int:
    """UTF-8 bytes of the counted targets: runs decoded whole, end-of-text as one byte each."""
    total = int(np.count_nonzero(counted & (targets == eot_id)))
    keep = counted & (targets != eot_id)
    # boundaries of runs of kept tokens
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    for a, b in zip(edges[0::2], edges[1::2], strict=True):
        total += len(tokenizer.decode(targets[a:b].tolist()).encode("utf-8"))
    return total


def evaluate_lm(
    model: Any,
    tokens: np.ndarray,
    mask: np.ndarray | None,
    seq_len: int,
    batch_size: int,
    device: str,
    max_tokens: int | None = None,
    progress_mode: str | None = "off",
) -> tuple[float, int, np.ndarray, np.ndarray]:
    """(total nats, counted tokens, covered targets, their counted flags).

    ``progress_mode``: see archlab.progress (None: bar on a terminal, plain lines elsewhere)."""
    import torch
    import torch.nn.functional as F

    windows = list(lm_windows(len(tokens), seq_len, max_tokens))
    total_nats, counted = 0.0, 0
    bar = Progress(
        sum(n for _, n in windows), "eval", "tok", mode=progress_mode, unit_scale=True, leave=False
    )
    with torch.no_grad(), bar:
        i = 0
        while i < len(windows):
            length = windows[i][1]
            group = [w for w in windows[i : i + batch_size] if w[1] == length]
            i += len(group)
            rows = np.stack([tokens[s : s + length + 1] for s, _ in group]).astype(np.int64)
            x = torch.from_numpy(rows[:, :-1]).to(device)  # (B, T)
            y = torch.from_numpy(rows[:, 1:].copy())  # (B, T)
            if mask is not None:
                m = np.stack([mask[s + 1 : s + length + 1] for s, _ in group])
                y[torch.from_numpy(m == 0)] = IGNORE_INDEX
            logits = model(x).float()  # (B, T, V)
            loss = F.cross_entropy(
                logits.flatten(0, 1),
                y.to(device).flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_nats += float(loss)
            counted += int((y != IGNORE_INDEX).sum())
            bar.update(len(group) * length, postfix=f"loss {total_nats / max(counted, 1):.4f}")
    end = windows[-1][0] + windows[-1][1] if windows else 0
    targets = np.asarray(tokens[1 : end + 1])
    flags = (
        np.ones(len(targets), dtype=bool) if mask is None else np.asarray(mask[1 : end + 1]) == 1
    )
    return total_nats, counted, targets, flags


def evaluate_mqar(
    model: Any,
    tokens: np.ndarray,
    mask: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: str,
    progress_mode: str | None = "off",
) -> dict[str, Any]:
    """Loss and argmax accuracy on the answer positions of every whole example."""
    import torch
    import torch.nn.functional as F

    example = seq_len + 1
    n = len(tokens) // example
    if n < 1:
        raise UserError("the mqar split holds no whole example")
    ex = np.asarray(tokens[: n * example]).reshape(n, example).astype(np.int64)
    mk = np.asarray(mask[: n * example]).reshape(n, example)
    nats, answers, right, all_right = 0.0, 0, 0, 0
    bar = Progress(n, "eval", "example", mode=progress_mode, leave=False)
    with torch.no_grad(), bar:
        for s in range(0, n, batch_size):
            x = torch.from_numpy(ex[s : s + batch_size, :-1]).to(device)  # (B, T)
            y = torch.from_numpy(ex[s : s + batch_size, 1:].copy()).to(device)
            m = torch.from_numpy(mk[s : s + batch_size, 1:] == 1).to(device)  # answers
            logits = model(x).float()  # (B, T, V)
            y_masked = y.masked_fill(~m, IGNORE_INDEX)
            nats += float(
                F.cross_entropy(
                    logits.flatten(0, 1),
                    y_masked.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            hit = (logits.argmax(-1) == y) & m  # (B, T)
            answers += int(m.sum())
            right += int(hit.sum())
            all_right += int(((hit | ~m).all(dim=1)).sum())
            bar.update(x.shape[0], postfix=f"accuracy {right / max(answers, 1):.4f}")
    return {"nats": nats, "answers": answers, "right": right, "all_right": all_right, "examples": n}


def run_eval(
    checkpoint: str,
    data: str | None,
    *,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str = "cpu",
    quiet: bool = False,
) -> EvalResult:
    """Evaluate a checkpoint; progress over the batches on stderr unless ``quiet``."""
    from ...data.loader import TokenDataset
    from ...data.prepare import resolve_data
    from ...train.checkpoint import load_model, resolve_checkpoint, run_dir_of
    from ..common.models import resolve_device

    if split not in ("train", "val"):
        raise UserError(f"--split: must be train or val (got {split!r})")
    for flag, value in (
        ("--batch-size", batch_size),
        ("--seq-len", seq_len),
        ("--max-tokens", max_tokens),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be >= 1 (got {value})")
    device = resolve_device(device)
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model(ckpt, device=device)
    run_summary = _read_json(run_dir_of(ckpt) / "summary.json") or {}
    if data is None:
        data = run_summary.get("data_dir") or (run_summary.get("train_config") or {}).get("data")
        if data is None:
            raise UserError("--data: give the data to evaluate on (the run records none)")
    data_dir = Path(
        resolve_data(data, "language", cfg.preset, tokenizer=str(ckpt / "tokenizer.json"))
    )
    ds = TokenDataset(data_dir, split)  # checks the folder is complete
    meta = ds.meta
    if int(meta["vocab_size"]) > cfg.vocab_size:
        raise UserError(
            f"{data_dir}: vocabulary {meta['vocab_size']} is larger than the model's "
            f"{cfg.vocab_size}"
        )
    tokens, mask = _split_arrays(data_dir, meta, split)
    task = meta.get("task", "lm")
    if task in FIXED_LENGTH_TASKS:
        T = int(meta["seq_len"])
        if seq_len is not None and seq_len != T:
            raise UserError(f"--seq-len {seq_len}: the {task} examples have {T} tokens")
    else:
        T = seq_len or run_summary.get("seq_len") or cfg.max_seq_len
    if cfg.uses_learned_positions and T > cfg.max_seq_len:
        raise UserError(
            f"--seq-len {T} exceeds the model's max_seq_len {cfg.max_seq_len} (learned positions)"
        )
    mode = "off" if quiet else None
    common = dict(
        checkpoint=str(ckpt),
        data=str(data_dir),
        split=split,
        architecture=cfg.architecture,
        task=task,
        seq_len=T,
    )
    if task in FIXED_LENGTH_TASKS:
        assert mask is not None
        r = evaluate_mqar(model, tokens, mask, T, batch_size, device, mode)
        loss = r["nats"] / max(r["answers"], 1)
        return EvalResult(
            **common,
            tokens=r["answers"],
            loss=loss,
            perplexity=_exp(loss),
            bits_per_token=loss / math.log(2),
            accuracy=r["right"] / max(r["answers"], 1),
            example_accuracy=r["all_right"] / r["examples"],
            examples=r["examples"],
        )
    nats, counted, targets, flags = evaluate_lm(
        model, tokens, mask, T, batch_size, device, max_tokens, mode
    )
    if counted == 0:
        raise UserError(f"{data_dir}: no token of the {split} split counts for the loss")
    n_bytes = text_bytes(targets, flags, tokenizer, int(meta["eot_id"]))
    loss = nats / counted
    return EvalResult(
        **common,
        tokens=counted,
        loss=loss,
        perplexity=_exp(loss),
        bits_per_token=loss / math.log(2),
        bytes=n_bytes,
        bits_per_byte=nats / math.log(2) / n_bytes if n_bytes else None,
    )


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def to_json(result: EvalResult) -> str:
    return json.dumps(asdict(result), indent=2)

"""One run of `archlab bench recall`, in its own process: ``python -m archlab.bench.recall.worker
RUN_DIR``.

Reads ``RUN_DIR/spec.json`` (written by the parent), trains a 2-layer model of one
architecture at one width and learning rate on one probe, and writes ``metrics.jsonl`` (the
training loss) and, last and atomically, ``result.json``: answer accuracy on a validation set
(which picks the learning rate), on a separate test set at the training length and on one at
``test_factor`` times that length. Architectures with learned absolute positions cannot be
evaluated beyond the length they were built for; they say so instead of running.

The loop is the project's optimizer and schedule (AdamW with decay on matrices only, linear
warmup then cosine, gradient clipping at 1.0) on masked cross-entropy: only the answer
positions count, as in Zoology. MoE adds its load-balancing loss as the trainer does.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .tasks import IGNORE_INDEX, TaskData, answer_accuracy

VAL_SEED, TEST_SEED, LONG_SEED = 1_000_003, 2_000_003, 3_000_003


@dataclass
class RunSpec:
    """Everything one run needs; the parent writes it as spec.json."""

    task: str
    architecture: str
    d_model: int
    pairs: int
    learning_rate: float
    seed: int  # model initialisation and batch order
    data_seed: int  # the examples (the same for every architecture)
    seq_len: int
    vocab_size: int
    n_heads: int
    steps: int
    batch_size: int
    num_train: int
    num_val: int
    num_test: int
    test_factor: int = 2
    power_a: float = 0.01
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    use_rope: bool | None = None
    threads: int | None = None
    device: str = "cpu"  # auto, cpu, cuda, mps

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def task_data(self, seq_len: int | None = None) -> TaskData:
        return TaskData(
            self.task, self.vocab_size, self.pairs, seq_len or self.seq_len, self.power_a
        )


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, else mps, else cpu; an unavailable device is a user error."""
    from ...errors import UserError

    if name not in DEVICES:
        raise UserError(f"--device: unknown device {name!r} (allowed: {', '.join(DEVICES)})")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine (try --device cpu)")
    return torch.device(name)


def model_config(spec: RunSpec, max_seq_len: int | None = None):
    """The 2-layer model of a run (see recall.py for which blocks keep their MLP and why)."""
    from ...config import preset_config

    learned = preset_config(
        spec.architecture, model_size="nano", vocab_size=spec.vocab_size, use_rope=spec.use_rope
    ).uses_learned_positions
    long_len = spec.seq_len * spec.test_factor
    return preset_config(
        spec.architecture,
        model_size="nano",
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        n_layers=2,
        n_heads=spec.n_heads,
        d_ff=4 * spec.d_model,
        # learned positions exist only up to the training length: beyond it they were never
        # trained, so evaluating there would be noise, not extrapolation
        max_seq_len=max_seq_len or (spec.seq_len if learned else max(long_len, spec.seq_len)),
        use_rope=spec.use_rope,
    )


def state_elements(cfg, seq_len: int) -> dict[str, int | None]:
    """Decode state per sequence, summed over layers, in elements (as MAD normalises by).

    Each architecture declares what its mixer holds (``ArchitectureSpec.state_elements``):
    attention the KV cache, 2 x T x d per layer (the hybrid's window caps T); Mamba
    d_inner x N per layer; HyperMixer its running d' x d matrix. ``state_per_layer`` is the
    first layer's. None for an architecture that declares nothing.
    """
    from ...models import registry

    per_layer = registry.get(cfg.architecture).state_per_layer(cfg, seq_len)
    if not per_layer:
        return {"state_elements": None, "state_per_layer": None}
    return {"state_elements": sum(per_layer), "state_per_layer": per_layer[0]}


def _numel(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numel(v) for v in obj)
    return 0


@torch.no_grad()
def measured_cache_elements(model, seq_len: int, vocab_size: int) -> int:
    """Elements the model's own decode cache holds after a prefix of seq_len tokens (B = 1)."""
    cache = model.init_cache()
    device = next(model.parameters()).device
    model(torch.randint(1, vocab_size, (1, seq_len), device=device), cache=cache)
    return _numel(cache.layers)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> dict[str, float]:
    """Answer accuracy (answer positions only) and mean answer loss over every example."""
    model.eval()
    right = counted = 0
    loss_sum = 0.0
    all_right = 0
    device = next(model.parameters()).device
    for s in range(0, len(x), batch):
        logits = model(x[s : s + batch].to(device))
        yb = y[s : s + batch].to(device)
        r, c = answer_accuracy(logits, yb)
        right, counted = right + r, counted + c
        loss_sum += float(
            F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(),
                yb.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        keep = yb != IGNORE_INDEX
        hit = (logits.argmax(-1) == yb) | ~keep
        all_right += int(hit.all(dim=1).sum())
    model.train()
    return {
        "accuracy": right / max(counted, 1),
        "loss": loss_sum / max(counted, 1),
        "example_accuracy": all_right / len(x),
        "answers": counted,
    }


def train_and_evaluate(spec: RunSpec, run_dir: Path | None = None) -> dict[str, Any]:
    """Train one model on one probe and evaluate it; returns the result record."""
    from ...models import build_model
    from ...train.optim import WarmupCosineSchedule, build_optimizer

    device = resolve_device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t_start = time.perf_counter()
    data = spec.task_data()
    x_train, y_train = data.tensors(spec.num_train, spec.data_seed)
    x_val, y_val = data.tensors(spec.num_val, spec.data_seed + VAL_SEED)
    x_test, y_test = data.tensors(spec.num_test, spec.data_seed + TEST_SEED)

    torch.manual_seed(spec.seed)
    cfg = model_config(spec)
    model = build_model(cfg).to(device)
    opt = build_optimizer(model, spec.learning_rate, spec.weight_decay, device_type=device.type)
    warmup = max(1, round(spec.warmup_fraction * spec.steps)) if spec.steps > 1 else 0
    schedule = WarmupCosineSchedule(spec.learning_rate, warmup, spec.steps)
    g = torch.Generator().manual_seed(spec.seed)
    log_every = max(1, spec.steps // 50)
    metrics = open(run_dir / "metrics.jsonl", "w") if run_dir is not None else None
    curve: list[tuple[int, float]] = []
    diverged_at: int | None = None
    loss_value = float("nan")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for step in range(spec.steps):
            lr = schedule.apply(opt, step)
            idx = torch.randint(0, len(x_train), (spec.batch_size,), generator=g)
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            logits, aux = model(xb, return_aux=True)  # (B, T, V)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                yb.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            loss_value = float(loss.detach())
            if aux and aux.get("aux_loss") is not None:
                loss = loss + aux["aux_loss"]
            if not math.isfinite(loss_value):
                diverged_at = step + 1
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % log_every == 0 or step + 1 == spec.steps:
                curve.append((step + 1, loss_value))
            if metrics is not None and ((step + 1) % log_every == 0 or step + 1 == spec.steps):
                rec = {
                    "step": step + 1,
                    "loss": loss_value,
                    "lr": lr,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
    finally:
        if metrics is not None:
            metrics.close()
    train_s = time.perf_counter() - t0
    train_cpu = time.process_time() - c0  # all threads of this process
    state = state_elements(cfg, spec.seq_len)
    result: dict[str, Any] = {
        **asdict(spec),
        "ok": diverged_at is None,
        "error": None if diverged_at is None else f"loss became non-finite at step {diverged_at}",
        "final_train_loss": loss_value,
        "parameters": model.num_parameters(),
        "learned_positions": cfg.uses_learned_positions,
        "max_seq_len": cfg.max_seq_len,
        "chance": data.chance,
        "num_values": data.num_values,
        **state,
        "cache_elements": measured_cache_elements(model, spec.seq_len, spec.vocab_size),
        "train_seconds": round(train_s, 3),
        "train_cpu_seconds": round(train_cpu, 3),
        "steps_run": spec.steps if diverged_at is None else diverged_at,
        **training_trend(curve, spec.steps, data.num_values),
        "device": str(device),
    }
    if diverged_at is not None:
        result.update(val_accuracy=None, test_accuracy=None, long_accuracy=None)
        result["long_note"] = "diverged"
    else:
        val = evaluate(model, x_val, y_val)
        test = evaluate(model, x_test, y_test)
        result.update(
            val_accuracy=val["accuracy"],
            val_loss=val["loss"],
            test_accuracy=test["accuracy"],
            test_loss=test["loss"],
            test_example_accuracy=test["example_accuracy"],
            test_answers=test["answers"],
        )
        long_len = spec.seq_len * spec.test_factor
        if cfg.uses_learned_positions and long_len > cfg.max_seq_len:
            result["long_accuracy"] = None
            result["long_note"] = (
                f"learned absolute positions exist only for {cfg.max_seq_len} tokens: "
                f"cannot extrapolate to {long_len}"
            )
        else:
            xl, yl = spec.task_data(long_len).tensors(spec.num_test, spec.data_seed + LONG_SEED)
            long = evaluate(model, xl, yl)
            result["long_accuracy"] = long["accuracy"]
            result["long_loss"] = long["loss"]
            result["long_note"] = None
        result["long_seq_len"] = long_len
    result["seconds"] = round(time.perf_counter() - t_start, 3)
    return result


# Training has not converged when the mean logged loss of the last 20% of the run is below
# that of the 20% before by more than this share (and by more than FALLING_MIN nats), or when
# it never left the no-context level ln(values) (a plateau more steps may leave: Mamba on
# selective copying sat there for ~350 steps before its loss fell to 0.03).
FALLING_SHARE, FALLING_MIN, CHANCE_SHARE = 0.05, 0.01, 0.95


def training_trend(curve: list[tuple[int, float]], steps: int, num_values: int) -> dict[str, Any]:
    """Whether a run's loss curve (logged (step, loss)) had settled by its end.

    ``loss_falling``: the last fifth's mean loss is below the fifth before by more than
    FALLING_SHARE (relative) and FALLING_MIN (absolute); ``at_chance_loss``: the last fifth's
    mean loss is within 5% of ln(values), the loss of a uniform guess over the answers.
    """
    late = [loss for s, loss in curve if s > 0.8 * steps and math.isfinite(loss)]
    before = [loss for s, loss in curve if 0.6 * steps < s <= 0.8 * steps and math.isfinite(loss)]
    if not late:
        return {"loss_falling": None, "at_chance_loss": None, "converged": None}
    end = sum(late) / len(late)
    prev = sum(before) / len(before) if before else end
    falling = prev - end > max(FALLING_SHARE * prev, FALLING_MIN)
    at_chance = end >= CHANCE_SHARE * math.log(num_values)
    return {
        "late_loss": round(end, 4),
        "loss_falling": falling,
        "at_chance_loss": at_chance,
        "converged": not (falling or at_chance),
    }


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) from a run's metrics.jsonl (empty when it cannot be read)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0])
    spec = RunSpec.from_dict(json.loads((run_dir / "spec.json").read_text()))
    try:
        result = train_and_evaluate(spec, run_dir)
    except Exception as exc:  # recorded for the report; the parent carries on with the grid
        traceback.print_exc()
        result = {**asdict(spec), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        write_json_atomic(run_dir / "result.json", result)
        return 1
    write_json_atomic(run_dir / "result.json", result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

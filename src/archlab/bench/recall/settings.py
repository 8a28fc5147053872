"""The settings of an `archlab bench recall` grid: defaults, checks, resume, rerun command.

:class:`RecallSettings` is everything that defines a grid; it is stored in ``recall.json``
and an explicit flag given with ``--resume`` must agree with it. ``settings_from_flags``
runs every check that needs no training (a bad flag fails before the first run), and
``rerun_command`` is the command line that reproduces the grid. Running it is ``recall.py``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...models import registry
from .tasks import DEFAULT_VOCAB, TaskData, check_task
from .worker import RunSpec, model_config, resolve_device

# The default grid, sized to finish in 10-15 minutes on 2 idle CPU cores (measured with the five
# architectures of the registry; see README): every registered architecture, in registry order.
DEFAULT_ARCHITECTURES = tuple(registry.SPECS)
DEFAULT_D_MODELS = (32, 64)
DEFAULT_KV_PAIRS = (2, 4)
DEFAULT_SEQ_LEN = 32
DEFAULT_LEARNING_RATES = (3e-3,)
DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 32
DEFAULT_N_HEADS = 4
# Zoology's own grid (Arora et al. 2023, Figure 2), for `--zoology`-sized runs by flags.
ZOOLOGY_FLAGS = (
    "--d-models 64,128,256,512 --kv-pairs 4,8,16,32,64 --seq-len 256 --vocab-size 8192 "
    "--learning-rates 1e-4,4.6e-4,2.2e-3,1e-2 --steps 20000 --num-train 100000"
)

FLAG_NAMES = {
    "task": "--task",
    "architectures": "--architectures",
    "d_models": "--d-models",
    "kv_pairs": "--kv-pairs",
    "seq_len": "--seq-len",
    "learning_rates": "--learning-rates",
    "seeds": "--seeds",
    "seed": "--seed",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "vocab_size": "--vocab-size",
    "n_heads": "--n-heads",
    "num_train": "--num-train",
    "num_val": "--num-val",
    "num_test": "--num-test",
    "test_factor": "--test-factor",
    "power_a": "--power-a",
    "weight_decay": "--weight-decay",
    "use_rope": "--use-rope",
    "threads": "--threads",
    "device": "--device",
}


@dataclass
class RecallSettings:
    """Everything that defines a recall grid; stored in recall.json, checked on --resume."""

    task: str = "mqar"
    architectures: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHITECTURES))
    d_models: list[int] = field(default_factory=lambda: list(DEFAULT_D_MODELS))
    kv_pairs: list[int] = field(default_factory=lambda: list(DEFAULT_KV_PAIRS))
    seq_len: int = DEFAULT_SEQ_LEN
    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LEARNING_RATES))
    seeds: int = 1
    seed: int = 0
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    vocab_size: int = 0  # 0 -> the task's default (mqar 32, selective-copy 16)
    n_heads: int = DEFAULT_N_HEADS
    num_train: int = 20_000
    num_val: int = 500
    num_test: int = 1_000
    test_factor: int = 2
    power_a: float = 0.01
    weight_decay: float = 0.1
    use_rope: bool | None = None  # None: each architecture's default (learned positions)
    threads: int | None = None
    device: str = "cpu"

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecallSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def task_data(self, pairs: int, seq_len: int | None = None) -> TaskData:
        return TaskData(self.task, self.vocab_size, pairs, seq_len or self.seq_len, self.power_a)


def settings_from_flags(raw: dict[str, Any]) -> RecallSettings:
    """Defaults for what the user left unset, then every check that needs no training.

    ``raw`` holds explicit values (None = unset) keyed like RecallSettings; lists are parsed.
    """
    given = {k: v for k, v in raw.items() if v is not None}
    check_task(given.get("task", "mqar"))
    for key in (
        "seq_len",
        "seeds",
        "steps",
        "batch_size",
        "n_heads",
        "num_train",
        "num_val",
        "num_test",
        "test_factor",
        "threads",
        "vocab_size",
    ):
        if key in given and given[key] < 1:
            raise UserError(f"{FLAG_NAMES[key]}: must be >= 1 (got {given[key]})")
    if "weight_decay" in given and not (given["weight_decay"] >= 0):
        raise UserError(f"--weight-decay: must be >= 0 (got {given['weight_decay']})")
    s = RecallSettings(**given)
    resolve_device(s.device)
    if not s.vocab_size:
        s.vocab_size = DEFAULT_VOCAB[s.task]
    for d in s.d_models:
        if d % s.n_heads:
            raise UserError(
                f"--d-models: width {d} is not divisible by --n-heads {s.n_heads} "
                "(attention splits d_model into equal heads)"
            )
    for p in s.kv_pairs:
        s.task_data(p).config()  # too many pairs for the vocabulary, sequence too short
    for arch in s.architectures:  # every model must build at every width
        for d in s.d_models:
            model_config(run_spec(s, arch, d, s.kv_pairs[0], s.learning_rates[0], s.seed))
    return s


def run_spec(
    s: RecallSettings, arch: str, d_model: int, pairs: int, lr: float, seed: int
) -> RunSpec:
    return RunSpec(
        task=s.task,
        architecture=arch,
        d_model=d_model,
        pairs=pairs,
        learning_rate=lr,
        seed=seed,
        data_seed=s.seed,
        seq_len=s.seq_len,
        vocab_size=s.vocab_size,
        n_heads=s.n_heads,
        steps=s.steps,
        batch_size=s.batch_size,
        num_train=s.num_train,
        num_val=s.num_val,
        num_test=s.num_test,
        test_factor=s.test_factor,
        power_a=s.power_a,
        weight_decay=s.weight_decay,
        use_rope=s.use_rope,
        threads=s.threads,
        device=s.device,
    )


def rerun_command(s: RecallSettings, out_dir: Path) -> str:
    parts = [
        "archlab",
        "bench",
        "recall",
        "--task",
        s.task,
        "--architectures",
        ",".join(s.architectures),
        "--d-models",
        ",".join(map(str, s.d_models)),
        "--kv-pairs",
        ",".join(map(str, s.kv_pairs)),
        "--seq-len",
        str(s.seq_len),
        "--learning-rates",
        ",".join(f"{lr:g}" for lr in s.learning_rates),
        "--seeds",
        str(s.seeds),
        "--seed",
        str(s.seed),
        "--steps",
        str(s.steps),
        "--batch-size",
        str(s.batch_size),
        "--vocab-size",
        str(s.vocab_size),
        "--n-heads",
        str(s.n_heads),
        "--num-train",
        str(s.num_train),
        "--num-val",
        str(s.num_val),
        "--num-test",
        str(s.num_test),
        "--test-factor",
        str(s.test_factor),
    ]
    if s.task == "mqar":
        parts += ["--power-a", f"{s.power_a:g}"]
    parts += ["--weight-decay", f"{s.weight_decay:g}"]
    if s.use_rope is not None:
        parts.append("--use-rope" if s.use_rope else "--no-use-rope")
    if s.threads is not None:
        parts += ["--threads", str(s.threads)]
    parts += ["--device", s.device]
    parts += ["--out-dir", str(out_dir)]
    return shlex.join(parts)


def load_saved_settings(out_dir: Path) -> RecallSettings:
    path = out_dir / "recall.json"
    if not path.exists():
        raise UserError(
            f"--resume: {out_dir} is not an archlab bench recall folder (no recall.json)"
        )
    try:
        return RecallSettings.from_dict(json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: cannot read {path} ({exc})") from None


def check_resume_flags(saved: RecallSettings, raw: dict[str, Any]) -> None:
    """Explicit flags given with --resume must agree with the saved grid."""
    for key, value in raw.items():
        if value is None:
            continue
        if getattr(saved, key) != value:
            raise UserError(
                f"--resume: {FLAG_NAMES[key]} {value} differs from this grid's "
                f"{getattr(saved, key)} (recall.json); drop the flag or use a new --out-dir"
            )

"""What a finished comparison writes: each run read back, the table, the plots and the files.

``collect_run`` reads one run folder with what the data's references add (bits per byte,
whether it learned); ``write_outputs`` aggregates the runs over seeds (and the learning-rate
grid), picks the winners and writes report.md, results.json, results.csv and the loss plots.
The numbers come from bench/common/results.py and the text from report.py; this module only
puts a comparison's pieces together, so the orchestration (loop.py) stays a loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.reference import Reference
from ..common.results import RunResult, aggregate, best_points, read_run
from .plan import RunSpec
from .settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUDGET_CHECK,
    DEFAULT_MAX_TOKENS,
    DEFAULT_RECIPE,
    DEFAULT_SEQ_LEN,
    CompareSettings,
    format_learning_rates,
)


def data_summary(data_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The data's identity in results.json and report.md (path, source, tokenizer, hash)."""
    keys = (
        "source",
        "source_spec",
        "tokenizer",
        "vocab_size",
        "train_tokens",
        "val_tokens",
        "train_docs",
        "val_docs",
        "entropy_floor",
        "task",
        "hash",
    )
    return {"path": str(data_dir), **{k: meta.get(k) for k in keys if k in meta}}


def protocol_notes(s: CompareSettings, meta: dict[str, Any]) -> list[str]:
    """The protocol in words, one bullet of report.md each: what was held equal."""
    budget = (
        f"{s.max_tokens:,} training tokens"
        if s.max_tokens is not None
        else f"{s.num_epochs} epochs x {s.steps_per_epoch} steps"
    )
    floor = meta.get("entropy_floor")
    return [
        f"Recipe: {recipe_summary(s)}.",
        f"Architectures: {', '.join(s.architectures)} at --model-size {s.model_size}, each in "
        "its own process (its peak memory is its own).",
        f"Data: {s.data} ({meta.get('source', '?')}, {meta.get('tokenizer')} tokenizer, "
        f"vocabulary {meta.get('vocab_size')}), prepared once and read by every run"
        + (f"; entropy floor {floor:.4f} nats/token" if floor is not None else "")
        + ".",
        f"Budget: {budget} = {s.total_steps} optimizer steps of {s.tokens_per_step:,} tokens "
        f"(batch {s.batch_size} x accumulation {s.gradient_accumulation_steps} x seq-len "
        f"{s.seq_len}).",
        "Optimizer: AdamW (the trainer's defaults: weight decay 0.1 on matrices, betas 0.9/0.95,"
        " gradient clipping 1.0), "
        + (
            f"peak learning rates {format_learning_rates(s.grid)} (every architecture at every "
            "rate, same seeds; each row shows the architecture at its best rate)"
            if s.sweep
            else f"peak learning rate {s.learning_rate:g} (--learning-rate)"
            if s.learning_rate is not None
            else "peak learning rates from the shipped table (src/archlab/train/lr_table.json): "
            + "; ".join(
                f"{a} {s.rate_of(a):g} ({(s.rate_sources or {}).get(a, 'table')})"
                for a in s.architectures
            )
        )
        + f", {s.warmup_steps} linear warmup steps then cosine decay to 10%.",
        f"Seeds: {', '.join(map(str, s.seed_list))}; validation on the same fixed "
        f"{s.eval_steps} batches every {s.eval_interval} steps and at the end.",
        f"Optimizations: amp {s.use_amp}, compile {s.use_compile}, gradient checkpointing "
        f"{s.use_gradient_checkpointing}; device {s.device}; torch threads per run: "
        + (str(s.num_threads) if s.num_threads else "torch's default (see Machine)")
        + ".",
        "How far the ranking holds: " + ranking_scope(s, meta),
    ]


def ranking_scope(s: CompareSettings, meta: dict[str, Any]) -> str:
    """What is known of this ranking at other budgets: the default protocol (table rates
    included) was checked against 4x its tokens; any other was not."""
    default = (
        s.max_tokens == DEFAULT_MAX_TOKENS
        and s.model_size == "nano"
        and s.seq_len == DEFAULT_SEQ_LEN
        and s.batch_size == DEFAULT_BATCH_SIZE
        and s.gradient_accumulation_steps == 1
        and s.recipe == DEFAULT_RECIPE
        and s.learning_rate is None
        and not s.sweep
        and meta.get("source") == "stories"
    )
    if default:
        return DEFAULT_BUDGET_CHECK
    return (
        "not checked at other budgets for this protocol (rankings at one budget can change "
        "with more tokens: rerun with a larger --max-tokens, or use archlab scale)."
    )


def recipe_summary(s: CompareSettings) -> str:
    """The recipe in words, with the explicit flags that override it."""
    from ...recipes import RECIPE_DESCRIPTIONS

    flags = [
        ("--" if v else "--no-") + key.replace("_", "-")
        for key, v in (("use_rope", s.use_rope), ("use_rmsnorm", s.use_rmsnorm))
        if v is not None
    ]
    text = f"{s.recipe} ({RECIPE_DESCRIPTIONS[s.recipe]})"
    return text + (f", overridden by {' '.join(flags)}" if flags else "")


@dataclass
class CompareOutcome:
    """What `archlab compare` prints and exits with, after the files are written."""

    out_dir: Path
    runs: list[RunResult]
    archs: list[Any]
    winners: list[Any]
    table: str
    nothing_to_do: bool = False
    header: str = ""  # the baselines line printed above the table
    unigram: float | None = None  # the unigram baseline the table's notes name

    @property
    def exit_code(self) -> int:
        if self.nothing_to_do:
            return 0
        return 0 if any(r.ok for r in self.runs) else 1


def collect_run(
    spec: RunSpec,
    reference: Reference,
    returncode: int | None = None,
    stderr_tail: str | None = None,
) -> RunResult:
    """A run folder read back, with what the references add: its rate, bits per byte and
    whether it learned (final val loss below the unigram baseline)."""
    res = read_run(
        spec.run_dir,
        spec.architecture,
        spec.seed,
        returncode,
        stderr_tail,
        reference.entropy_floor,
    )
    if spec.learning_rate is not None:
        res.learning_rate = spec.learning_rate
    if res.ok:
        res.bits_per_byte = reference.bits_per_byte(res.final_val_loss)
        res.learned = reference.learned(res.final_val_loss)
    return res


def write_outputs(
    s: CompareSettings,
    out_dir: Path,
    runs: list[RunResult],
    meta: dict[str, Any],
    hardware: dict[str, Any],
    command: str,
    child_commands: dict[str, str],
    reference: Reference | None = None,
) -> CompareOutcome:
    """Aggregate ``runs``, write every output file into ``out_dir`` and return the outcome.

    ``child_commands``: run name -> the `archlab train` line that reproduces it (report.md)."""
    from ..common import plots
    from . import report

    reference = reference or Reference(entropy_floor=meta.get("entropy_floor"))
    points = aggregate(runs, s.architectures, s.grid if s.sweep else None)
    archs = best_points(points, s.architectures)
    wins = report.winners(archs)
    table = report.markdown_table(archs, reference.unigram_entropy)
    data_meta = data_summary(Path(s.data), meta)
    settings = s.to_dict() | {"total_steps": s.total_steps, "tokens_per_step": s.tokens_per_step}
    # the curves: each architecture at its (best) rate
    by_arch = {a.architecture: a.runs for a in archs}
    title = f"{', '.join(s.architectures)} at {s.model_size}"
    lines = reference_lines(reference)
    for x, name in (("tokens", "loss_vs_tokens.png"), ("time", "loss_vs_time.png")):
        fig = plots.loss_figure(
            by_arch,
            x=x,
            title=f"validation loss vs {x}: {title}" + (" (best rate each)" if s.sweep else ""),
            references=lines,
        )
        plots.save_figure(fig, out_dir / name)
    flops_points = {
        arch: [(r.train_flops, r.final_val_loss) for a in archs if a.architecture == arch
               for p in (a.grid or [a]) for r in p.ok_runs]
        for arch in s.architectures
    }  # fmt: skip
    fig = plots.loss_vs_flops_figure(
        flops_points,
        title=f"final validation loss vs training FLOPs: {title} (one point per run)",
        references=lines,
    )
    plots.save_figure(fig, out_dir / "loss_vs_flops.png")
    plot_list = [
        ("loss_vs_tokens.png", "validation loss vs training tokens"),
        ("loss_vs_time.png", "validation loss vs wall time"),
        ("loss_vs_flops.png", "final validation loss vs training FLOPs, Pareto frontier dotted"),
    ]
    if s.sweep:
        fig = plots.lr_sweep_figure(
            {a.architecture: a.grid for a in archs},
            title=f"final validation loss vs learning rate: {title}",
            references=lines,
        )
        plots.save_figure(fig, out_dir / "loss_vs_lr.png")
        plot_list.append(("loss_vs_lr.png", "final validation loss vs learning rate"))
    report.write_results_json(
        out_dir / "results.json",
        archs,
        runs,
        wins,
        settings,
        hardware,
        data_meta,
        command,
        reference,
    )
    report.write_results_csv(out_dir / "results.csv", runs)
    md = report.report_markdown(
        title=f"archlab compare: {title}",
        archs=archs,
        wins=wins,
        settings=settings,
        hardware=hardware,
        data_meta=data_meta,
        command=command,
        child_commands=child_commands,
        plots=plot_list,
        protocol_notes=protocol_notes(s, meta),
        reference=reference,
    )
    report.write_report(out_dir / "report.md", md)
    return CompareOutcome(
        out_dir, runs, archs, wins, table, header=reference.header_line(),
        unigram=reference.unigram_entropy,
    )  # fmt: skip


def reference_lines(reference: Reference) -> list[tuple[str, float]]:
    """(label, nats/token) of the horizontal reference lines in every loss plot."""
    out = []
    for key, label in (
        ("unigram_entropy", "unigram"),
        ("bigram_entropy", "bigram"),
        ("entropy_floor", "entropy floor"),
    ):
        v = getattr(reference, key)
        if v is not None:
            out.append((label, v))
    return out

"""The learning-rate table: lookups, derived rates and their labels, bad files, sweep rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from archlab.errors import UserError
from archlab.train.lr_table import (
    SweepEntryError,
    entry_from_runs,
    load_table,
    rate_for_width,
    table_learning_rate,
)

GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def _entry(arch="dense", recipe="modern", size="nano", d_model=128, best=3e-3, **kw):
    losses = {repr(r): {"0": 5.0 - (r == best), "1": 5.1 - (r == best)} for r in GRID}
    row = dict(
        recipe=recipe,
        architecture=arch,
        size=size,
        d_model=d_model,
        rate=best,
        grid=GRID,
        seeds=[0, 1],
        losses=losses,
        command="python scripts/sweep_learning_rates.py --architectures dense",
    )
    row.update(kw)
    return row


def _table(tmp_path: Path, *entries, name="t.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"entries": list(entries)}))
    return path


def test_swept_lookup_and_alias(tmp_path):
    path = _table(tmp_path, _entry())
    choice = table_learning_rate("transformer", "nano", "modern", path)  # alias of dense
    assert choice.rate == 3e-3
    assert choice.kind == "swept"
    assert choice.source == "swept at nano (modern recipe; grid 5 rates 0.0003..0.03, 2 seeds)"


def test_the_label_says_when_later_seeds_ran_only_at_the_best_rates(tmp_path):
    """A screened sweep (seed 1 only at the best rates of seed 0) must not read as a full
    two-seed grid."""
    entry = _entry()
    for r in (3e-4, 3e-2):
        del entry["losses"][repr(r)]["1"]
    choice = table_learning_rate("dense", "nano", "modern", _table(tmp_path, entry))
    assert choice.rate == 3e-3
    assert choice.source == (
        "swept at nano (modern recipe; grid 5 rates 0.0003..0.03, 2 seeds at 3 of them)"
    )


def test_derived_rate_is_inverse_in_width_and_labelled(tmp_path):
    path = _table(tmp_path, _entry())
    micro = table_learning_rate("dense", "micro", "modern", path)  # d_model 256
    assert micro.rate == pytest.approx(1.5e-3)
    assert micro.kind == "derived"
    assert micro.source.startswith("derived: nano rate 0.003 x d_model 128 / 256 (muP-style")
    tiny = table_learning_rate("dense", "tiny", "modern", path)  # d_model 768
    assert tiny.rate == pytest.approx(3e-3 * 128 / 768)
    between = rate_for_width("dense", "modern", 192, path)
    assert between.rate == pytest.approx(2e-3)
    narrow = rate_for_width("dense", "modern", 32, path)  # not extrapolated upwards
    assert narrow.rate == 3e-3 and narrow.kind == "derived" and "unchanged" in narrow.source
    assert rate_for_width("dense", "modern", 128, path).kind == "swept"


def test_narrower_widths_may_take_the_inverse_rule_capped_at_the_grid(tmp_path):
    """`archlab scale`'s narrow rungs: 1/width below the narrowest swept width too, never
    above the largest rate the sweep ran (grid 3e-4..3e-2 here)."""
    path = _table(tmp_path, _entry())
    d32 = rate_for_width("dense", "modern", 32, path, narrower="inverse")
    assert d32.rate == pytest.approx(1.2e-2) and d32.kind == "derived"
    assert "x d_model 128 / 32" in d32.source and "capped" not in d32.source
    d8 = rate_for_width("dense", "modern", 8, path, narrower="inverse")  # 4.8e-2 > 3e-2
    assert d8.rate == pytest.approx(3e-2) and "capped at its grid's largest 0.03" in d8.source
    assert rate_for_width("dense", "modern", 256, path, narrower="inverse").rate == 1.5e-3


def test_nearest_swept_width_below_is_the_reference(tmp_path):
    path = _table(tmp_path, _entry(), _entry(size="micro", d_model=256, best=1e-3))
    assert table_learning_rate("dense", "micro", "modern", path).rate == 1e-3
    tiny = table_learning_rate("dense", "tiny", "modern", path)
    assert tiny.rate == pytest.approx(1e-3 * 256 / 768)
    assert "micro rate 0.001" in tiny.source


def test_missing_architecture_or_recipe_is_one_line_naming_the_sweep(tmp_path):
    path = _table(tmp_path, _entry())
    with pytest.raises(UserError) as err:
        table_learning_rate("mamba", "nano", "modern", path)
    msg = str(err.value)
    assert "no swept entry for mamba (modern recipe)" in msg and "\n" not in msg
    assert "sweep_learning_rates.py --architectures mamba" in msg
    # the other recipe's rate transfers, labelled, until its own sweep is in
    classic = table_learning_rate("dense", "nano", "classic", path)
    assert classic.rate == 3e-3 and classic.kind == "derived"
    assert classic.source.startswith(
        "derived: the modern recipe's rate (no classic sweep of dense yet); swept at nano"
    )
    micro = table_learning_rate("dense", "micro", "classic", path)
    assert micro.rate == pytest.approx(1.5e-3) and micro.kind == "derived"
    with pytest.raises(UserError, match="--recipe: unknown recipe 'fancy'"):
        table_learning_rate("dense", "nano", "fancy", path)


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "cannot be read"),
        ('{"rows": []}', "cannot be read"),
        ('{"entries": {}}', "cannot be read"),
        ('{"entries": [{"recipe": "modern"}]}', "entry 0 is malformed"),
    ],
)
def test_corrupt_table_is_one_line(tmp_path, text, why):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_table(path)
    assert str(err.value).startswith(f"learning-rate table {path}: {why}")
    assert "\n" not in str(err.value)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="learning-rate table .*gone.json: not found"):
        load_table(tmp_path / "gone.json")


def test_inconsistent_entries_are_refused(tmp_path):
    not_best = _entry(rate=1e-3)  # the losses say 3e-3
    with pytest.raises(UserError, match="rate 0.001 is not its sweep's best \\(0.003\\)"):
        load_table(_table(tmp_path, not_best, name="a.json"))
    off_grid = _entry(rate=2e-3)
    with pytest.raises(UserError, match="must be one of its grid"):
        load_table(_table(tmp_path, off_grid, name="b.json"))
    with pytest.raises(UserError, match="repeats \\(modern, dense, nano\\)"):
        load_table(_table(tmp_path, _entry(), _entry(), name="c.json"))


def _runs(losses: dict[float, list[float | None]]) -> list[dict]:
    out = []
    for rate, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            failed = loss is None or not math.isfinite(loss)
            out.append(
                dict(
                    learning_rate=rate,
                    seed=seed,
                    status="failed" if loss is None else "ok",
                    final_val_loss=None if failed and loss is None else loss,
                )
            )
    return out


def test_a_rate_with_a_failed_seed_is_never_chosen():
    runs = _runs({1e-3: [3.0, 3.1], 3e-3: [2.5, 2.6], 1e-2: [1.0, None], 3e-2: [4.0, 4.1]})
    row = entry_from_runs("modern", "dense", "nano", 128, runs, "cmd")
    assert row["rate"] == 3e-3  # 1e-2's surviving seed is the best single loss
    assert row["losses"][repr(1e-2)] == {"0": 1.0, "1": None}
    nan = _runs({1e-3: [3.0, 3.1], 3e-3: [2.5, float("nan")], 1e-2: [2.6, 2.7], 3e-2: [4, 4]})
    assert entry_from_runs("modern", "dense", "nano", 128, nan, "cmd")["rate"] == 1e-2


def test_a_best_rate_at_the_edge_or_all_failed_gives_no_row():
    edge = _runs({1e-3: [3.0, 3.1], 3e-3: [2.5, 2.6], 1e-2: [2.0, 2.1]})
    with pytest.raises(SweepEntryError, match="best rate 0.01 is at the grid's edge"):
        entry_from_runs("modern", "dense", "nano", 128, edge, "cmd")
    dead = _runs({1e-3: [None, 3.0], 3e-3: [2.0, None]})
    with pytest.raises(SweepEntryError, match="no rate ran with every seed without a failure"):
        entry_from_runs("modern", "dense", "nano", 128, dead, "cmd")


def test_a_rate_screened_with_one_seed_is_not_chosen(tmp_path):
    # the second seed ran only at the promising rates: 3e-4's single seed cannot win
    runs = _runs({3e-4: [1.0], 1e-3: [3.0, 3.1], 3e-3: [2.5, 2.6], 1e-2: [2.7, 2.8]})
    row = entry_from_runs("modern", "dense", "nano", 128, runs, "cmd")
    assert row["rate"] == 3e-3 and row["seeds"] == [0, 1]
    assert row["losses"][repr(3e-4)] == {"0": 1.0}
    assert table_learning_rate("dense", "nano", "modern", _table(tmp_path, row)).rate == 3e-3


def test_a_row_written_by_the_sweep_reads_back(tmp_path):
    runs = _runs({1e-3: [3.0, 3.1], 3e-3: [2.5, 2.6], 1e-2: [2.7, 2.8]})
    row = entry_from_runs("classic", "moe", "nano", 128, runs, "cmd")
    path = _table(tmp_path, row)
    assert table_learning_rate("moe", "nano", "classic", path).rate == 3e-3


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_bad_table_stops_the_commands_with_one_line(command, tmp_path, monkeypatch, capsys):
    from archlab.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    monkeypatch.setenv("ARCHLAB_LR_TABLE", str(bad))
    out = tmp_path / "out"
    assert main([command, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"learning-rate table {bad}: cannot be read" in err
    assert not out.exists()
    # a table without the architecture's row: one line naming the sweep to run
    monkeypatch.setenv("ARCHLAB_LR_TABLE", str(_table(tmp_path, _entry(arch="moe"))))
    assert main([command, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no swept entry for dense" in err
    assert not out.exists()


def test_every_registered_architecture_has_a_shipped_rate_at_every_size_and_recipe():
    """The shipped table (lr_table.json): every architecture of the registry has a swept row
    (some recipe, some size), so every (architecture, size, recipe) has a rate, labelled swept
    or derived; no swept row's best rate sits at the edge of its grid."""
    from archlab.config import MODEL_SIZES
    from archlab.models import registry
    from archlab.recipes import RECIPES
    from archlab.train.lr_table import TABLE_PATH

    table = load_table(TABLE_PATH)
    swept = {arch for (_, arch, _) in table}
    missing = [arch for arch in registry.SPECS if arch not in swept]
    assert not missing, (
        f"lr_table.json has no swept row for {', '.join(missing)} (rows (modern|classic, ARCH, "
        "nano)); add them with: python scripts/sweep_learning_rates.py --architectures "
        f"{','.join(missing)} --recipes modern,classic --screen 2"
    )
    edge = [key for key, e in table.items() if e.at_edge]
    assert not edge, f"swept rows whose best rate is at the edge of their grid: {edge}"
    for arch in registry.SPECS:
        for recipe in RECIPES:
            for size in MODEL_SIZES:
                choice = table_learning_rate(arch, size, recipe, TABLE_PATH)
                assert 1e-5 < choice.rate < 1.0, (arch, size, recipe, choice)
                assert choice.kind in ("swept", "derived")
                prefix = "swept at " if choice.kind == "swept" else "derived: "
                assert choice.source.startswith(prefix), choice
                if (recipe, arch, size) in table:
                    assert choice.kind == "swept" and choice.rate == table[recipe, arch, size].rate


# ---- the width rule's check (rule_checks) ------------------------------------------------------
def _check(arch="dense", derived=1.5e-3, losses=(2.0, 1.9, 2.1), size="micro"):
    rates = (derived / 3, derived, derived * 3)
    return dict(
        recipe="modern",
        architecture=arch,
        size=size,
        derived_rate=derived,
        seed=0,
        losses={repr(r): v for r, v in zip(rates, losses, strict=True)},
        command="python scripts/check_lr_rule.py --architectures dense",
    )


@pytest.mark.parametrize(
    ("losses", "passed", "phrase"),
    [
        ((2.0, 1.9, 2.1), True, "the derived rate was the best of"),
        ((1.87, 1.9, 2.1), True, "ended 0.030 nats above the best, 0.0005 (within 0.05"),
        ((2.0, 1.9, 1.8), False, "ended 0.100 nats above the best, 0.0045 (MISSED: more than"),
        ((2.0, None, 2.1), False, "failed to run at the derived rate"),
    ],
)
def test_a_rule_check_passes_within_the_tolerance_and_its_label_says_how(
    tmp_path, losses, passed, phrase
):
    from archlab.train.lr_table import load_rule_checks

    doc = {"entries": [_entry()], "rule_checks": [_check(losses=losses)]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    check = load_rule_checks(path)["modern", "dense", "micro"]
    assert check.passed is passed
    assert phrase in check.verdict()
    choice = table_learning_rate("dense", "micro", "modern", path)
    assert choice.kind == "derived" and choice.rate == pytest.approx(1.5e-3)
    assert choice.source.startswith("derived: nano rate 0.003 x d_model 128 / 256")
    assert choice.source.endswith(check.verdict())


def test_a_check_of_another_rate_is_not_quoted_and_a_bad_check_is_one_line(tmp_path):
    doc = {"entries": [_entry()], "rule_checks": [_check(derived=1e-3)]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    assert "rule checked" not in table_learning_rate("dense", "micro", "modern", path).source
    bad = _check()
    del bad["derived_rate"]
    path.write_text(json.dumps({"entries": [_entry()], "rule_checks": [bad]}))
    with pytest.raises(UserError, match="rule check 0 is malformed"):
        table_learning_rate("dense", "micro", "modern", path)


def test_the_shipped_rule_checks_cover_micro_and_no_failed_rule_is_shipped():
    """Issue #24: the width rule is checked at micro (modern recipe, 3 rates, 1 seed) for every
    architecture of the default comparison. A derived rate whose check missed is never what
    `compare` uses: that size must have its own sweep."""
    from archlab.bench.common.options import parse_architectures
    from archlab.train.lr_table import TABLE_PATH, load_rule_checks

    checks = load_rule_checks(TABLE_PATH)
    table = load_table(TABLE_PATH)
    for arch in parse_architectures(None):  # compare's default list
        check = checks.get(("modern", arch, "micro"))
        assert check is not None, f"no rule check of {arch} at micro"
        assert len(check.losses) == 3 and check.best() is not None
        choice = table_learning_rate(arch, "micro", "modern", TABLE_PATH)
        if check.passed:
            assert ("modern", arch, "micro") in table or check.verdict() in choice.source
        else:
            assert choice.kind == "swept", f"{arch}: a derived rate whose rule check missed"

"""Learning-rate schedules: cosine and warmup-stable-decay values, and what a resume with a
changed budget does under each (WSD extends exactly from before its decay; cosine does not)."""

from __future__ import annotations

import pytest
import torch

from archlab.cli import main
from archlab.train import checkpoint as ck
from archlab.train.metrics import read_metrics
from archlab.train.optim import (
    WarmupCosineSchedule,
    WarmupStableDecaySchedule,
    make_schedule,
    resume_note,
    schedule_from_state,
)

SMALL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64"]


@pytest.fixture
def char_data(stories_chars_300):
    return stories_chars_300


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor() -> None:
    s = WarmupStableDecaySchedule(1.0, 2, 20, min_lr_ratio=0.1, decay_fraction=0.25)
    assert s.decay_start == 15  # the last round(0.25 * 20) = 5 steps decay
    rates = [s.lr_at(i) for i in range(20)]
    assert rates[:2] == [0.5, 1.0]
    assert rates[2:15] == [1.0] * 13
    assert rates[15:] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])
    assert rates[-1] == pytest.approx(0.1)


def test_wsd_rates_before_the_decay_do_not_depend_on_the_budget() -> None:
    short, long = (WarmupStableDecaySchedule(3e-3, 5, n) for n in (100, 1000))
    assert [short.lr_at(i) for i in range(80)] == [long.lr_at(i) for i in range(80)]
    cos_short, cos_long = (WarmupCosineSchedule(3e-3, 5, n) for n in (100, 1000))
    assert cos_short.lr_at(50) != cos_long.lr_at(50)  # a cosine's every step depends on n


def test_state_dict_round_trips_and_old_checkpoints_read_as_cosine() -> None:
    for name in ("cosine", "wsd"):
        s = make_schedule(name, 1e-3, 3, 50, 0.1, 0.3)
        assert schedule_from_state(s.state_dict()) == s
    old = {"learning_rate": 1e-3, "warmup_steps": 3, "total_steps": 50, "min_lr_ratio": 0.1}
    assert schedule_from_state(old) == WarmupCosineSchedule(1e-3, 3, 50, 0.1)


def test_resume_note_says_what_happens_to_the_rate() -> None:
    wsd8, wsd12 = (WarmupStableDecaySchedule(1e-2, 2, n, decay_fraction=0.25) for n in (8, 12))
    assert resume_note(wsd8.state_dict(), wsd8, 4) is None  # same budget: nothing to say
    stable = resume_note(wsd8.state_dict(), wsd12, 4)
    assert "continues as an uninterrupted 12-step run would" in stable
    assert "decay from step 10 to 12" in stable
    late = resume_note(wsd8.state_dict(), wsd12, 8)  # after the 8-step run's decay
    assert "inside the 8-step run's decay (from step 7)" in late and "0.001 to 0.01" in late
    cos8, cos12 = (WarmupCosineSchedule(1e-2, 2, n) for n in (8, 12))
    note = resume_note(cos8.state_dict(), cos12, 4)
    assert "re-stretched" in note and f"{cos12.lr_at(4):.3g}" in note
    assert f"{cos8.lr_at(4):.3g}" in note and "not the same" in note


def _train(*args) -> int:
    return main(["train", *map(str, args), "--num-threads", "1"])


def _losses(run) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run) if r["kind"] == "train"]


def _common(data) -> list[str]:
    return [*SMALL, "--data", str(data), "--seq-len", "32", "--batch-size", "4",
            "--log-interval", "1", "--eval-interval", "0", "--learning-rate", "1e-2",
            "--warmup-steps", "2", "--checkpoint-interval", "4", "--dropout", "0.1",
            "--seed", "5", "--schedule", "wsd", "--decay-fraction", "0.25"]  # fmt: skip


def test_wsd_resume_to_the_same_budget_is_bit_exact(tmp_path, char_data) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(*_common(char_data), "--steps-per-epoch", "10", "--out-dir", full) == 0
    assert _train(*_common(char_data), "--steps-per-epoch", "10", "--out-dir", part) == 0
    assert _train("--resume", part / "checkpoints" / "step_0000004") == 0
    assert _losses(part) == _losses(full) and len(_losses(full)) == 10


def test_wsd_resume_to_a_larger_budget_equals_the_uninterrupted_larger_run(
    tmp_path, char_data, capsys
) -> None:
    """An 8-step run checkpointed at step 4 (before its decay, which starts at step 7),
    resumed with a 12-step budget: every loss and rate equals the 12-step run's."""
    big, small = tmp_path / "big", tmp_path / "small"
    assert _train(*_common(char_data), "--steps-per-epoch", "12", "--out-dir", big) == 0
    assert _train(*_common(char_data), "--steps-per-epoch", "8", "--out-dir", small) == 0
    assert _losses(small)[6][2] < 1e-2  # the 8-step run had decayed by its step 7
    capsys.readouterr()
    ckpt = small / "checkpoints" / "step_0000004"
    assert _train("--resume", ckpt, "--steps-per-epoch", "12") == 0
    assert "continues as an uninterrupted 12-step run would" in capsys.readouterr().err
    got, want = _losses(small), _losses(big)
    assert [s for s, _, _ in got] == list(range(1, 13))
    assert got == want  # losses and rates, bit for bit
    a = torch.load(ck.latest_checkpoint(big) / "trainer_state.pt", weights_only=True)
    b = torch.load(ck.latest_checkpoint(small) / "trainer_state.pt", weights_only=True)
    assert a["schedule"] == b["schedule"] and a["schedule"]["total_steps"] == 12


def test_cosine_resume_to_a_larger_budget_says_it_re_stretches(tmp_path, char_data, capsys):
    common = [c for c in _common(char_data) if c not in ("wsd", "--schedule")]
    run = tmp_path / "run"
    assert _train(*common, "--steps-per-epoch", "8", "--out-dir", run) == 0
    capsys.readouterr()
    assert _train("--resume", run / "checkpoints" / "step_0000004", "--steps-per-epoch", "12") == 0
    err = capsys.readouterr().err
    assert "cosine is re-stretched" in err and "from 8 to 12 steps at step 4" in err


def test_schedule_flags_are_checked(tmp_path, char_data, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _train(*SMALL, "--data", char_data, "--schedule", "linear", "--out-dir", tmp_path / "a")
    assert exc.value.code == 2
    rc = _train(*SMALL, "--data", char_data, "--decay-fraction", "0", "--out-dir", tmp_path / "b")
    assert rc == 2 and "--decay-fraction" in capsys.readouterr().err

"""Training engine pieces in isolation: schedule, decay groups, config, flags, checkpoints, FLOPs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from archlab import build_model, preset_config
from archlab.cli import build_parser
from archlab.config import ConfigError
from archlab.errors import UserError
from archlab.train import checkpoint as ck
from archlab.train.config import TrainConfig
from archlab.train.flops import flops_per_token
from archlab.train.metrics import MetricsWriter, read_metrics
from archlab.train.optim import WarmupCosineSchedule, build_optimizer, parameter_groups


# ---- schedule ------------------------------------------------------------------------------
def test_schedule_warmup_then_cosine_to_floor():
    s = WarmupCosineSchedule(1e-3, warmup_steps=10, total_steps=111, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(4) == pytest.approx(5e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)  # warmup ends at the peak
    assert s.lr_at(10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert s.lr_at(60) == pytest.approx(0.55e-3)  # half way: mean of peak and floor
    assert s.lr_at(110) == pytest.approx(1e-4)  # the last step reaches the floor
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))  # monotone decay


def test_schedule_without_warmup_and_tiny_runs():
    s = WarmupCosineSchedule(2e-3, warmup_steps=0, total_steps=5, min_lr_ratio=0.0)
    assert s.lr_at(0) == pytest.approx(2e-3) and s.lr_at(4) == pytest.approx(0.0)
    one = WarmupCosineSchedule(2e-3, warmup_steps=0, total_steps=1)
    assert one.lr_at(0) == pytest.approx(2e-3)


# ---- weight decay groups ---------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_decay_only_on_weight_matrices(tied):
    cfg = preset_config("dense", "nano", vocab_size=101, n_layers=2, tie_weights=tied, bias=True)
    model = build_model(cfg)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    kept = {by_id[id(p)] for p in no_decay["params"]}
    assert not decayed & kept
    assert decayed | kept == set(by_id.values())  # every parameter exactly once
    assert "tok_emb.weight" in kept and "pos_emb.weight" in kept  # embeddings never decay
    assert all(n.endswith(".bias") or "norm" in n or "emb" in n for n in kept)
    assert "blocks.0.mixer.qkv.weight" in decayed and "blocks.1.ffn.fc.weight" in decayed
    assert ("head.weight" in decayed) == (not tied)  # an untied head is a weight matrix


def test_no_weight_decay_marker_is_honoured():
    lin = nn.Linear(4, 4)
    lin.weight._no_weight_decay = True  # type: ignore[attr-defined]
    decay, no_decay = parameter_groups(nn.Sequential(lin), 0.1)
    assert decay["params"] == [] and len(no_decay["params"]) == 2


def test_optimizer_decays_matrices_but_not_norms():
    """With zero gradients AdamW only applies decay: matrices shrink, norms/embeddings don't."""
    cfg = preset_config("dense", "nano", vocab_size=50, n_layers=1, d_model=32, n_heads=2, d_ff=64)
    model = build_model(cfg)
    opt = build_optimizer(model, 0.1, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    w = "blocks.0.ffn.fc.weight"
    assert torch.allclose(after[w], before[w] * (1 - 0.1 * 0.5))
    for n in ("tok_emb.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias"):
        assert torch.equal(after[n], before[n])


# ---- TrainConfig ----------------------------------------------------------------------------
def test_token_budget_sets_the_step_count():
    cfg = TrainConfig(batch_size=4, gradient_accumulation_steps=2, max_tokens=10_000)
    assert cfg.tokens_per_step(64) == 512
    assert cfg.total_steps(64) == math.ceil(10_000 / 512) == 20
    assert cfg.total_steps(64, world_size=2) == math.ceil(10_000 / 1024)
    assert TrainConfig(num_epochs=3, steps_per_epoch=7).total_steps(64) == 21


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(batch_size=0), "--batch-size"),
        (dict(stage="pretrain"), "--stage"),
        (dict(device="tpu"), "--device"),
        (dict(learning_rate=-1.0), "--learning-rate"),
        (dict(max_tokens=0), "--max-tokens"),
        (dict(grad_clip=-1.0), "--grad-clip"),
        (dict(max_nan_steps=0), "--max-nan-steps"),
    ],
)
def test_train_config_errors_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**kw).validate()


# ---- flags -----------------------------------------------------------------------------------
SEED_COMMANDS = [
    f"--architecture {arch} --stage language --model-size tiny --batch-size 8 "
    "--gradient-accumulation-steps 4 --num-epochs 1 --steps-per-epoch 100 --learning-rate 3e-4 "
    "--warmup-steps 10 --use-amp --use-compile --use-rmsnorm --use-rope "
    "--use-gradient-checkpointing " + extra
    for arch, extra in [
        ("dense", ""),
        ("mamba", "--state-size 16 --conv-size 4"),
        ("moe", "--num-experts 8 --expert-capacity 2"),
        ("hybrid", "--state-size 16 --hybrid-local-window 128"),
    ]
]


@pytest.mark.parametrize("line", SEED_COMMANDS, ids=["dense", "mamba", "moe", "hybrid"])
def test_seed_commands_parse(line):
    from archlab.commands.train import build_configs

    args = build_parser().parse_args(["train", *line.split()])
    cfg, spec, explicit = build_configs(args)
    assert cfg.stage == "language" and cfg.batch_size == 8 and cfg.num_epochs == 1
    assert cfg.steps_per_epoch == 100 and cfg.gradient_accumulation_steps == 4
    assert cfg.use_amp and cfg.use_compile and cfg.use_gradient_checkpointing
    assert spec.model_size == "tiny" and spec.overrides["use_rope"] is True
    assert spec.overrides["use_rmsnorm"] is True
    assert {"batch_size", "use_amp", "learning_rate"} <= explicit
    model_cfg = spec.build(data_vocab=32000)
    assert model_cfg.architecture == spec.architecture and model_cfg.use_rope
    if spec.architecture == "moe":
        assert model_cfg.num_experts == 8 and model_cfg.top_k == 2
    if spec.architecture == "hybrid":
        assert model_cfg.local_window == 128


def test_bad_flag_values_exit_2(capsys):
    from archlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "pretrain"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--batch-size", "x"])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_max_tokens_accepts_suffixes():
    from archlab.commands.train import parse_count

    assert parse_count("2M") == 2_000_000
    assert parse_count("1.5k") == 1500
    assert parse_count("2e6") == 2_000_000
    assert parse_count("2_000") == 2000
    args = build_parser().parse_args(["train", "--max-tokens", "3M"])
    assert args.max_tokens == 3_000_000


def test_config_file_fills_unset_values_and_flags_win(tmp_path):
    from archlab.commands.train import apply_config_file, build_configs, train_parser

    path = tmp_path / "run.yaml"
    path.write_text(
        "architecture: moe\nbatch-size: 16\nlearning_rate: 1e-3\nuse-amp: true\n"
        "num_experts: 4\nhybrid-local-window: 64\nmax_tokens: 2M\nmin_lr_ratio: 0.0\n"
    )
    args = build_parser().parse_args(["train", "--config", str(path), "--batch-size", "4"])
    apply_config_file(args, train_parser())
    cfg, spec, explicit = build_configs(args)
    assert cfg.batch_size == 4  # the flag overrides the file
    assert cfg.learning_rate == 1e-3 and cfg.use_amp is True and cfg.max_tokens == 2_000_000
    assert cfg.min_lr_ratio == 0.0
    assert spec.architecture == "moe" and spec.overrides["num_experts"] == 4
    assert spec.overrides["local_window"] == 64
    assert "learning_rate" in explicit

    js = tmp_path / "run.json"
    js.write_text(json.dumps({"batch_size": 2, "stage": "code"}))
    args = build_parser().parse_args(["train", "--config", str(js)])
    apply_config_file(args, train_parser())
    assert build_configs(args)[0].stage == "code"


@pytest.mark.parametrize(
    "text, match",
    [
        ("batch_sise: 4\n", "unknown keys batch_sise"),
        ("stage: pretrain\n", "stage"),
        ("use_amp: maybe\n", "true or false"),
        ("batch_size: [1, 2\n", "cannot parse"),
    ],
)
def test_config_file_errors(tmp_path, text, match):
    from archlab.commands.train import apply_config_file, train_parser

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    args = build_parser().parse_args(["train", "--config", str(path)])
    with pytest.raises(UserError, match=match):
        apply_config_file(args, train_parser())


# ---- checkpoints ---------------------------------------------------------------------------
@pytest.fixture
def tokenizer_file(tmp_path):
    from archlab.data.tokenizer import train_char

    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    train_char(["hello world, abcdefg"]).save(path)
    return path


def _model(vocab=40, seed=0):
    torch.manual_seed(seed)
    cfg = preset_config(
        "dense", "nano", vocab_size=vocab, n_layers=2, d_model=32, n_heads=2, d_ff=64
    )
    return build_model(cfg), cfg


def _state(model, step):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return {
        "step": step,
        "optimizer": opt.state_dict(),
        "data_rng": torch.Generator().get_state(),
        "python": (3, tuple(range(5)), None),
        "train_config": TrainConfig().to_dict(),
    }


def test_checkpoint_round_trip_with_weights_only(tmp_path, tokenizer_file):
    model, cfg = _model()
    run = tmp_path / "run"
    path = ck.save_checkpoint(run, 7, model, cfg, tokenizer_file, _state(model, 7))
    assert path.name == "step_0000007"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000007"
    assert sorted(os.listdir(path)) == sorted([*ck.CHECKPOINT_FILES, "checksums.json"])
    config = json.loads((path / "config.json").read_text())
    assert config["archlab_version"] and config["d_model"] == 32
    # trainer_state.pt loads with the safe unpickler
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 7 and "state" in state["optimizer"]
    loaded, loaded_cfg, tok = ck.load_model(run)  # a run folder resolves to its latest
    assert loaded_cfg == cfg and tok.vocab_size > 0 and not loaded.training
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert loaded.head.weight is loaded.tok_emb.weight  # tying survives the round trip


def test_keep_last_k_and_latest(tmp_path, tokenizer_file):
    model, cfg = _model()
    run = tmp_path / "run"
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(run, step, model, cfg, tokenizer_file, {"step": step}, keep=2)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_0000030", "step_0000040"]
    assert ck.latest_checkpoint(run).name == "step_0000040"
    # the same step written again replaces it in place
    ck.save_checkpoint(run, 40, model, cfg, tokenizer_file, {"step": 40}, keep=2)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_0000030", "step_0000040"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_non_finite_weights_are_never_written(tmp_path, tokenizer_file):
    model, cfg = _model()
    run = tmp_path / "run"
    ck.save_checkpoint(run, 1, model, cfg, tokenizer_file, {"step": 1})
    with torch.no_grad():
        model.blocks[0].ffn.fc.weight[0, 0] = float("nan")
    with pytest.raises(ck.CheckpointError, match="non-finite"):
        ck.save_checkpoint(run, 2, model, cfg, tokenizer_file, {"step": 2})
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_0000001"]
    assert ck.latest_checkpoint(run).name == "step_0000001"


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate_state", "delete", "config"])
def test_corrupt_checkpoint_gives_one_line_error_and_keeps_the_previous(
    tmp_path, tokenizer_file, damage
):
    model, cfg = _model()
    run = tmp_path / "run"
    ck.save_checkpoint(run, 1, model, cfg, tokenizer_file, _state(model, 1))
    good = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[0].ffn.fc.weight.add_(1.0)
    bad = ck.save_checkpoint(run, 2, model, cfg, tokenizer_file, _state(model, 2))
    target = bad / ("trainer_state.pt" if damage == "truncate_state" else "model.safetensors")
    data = target.read_bytes()
    if damage == "flip":
        target.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif damage.startswith("truncate"):
        target.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        target.unlink()
    else:
        (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        ck.load_model(run)
    msg = str(e.value)
    assert "\n" not in msg and "step_0000002" in msg
    assert "step_0000001" in msg  # the error points at the earlier, intact checkpoint
    # the earlier checkpoint is untouched and still loads
    earlier, _, _ = ck.load_model(run / "checkpoints" / "step_0000001")
    for n, t in earlier.state_dict().items():
        assert torch.equal(t, good[n]), n


def test_unverified_truncation_is_still_caught(tmp_path, tokenizer_file, monkeypatch):
    """Without checksums.json (a hand-made folder), safetensors itself rejects a cut file."""
    model, cfg = _model()
    path = ck.save_checkpoint(tmp_path / "run", 1, model, cfg, tokenizer_file, {"step": 1})
    (path / "checksums.json").unlink()
    with pytest.raises(UserError, match="no checksums.json .* pass --skip-checksums"):
        ck.load_model(path)
    monkeypatch.setenv(ck.SKIP_CHECKSUMS_ENV, "1")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(UserError, match="cannot load model.safetensors"):
        ck.load_model(path)


def test_shape_mismatch_and_missing_checkpoint(tmp_path, tokenizer_file):
    model, cfg = _model()
    path = ck.save_checkpoint(tmp_path / "run", 1, model, cfg, tokenizer_file, {"step": 1})
    other, _ = _model(vocab=41)
    with pytest.raises(UserError, match="cannot load model.safetensors"):
        ck.load_weights(other, path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        ck.load_model(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        ck.load_model(tmp_path / "nowhere")


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path, tokenizer_file):
    model, cfg = _model()
    run = tmp_path / "run"
    ck.save_checkpoint(run, 5, model, cfg, tokenizer_file, {"step": 5})
    tmp = run / "checkpoints" / ".tmp-step_0000010-123"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert ck.latest_checkpoint(run).name == "step_0000005"
    ck.clean_temporary(run)
    assert not tmp.exists()


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_resume_drops_records_after_the_checkpoint(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in range(1, 6):
        w.log({"kind": "train", "step": s, "loss": float(s)})
    w.log({"kind": "eval", "step": 5, "val_loss": float("nan")})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short by a kill
    w = MetricsWriter(tmp_path, resume_step=3)
    w.log({"kind": "train", "step": 4, "loss": 40.0})
    w.close()
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_logging_backends_fail_clearly_when_missing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n in ("tensorboard", "wandb") else real(n, *a),
    )
    with pytest.raises(UserError, match="--tensorboard: the tensorboard package is not installed"):
        MetricsWriter(tmp_path, tensorboard=True)
    with pytest.raises(UserError, match="--wandb"):
        MetricsWriter(tmp_path, wandb=True)


# ---- FLOPs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, preset, kw",
    [("dense", None, {}), ("dense", None, {"tie_weights": False}), ("dense", "rustgpt", {})],
)  # meta tensors: torch's counter sees SDPA there (not the CPU flash kernel)
def test_flops_per_token_matches_a_flop_counter(arch, preset, kw):
    """The analytic count (6N + attention) equals torch's FlopCounter within norms/biases."""
    from torch.utils.flop_counter import FlopCounterMode

    if preset:
        cfg = preset_config(arch, preset=preset, vocab_size=533)
    else:
        cfg = preset_config(arch, "nano", vocab_size=512, n_layers=2, **kw)
    model = build_model(cfg, device="meta")
    T = min(64, cfg.max_seq_len)
    x = torch.zeros(2, T, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    counted = counter.get_total_flops() / (2 * T)
    assert flops_per_token(model, T) == pytest.approx(counted, rel=0.01)


def test_flops_of_the_rustgpt_hypermixer_match_a_flop_counter():
    """Its generated token mixing: all matmuls, so the counter sees everything (CPU, real run)."""
    from torch.utils.flop_counter import FlopCounterMode

    pytest.importorskip("archlab.models.hypermixer_rustgpt")
    cfg = preset_config("hypermixer", preset="rustgpt", vocab_size=533)
    model = build_model(cfg)
    x = torch.zeros(2, 80, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    counted = counter.get_total_flops() / (2 * 80)
    assert flops_per_token(model, 80) == pytest.approx(counted, rel=0.03)


def test_mamba_scan_flops_are_counted():
    pytest.importorskip("archlab.models.mamba")
    cfg = preset_config("mamba", "nano", vocab_size=512, n_layers=2)
    model = build_model(cfg, device="meta")
    base = 6 * model.num_active_parameters()  # tied head (counted once), no position table
    scan = 3 * 9 * cfg.d_inner * cfg.state_size * cfg.n_layers
    assert flops_per_token(model, 64) == pytest.approx(base + scan, rel=1e-9)


def test_mfu_divides_by_the_devices_peak():
    from archlab.train.flops import mfu

    assert mfu(1e6, 1e3, 4e9, world_size=2) == pytest.approx(0.125)

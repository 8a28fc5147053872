"""`archlab export --format hf`: round trips through transformers for every exportable form,
tokenizer conversion, and one-line refusals for the forms without a transformers counterpart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archlab import build_model, preset_config
from archlab.cli import main
from archlab.data.tokenizer import load_tokenizer, train_bpe, train_char, train_word
from archlab.export.hf import NotExportable, hf_form, save_hf_tokenizer
from archlab.generate import SamplingParams, generate_ids
from archlab.train.checkpoint import load_model, save_checkpoint

transformers = pytest.importorskip("transformers")

SMALL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64"]
SMALL_CFG = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
PROMPT = "Once upon a time, the little"


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    from archlab.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("export") / "stories_bpe"
    return prepare_dataset(
        "stories", out, tokenizer="bpe", vocab_size=384, num_stories=300, verbose=False
    )


def trained_run(tmp: Path, data: Path, arch: str, *extra: str) -> Path:
    """A few optimizer steps of a small model (weights far from their initialisation)."""
    run = tmp / f"run-{arch}"
    ssm = arch in ("mamba", "mamba2")
    shape = SMALL if not ssm else SMALL[:2] + SMALL[4:6]  # mamba(2): no heads, no MLP
    rc = main(
        ["train", "--architecture", arch, *shape, "--max-seq-len", "64", "--batch-size", "4",
         "--num-epochs", "1", "--steps-per-epoch", "6", "--seq-len", "32",
         "--learning-rate", "1e-2", "--warmup-steps", "1", "--data", str(data),
         "--out-dir", str(run), "--num-threads", "1", *extra]
    )  # fmt: skip
    assert rc == 0
    return run


def export(run: Path, out: Path, capsys) -> str:
    rc = main(["export", "--checkpoint", str(run), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def check_round_trip(run: Path, out: Path, hf_class: str, learned_positions: bool) -> None:
    """Logits equal (float32, atol 1e-4), tokenizer ids equal, greedy text equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, cfg, tok = load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert type(hf).__name__ == hf_class
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf_class]
    # logits over a full window of tokens and a batch of two
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=g)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # the tokenizer: same ids, same text
    ids = tok.encode(PROMPT)
    assert hf_tok(PROMPT)["input_ids"] == ids
    assert hf_tok.decode(ids) == tok.decode(ids) == PROMPT
    assert hf_tok.eos_token_id == tok.eot_id
    if learned_positions:
        assert hf_tok.model_max_length == cfg.max_seq_len
    # greedy generation: archlab's cached decoding vs transformers.generate
    n_new = 24
    want = list(generate_ids(model, ids, n_new, SamplingParams(greedy=True), stop_ids=[tok.eot_id]))
    with torch.no_grad():
        got = hf.generate(
            torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, pad_token_id=tok.eot_id
        )[0, len(ids) :].tolist()
    if tok.eot_id in got:
        got = got[: got.index(tok.eot_id)]
    assert len(want) > 0
    assert got == want
    assert hf_tok.decode(got) == tok.decode(want)


@pytest.mark.parametrize(
    "arch, extra, hf_class",
    [
        ("dense", (), "GPT2LMHeadModel"),
        ("mamba", ("--state-size", "8"), "MambaForCausalLM"),
        ("mamba2", ("--state-size", "8", "--ssd-head-dim", "16", "--ssd-chunk-size", "8"),
         "Mamba2ForCausalLM"),
        ("dense", ("--use-rope", "--use-rmsnorm", "--mlp", "swiglu"), "LlamaForCausalLM"),
        ("moe", ("--use-rope", "--use-rmsnorm", "--mlp", "swiglu", "--num-experts", "4"),
         "MixtralForCausalLM"),
        ("gdn", ("--mlp", "swiglu", "--gdn-attention-every", "2", "--gdn-chunk-size", "8"),
         "OlmoHybridForCausalLM"),
    ],
)  # fmt: skip
def test_round_trip_of_trained_model(tmp_path, bpe_data, capsys, arch, extra, hf_class):
    run = trained_run(tmp_path, bpe_data, arch, *extra)
    out = tmp_path / "hf"
    printed = export(run, out, capsys)
    assert hf_class in printed and "verified" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    check_round_trip(
        run, out, hf_class,
        learned_positions="--use-rope" not in extra and arch not in ("mamba", "mamba2", "gdn"),
    )  # fmt: skip
    if arch == "mamba2":  # the SSD shape reaches transformers' config
        config = json.loads((out / "config.json").read_text())
        assert (config["num_heads"], config["head_dim"], config["state_size"]) == (4, 16, 8)
        assert config["n_groups"] == 1 and config["chunk_size"] == 8


def test_gpt2_with_biases_and_untied_head(tmp_path, bpe_data, capsys):
    """Biased linears and a separate head map to GPT-2's own biases and lm_head."""
    cfg = preset_config(
        "dense", vocab_size=load_tokenizer(bpe_data).vocab_size, bias=True, tie_weights=False,
        norm_eps=1e-6, **SMALL_CFG,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # move every weight, biases and LayerNorms included, off its init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, cfg, bpe_data / "tokenizer.json", {"step": 1})
    out = tmp_path / "hf"
    export(run, out, capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["layer_norm_epsilon"] == 1e-6
    assert config["activation_function"] == "gelu_pytorch_tanh" and config["n_inner"] == 64
    check_round_trip(run, out, "GPT2LMHeadModel", learned_positions=True)


def test_llama_with_biases_and_untied_head(tmp_path, bpe_data, capsys):
    """--bias maps to Llama's attention_bias and mlp_bias; an untied head to its lm_head."""
    cfg = preset_config(
        "dense", vocab_size=load_tokenizer(bpe_data).vocab_size, use_rope=True, use_rmsnorm=True,
        mlp="swiglu", bias=True, tie_weights=False, **SMALL_CFG,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, cfg, bpe_data / "tokenizer.json", {"step": 1})
    out = tmp_path / "hf"
    export(run, out, capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert config["intermediate_size"] == cfg.ffn_hidden and config["tie_word_embeddings"] is False
    check_round_trip(run, out, "LlamaForCausalLM", learned_positions=False)


# ---- refusals ---------------------------------------------------------------------------------
REFUSED = [
    ("hypermixer", {}, "HyperMixer"),
    ("hybrid", {}, "hybrid"),
    ("dense", {"preset": "rustgpt"}, "rustgpt"),
    ("dense", {"use_rope": True}, "RoPE + LayerNorm"),
    ("dense", {"use_rmsnorm": True}, "learned positions + RMSNorm"),
    ("moe", {}, "moe needs --use-rope --use-rmsnorm --mlp swiglu"),
    ("moe", {"use_rope": True, "use_rmsnorm": True, "mlp": "swiglu", "top_k": 1}, "Switch gate"),
    ("moe", {"use_rope": True, "use_rmsnorm": True, "mlp": "swiglu", "bias": True}, "biases"),
    ("dense", {"use_rope": True, "use_rmsnorm": True}, "RoPE + RMSNorm + GELU"),
    ("dense", {"mlp": "swiglu"}, "learned positions + LayerNorm + SWIGLU"),
    ("gdn", {"gdn_attention_every": 2}, "gdn needs --mlp swiglu --gdn-attention-every K"),
    ("gdn", {"mlp": "swiglu"}, "OlmoHybridForCausalLM needs at least one full-attention layer"),
]


@pytest.mark.parametrize("arch, kw, why", REFUSED)
def test_refusal_is_one_line_exit_2(tmp_path, capsys, arch, kw, why):
    tok = train_char(["abc def"])
    tok_path = tok.save(tmp_path / "tokenizer.json")
    if kw.get("preset") == "rustgpt":
        cfg = preset_config(arch, preset="rustgpt", vocab_size=tok.vocab_size)
    else:
        cfg = preset_config(arch, vocab_size=tok.vocab_size, **{**SMALL_CFG, **kw})
    save_checkpoint(tmp_path / "run", 1, build_model(cfg), cfg, tok_path, {"step": 1})
    out = tmp_path / "hf"
    rc = main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert why in err and "exportable forms:" in err and "GPT2LMHeadModel" in err
    assert not out.exists()


def test_hf_form_of_each_exportable_form():
    assert hf_form(preset_config("dense", **SMALL_CFG)) == "gpt2"
    assert hf_form(preset_config("dense", bias=True, tie_weights=False, **SMALL_CFG)) == "gpt2"
    assert hf_form(preset_config("mamba", **SMALL_CFG)) == "mamba"
    assert hf_form(preset_config("mamba2", **SMALL_CFG)) == "mamba2"
    llama = dict(use_rope=True, use_rmsnorm=True, mlp="swiglu", **SMALL_CFG)
    assert hf_form(preset_config("dense", **llama)) == "llama"
    assert hf_form(preset_config("dense", bias=True, **llama)) == "llama"
    assert hf_form(preset_config("moe", **llama)) == "mixtral"
    assert hf_form(preset_config("moe", top_k=3, num_experts=4, **llama)) == "mixtral"
    gdn = dict(SMALL_CFG, mlp="swiglu", gdn_attention_every=2)
    assert hf_form(preset_config("gdn", **gdn)) == "olmo_hybrid"
    with pytest.raises(NotExportable, match="no transformers class"):
        hf_form(preset_config("hybrid", **SMALL_CFG))


def test_export_refuses_a_non_empty_out_and_force_replaces_only_an_export(
    tmp_path, bpe_data, capsys
):
    cfg = preset_config("dense", vocab_size=load_tokenizer(bpe_data).vocab_size, **SMALL_CFG)
    run = tmp_path / "run"
    save_checkpoint(run, 1, build_model(cfg), cfg, bpe_data / "tokenizer.json", {"step": 1})
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["export", "--checkpoint", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--force" in err and (out / "keep.txt").exists()
    rc = main(["export", "--checkpoint", str(run), "--out", str(out), "--force"])
    err = capsys.readouterr().err  # --force replaces only an earlier export, never user files
    assert rc == 2 and "holds files an export did not write" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    first = (out / "config.json").stat().st_ino
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").stat().st_ino != first


# ---- tokenizers --------------------------------------------------------------------------------
TEXTS = [
    "Hello, world! The fox's tail: $5 + 3 = 8; a|b ~c `d` </s>",
    "Once upon a time — “quoted” café naïve\n\tnew line  two spaces",
    "mountains are tall. </s>",
]
PROBES = TEXTS + ["an unknownword here, and </s>x.", "a</s> b", "ünï 🙂 end<|endoftext|>tail"]


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_tokenizer_encodes_and_decodes_as_archlab(tmp_path, kind):
    from transformers import AutoTokenizer

    tok = {
        "bpe": lambda: train_bpe(TEXTS * 30, 300),
        "char": lambda: train_char(TEXTS),
        "word": lambda: train_word(TEXTS),
    }[kind]()
    save_hf_tokenizer(tok, tmp_path, 64)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in PROBES:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids), text
    assert hf.eos_token == tok.eot_token and hf.eos_token_id == tok.eot_id

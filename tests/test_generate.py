"""Generation: sampling filters, cached decoding vs full recomputation, context windows,
streaming text. In-memory models and tiny tokenizers; no checkpoint needed."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from archlab import build_model, preset_config
from archlab.errors import UserError
from archlab.generate import (
    ContextWindowWarning,
    DecodeState,
    SamplingParams,
    TextStream,
    detokenize_words,
    generate,
    generate_ids,
    sample_token,
    stream_text,
    top_k_filter,
    top_p_filter,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest and does not fight the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- tiny tokenizers implementing the TextTokenizer contract -----------------------------


class CharTokenizer:
    """One token per character of a fixed alphabet; id 0 is end-of-text."""

    kind = "char"

    def __init__(self, alphabet: str = " abcdefghijklmnopqrstuvwxyz.,:?!") -> None:
        self.itos = ["<|endoftext|>"] + list(alphabet)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.eot_id = 0
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i != self.eot_id)

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)


class ByteTokenizer:
    """Raw UTF-8 bytes (ids 0..255) + end-of-text 256: a multi-byte character spans tokens."""

    kind = "bpe"
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return None


class WordTokenizer:
    """Whitespace words joined by single spaces on decode (like a word-level tokenizer)."""

    kind = "word"

    def __init__(self, words: list[str]) -> None:
        self.itos = ["</s>"] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.eot_id = 0
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.itos[i] for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return self.stoi.get(token)


# ---- models of every architecture ----------------------------------------------------------


def tiny_model(arch: str, preset: str | None = None, seed: int = 0, vocab: int = 33, **kw):
    """A small model of `arch` in float64 (so argmax ties from rounding cannot flip tokens)."""
    torch.manual_seed(seed)
    if preset:
        cfg = preset_config(arch, preset=preset, vocab_size=vocab, **kw)
    else:
        base = dict(
            vocab_size=vocab,
            d_model=32,
            n_layers=2,
            n_heads=4,
            d_ff=64,
            max_seq_len=64,
            num_experts=4,
            top_k=2,
            local_window=6,
            state_size=8,
        )
        base.update(kw)
        cfg = preset_config(arch, "nano", **base)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # HyperMixer's mixer starts at 0 (zero output-norm gain): wake it
        for mod in model.modules():
            if getattr(mod, "out_norm", None) is not None and hasattr(mod, "hyper_w1"):
                mod.out_norm.weight.uniform_(0.8, 1.2)
    return model


# (arch, preset, extra config) for every architecture and the position variants
CASES = [
    pytest.param("dense", None, {}, id="dense"),
    pytest.param("dense", None, {"use_rope": True}, id="dense-rope"),
    pytest.param("hypermixer", None, {}, id="hypermixer"),
    pytest.param("mamba", None, {}, id="mamba"),
    pytest.param("moe", None, {}, id="moe"),
    pytest.param("moe", None, {"use_rope": True}, id="moe-rope"),
    pytest.param("hybrid", None, {}, id="hybrid"),
    pytest.param("dense", "rustgpt", {}, id="rustgpt-dense"),
    pytest.param("hypermixer", "rustgpt", {}, id="rustgpt-hypermixer"),
]


def reference_greedy(model, prompt: list[int], n: int, shift: int | None = None) -> list[int]:
    """Greedy by full recomputation of the visible context at every step (no cache).

    Learned positions: the visible context starts at `start`; when it exceeds the window the
    context restarts at the last `window - shift` tokens (the documented sliding policy).
    """
    cfg = model.cfg
    window = cfg.max_seq_len if cfg.uses_learned_positions else None
    keep = None
    if window is not None:
        keep = window - (shift if shift is not None else max(1, window // 4))
    seq = list(prompt)
    start = max(0, len(seq) - window) if window else 0
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq[start:]]))[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            seq.append(tok)
            if window is not None and len(seq) - start > window:
                start = len(seq) - keep
    return out


def count_forward_tokens(model) -> list[int]:
    """Record the chunk length of every forward call."""
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True
    )
    return seen


# ---- sampling ----------------------------------------------------------------------------


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # sorted: 0.5 (1), 0.25 (3), 0.125, 0.125
    logits = probs.log()

    def kept(p):
        return set(torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist())

    assert kept(0.3) == {1}
    assert kept(0.5) == {1}  # 0.5 alone reaches 0.5
    assert kept(0.51) == {1, 3}
    assert kept(0.75) == {1, 3}
    assert len(kept(0.76)) == 3 and {1, 3} <= kept(0.76)  # + one of the tied 0.125s
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(1e-9) == {1}  # always at least one token
    # kept logits are unchanged, others are -inf
    out = top_p_filter(logits, 0.51)
    torch.testing.assert_close(out[[1, 3]], logits[[1, 3]])
    assert torch.isinf(out[[0, 2]]).all()


def test_top_p_batched_rows_are_independent():
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.4, 0.4]]).log()
    out = top_p_filter(logits, 0.6)
    assert torch.isfinite(out).tolist() == [[True, False, False], [False, True, True]]


def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).nonzero().flatten().tolist() == [1, 3]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_sampling_respects_filters_and_temperature_statistically():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    g = torch.Generator().manual_seed(0)
    draws = [sample_token(probs.log(), SamplingParams(top_p=0.6), g) for _ in range(2000)]
    counts = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 2 / 3) < 0.04  # renormalised over the kept set {0.5, 0.25}
    # temperature 0.5 squares the distribution: p ∝ [0.25, 0.0625, 0.0156, 0.0156]
    draws = [sample_token(probs.log(), SamplingParams(temperature=0.5), g) for _ in range(2000)]
    counts = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    expected = probs**2 / (probs**2).sum()
    assert (counts - expected).abs().max() < 0.04


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1.0),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=math.nan),
    ],
)
def test_bad_sampling_params_raise_user_error(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw)


def test_same_seed_same_text_and_top_k_one_is_greedy():
    model = tiny_model("dense", vocab=CharTokenizer().vocab_size)
    tok = CharTokenizer()

    def run(**kw):
        return generate(model, "the cat", max_new_tokens=30, tokenizer=tok, **kw)

    a = run(seed=1, temperature=1.5)
    assert a == run(seed=1, temperature=1.5)
    assert a != run(seed=2, temperature=1.5)
    greedy = run(greedy=True)
    assert run(top_k=1, temperature=1.3, seed=7) == greedy
    assert run(temperature=0.0) == greedy
    assert run(top_p=1e-6, seed=3) == greedy  # the nucleus of one token


# ---- cached decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("arch,preset,kw", CASES)
def test_cached_greedy_equals_full_recomputation(arch, preset, kw):
    model = tiny_model(arch, preset, **kw)
    prompt = torch.randint(
        1, model.cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(5)
    )
    prompt = prompt.tolist()
    n = 24
    cached = list(generate_ids(model, prompt, n, SamplingParams(greedy=True)))
    assert len(cached) == n
    assert cached == reference_greedy(model, prompt, n)


@pytest.mark.parametrize("arch,preset,kw", CASES)
def test_each_new_token_is_one_forward_of_one_token(arch, preset, kw):
    """The prefix is fed once; every later forward sees exactly one new token."""
    model = tiny_model(arch, preset, **kw)
    seen = count_forward_tokens(model)
    prompt = list(range(1, 12))
    out = list(generate_ids(model, prompt, 15, SamplingParams(greedy=True)))
    assert len(out) == 15
    assert seen == [11] + [1] * 14


def test_chunked_prefill_equals_one_shot():
    model = tiny_model("dense", use_rope=True)
    ids = torch.randint(1, 33, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    seen = count_forward_tokens(model)
    with torch.no_grad():
        chunked = DecodeState(model, prefill_chunk=7).prefill(ids)
        full = model(torch.tensor([ids]))[0, -1]
    assert seen[:6] == [7, 7, 7, 7, 7, 5]
    torch.testing.assert_close(chunked, full, atol=1e-10, rtol=0)


def test_stop_token_ends_generation_and_is_not_returned():
    model = tiny_model("dense")
    prompt = [3, 4, 5]
    free = list(generate_ids(model, prompt, 20, SamplingParams(greedy=True)))
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    stopped = list(generate_ids(model, prompt, 20, SamplingParams(greedy=True), stop_ids=[free[k]]))
    assert stopped == free[:k]


def test_generation_restores_training_mode():
    model = tiny_model("dense").train()
    list(generate_ids(model, [1, 2], 3, SamplingParams(greedy=True)))
    assert model.training


# ---- context windows --------------------------------------------------------------------------

LEARNED = [
    pytest.param("dense", None, {}, id="dense"),
    pytest.param("hypermixer", None, {}, id="hypermixer"),
    pytest.param("moe", None, {}, id="moe"),
    pytest.param("dense", "rustgpt", {}, id="rustgpt-dense"),
    pytest.param("hypermixer", "rustgpt", {}, id="rustgpt-hypermixer"),
]
UNBOUNDED = [
    pytest.param("mamba", {}, id="mamba"),
    pytest.param("hybrid", {}, id="hybrid"),
    pytest.param("dense", {"use_rope": True}, id="dense-rope"),
]


@pytest.mark.parametrize("arch,preset,kw", LEARNED)
def test_learned_positions_slide_when_window_fills(arch, preset, kw):
    model = tiny_model(arch, preset, max_seq_len=16, **kw)
    assert model.cfg.uses_learned_positions
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    n = 24  # 10 + 24 tokens through a 16-token window: rebuilds at tokens 17, 22, 27, 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prompt fits: no warning
        got = list(generate_ids(model, prompt, n, SamplingParams(greedy=True)))
    assert got == reference_greedy(model, prompt, n)
    # exact nanoGPT-style cropping (rebuild at every token once full) with shift 0
    got0 = list(generate_ids(model, prompt, 9, SamplingParams(greedy=True), slide_shift=0))
    assert got0 == reference_greedy(model, prompt, 9, shift=0)


def test_sliding_rebuilds_once_per_shift():
    model = tiny_model("dense", max_seq_len=16)  # shift 4, keep 12
    seen = count_forward_tokens(model)
    list(generate_ids(model, list(range(1, 11)), 30, SamplingParams(greedy=True)))
    # prefill 10; tokens fill positions 10..15 one by one (6 feeds); then every 5 tokens a
    # rebuild of 12 tokens followed by 4 single-token feeds (positions 12..15)
    assert seen[0] == 10
    assert seen[1:7] == [1] * 6
    assert seen[7:17] == [12, 1, 1, 1, 1, 12, 1, 1, 1, 1]
    assert max(seen[1:]) <= 12


@pytest.mark.parametrize("arch,preset,kw", LEARNED)
def test_long_prompt_truncated_from_left_with_warning(arch, preset, kw):
    model = tiny_model(arch, preset, max_seq_len=16, **kw)
    prompt = torch.randint(1, 33, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with pytest.warns(ContextWindowWarning, match="40 tokens exceeds the context window of 16"):
        got = list(generate_ids(model, prompt, 8, SamplingParams(greedy=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = list(generate_ids(model, prompt[-16:], 8, SamplingParams(greedy=True)))
    assert got == same == reference_greedy(model, prompt[-16:], 8)


@pytest.mark.parametrize("arch,kw", UNBOUNDED)
def test_long_prompt_streams_for_recurrent_and_rope_models(arch, kw):
    """Mamba, the hybrid and RoPE attention see the whole prompt past max_seq_len."""
    model = tiny_model(arch, max_seq_len=16, **kw)
    assert not model.cfg.uses_learned_positions
    prompt = torch.randint(1, 33, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = list(generate_ids(model, prompt, 12, SamplingParams(greedy=True), prefill_chunk=16))
    assert got == reference_greedy(model, prompt, 12)  # full recompute over all 52 tokens
    # and the tokens before the last max_seq_len still reach the last logits: through the
    # KV cache (RoPE) or through the recurrent state (faint at random init: its decay)
    with torch.no_grad():
        whole = DecodeState(model).prefill(prompt)
        window = DecodeState(model).prefill(prompt[-16:])
    assert (whole - window).abs().max() > (1e-3 if arch == "dense" else 1e-9)


# ---- text ------------------------------------------------------------------------------------


def test_text_stream_never_splits_a_multibyte_character():
    tok = ByteTokenizer()
    text = "héllo wörld — 🙂 ok"
    stream = TextStream(tok, tok.encode("prompt "))
    pieces = [stream.push(t) for t in tok.encode(text)]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the partial bytes of é, —, 🙂 were held back


def test_text_stream_drops_a_character_generation_stopped_inside():
    tok = ByteTokenizer()
    stream = TextStream(tok, [])
    assert stream.push(ord("a")) == "a"
    assert stream.push("é".encode()[0]) == ""
    assert stream.flush() == ""  # not "\ufffd": only complete characters are shown
    ids = tok.encode("ok 🙂")[:-2]  # max_new_tokens ran out after 2 of the emoji's 4 bytes
    text, _ = stream_text(tok, tok.encode("say "), iter(ids))
    assert text == "ok "


def test_text_stream_never_emits_a_replacement_for_valid_text_with_byte_level_bpe():
    """Real byte-level BPE (tokens holding parts of two characters), every split of valid
    text into prompt and continuation: the pieces join to the text, none holds U+FFFD."""
    import random

    from archlab.data.tokenizer import train_bpe

    rng = random.Random(0)
    alphabet = list("ab d,") + list("éü—“”🙂日本語😀ß")
    corpus = ["".join(rng.choice(alphabet) for _ in range(60)) for _ in range(200)]
    tok = train_bpe(corpus, 400)
    assert any(tok.decode([i]).count("\ufffd") > 1 for i in range(tok.vocab_size))
    for _ in range(300):
        ids = tok.encode("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 30))))
        k = rng.randint(1, len(ids))
        prompt, cont = ids[:k], ids[k:]
        pieces: list[str] = []
        text, _ = stream_text(tok, prompt, iter(cont), emit=pieces.append)
        assert "\ufffd" not in text and all("\ufffd" not in p for p in pieces)
        if not tok.decode(prompt).endswith("\ufffd"):  # the prompt ends on a character
            assert tok.decode(prompt) + text == tok.decode(ids)


def test_word_level_text_is_detokenised_while_streaming():
    assert detokenize_words("Saturn ' s rings , ( big ) .") == "Saturn's rings, (big)."
    tok = WordTokenizer("plants need sunlight , water and air . ( yes )".split())
    stream = TextStream(tok, tok.encode("plants need"))
    pieces = [stream.push(t) for t in tok.encode("sunlight , water and air . ( yes )")]
    assert "".join(pieces) + stream.flush() == " sunlight, water and air. (yes)"
    assert pieces[:2] == [" sunlight", ","]


def test_text_stream_keeps_word_spacing_after_the_prompt():
    tok = WordTokenizer("the cat sat on a mat".split())
    stream = TextStream(tok, tok.encode("the cat"))
    pieces = [stream.push(t) for t in tok.encode("sat on a mat")] + [stream.flush()]
    assert "".join(pieces) == " sat on a mat"
    assert tok.decode(tok.encode("the cat")) + "".join(pieces) == "the cat sat on a mat"


def test_generate_streams_pieces_that_join_to_the_returned_text():
    tok = ByteTokenizer()
    model = tiny_model("dense", vocab=257)
    pieces: list[str] = []
    text = generate(model, "héllo", max_new_tokens=40, tokenizer=tok, seed=0, stream=pieces.append)
    assert pieces and "".join(pieces) == text
    ids = list(
        generate_ids(
            model, tok.encode("héllo"), 40, SamplingParams(), seed=0, stop_ids=[tok.eot_id]
        )
    )
    assert text == tok.decode(ids)


def test_empty_prompt_is_a_user_error():
    model = tiny_model("dense")
    with pytest.raises(UserError, match="empty prompt"):
        generate(model, "   ", tokenizer=CharTokenizer())
    with pytest.raises(UserError, match="empty prompt"):
        list(generate_ids(model, [], 5))
    with pytest.raises(UserError, match="tokenizer"):
        generate(model, "abc")


# ---- helpers shared with the CLI and chat tests --------------------------------------------


def save_test_checkpoint(run_dir, model, tokenizer) -> None:
    """Write `model` + `tokenizer` as a run folder through the trainer's checkpoint writer."""
    from archlab.train.checkpoint import save_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    tok_path = tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, 1, model.float(), model.cfg, tok_path, {"step": 1})


def test_no_inference_mode_leaks_to_the_caller_between_tokens():
    model = tiny_model("dense")
    it = generate_ids(model, [1, 2, 3], 5, SamplingParams(greedy=True))
    next(it)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()  # autograd still works while generation is suspended
    assert len(list(it)) == 4


def test_out_of_vocabulary_prompt_ids_are_a_user_error():
    model = tiny_model("dense")  # vocab 33
    with pytest.raises(UserError, match=r"\[0, 33\)"):
        list(generate_ids(model, [1, 33], 3))

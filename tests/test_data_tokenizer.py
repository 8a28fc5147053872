"""Tokenizers: exact round trips, the seed's word rules, save/load through one tokenizer.json."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from archlab.data.rustgpt_corpus import CHAT, PRETRAINING
from archlab.data.sources import stdlib_files
from archlab.data.stories import StoryGrammar
from archlab.data.tokenizer import (
    EOT,
    UNK,
    CharTokenizer,
    WordTokenizer,
    load_tokenizer,
    split_words,
    train_bpe,
    train_char,
    train_word,
)
from archlab.errors import UserError

TRICKY = [
    "",
    " ",
    "  two leading spaces and trailing  ",
    "tabs\tand\nnewlines\r\n\n",
    "unicode: héllo wörld, 你好, emoji 🙂, combining é",
    "special <|endoftext|> inside and <|endoftext|>",
    "User: hi Assistant: hello </s>",
    "\x00\x01 control bytes \x7f",
]


def stories(n: int = 300) -> list[str]:
    return [t for t, _ in StoryGrammar().sample(n, seed=11)]


def stdlib_texts(n: int = 40) -> list[str]:
    _, files = stdlib_files()
    out = []
    for f in files[::25]:
        try:
            out.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        if len(out) == n:
            break
    return out


def rustgpt_texts() -> list[str]:
    return [f"{s} </s>" for s in PRETRAINING] + [f"User: {q} Assistant: {a} </s>" for q, a in CHAT]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(stories() + stdlib_texts(20) + rustgpt_texts(), 600, chat=True)


@pytest.mark.parametrize("corpus", [stories, stdlib_texts, rustgpt_texts, lambda: TRICKY])
def test_bpe_round_trip_builtin_corpora(bpe, corpus):
    texts = corpus()
    assert texts
    for t, ids in zip(texts, bpe.encode_batch(texts), strict=True):
        assert bpe.decode(ids) == t
        assert bpe.encode(t) == ids
    assert all(0 <= i < bpe.vocab_size for ids in bpe.encode_batch(texts) for i in ids)


def test_bpe_special_tokens(bpe, tmp_path):
    assert bpe.kind == "bpe" and bpe.token_to_id(EOT) == bpe.eot_id
    assert bpe.encode("a<|endoftext|>b").count(bpe.eot_id) == 1
    # chat: role markers are single tokens, but only as whole words
    assert bpe.encode("User:") == [bpe.token_to_id("User:")]
    assert bpe.token_to_id("User:") not in bpe.encode("SuperUser: x")
    path = bpe.save(tmp_path)
    again = load_tokenizer(path)
    assert again.kind == "bpe" and again.vocab_size == bpe.vocab_size and again.eot_id == bpe.eot_id
    text = stories(5)[0]
    assert again.encode(text) == bpe.encode(text)
    # the file is a plain Hugging Face tokenizer.json
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(path)).encode(text).ids == bpe.encode(text)


def test_bpe_trained_on_given_texts_only():
    tok = train_bpe(["aaaa bbbb"] * 50, 300)
    assert tok.token_to_id("aaaa") is not None
    assert tok.token_to_id("zzzz") is None


def test_bpe_vocab_too_small():
    with pytest.raises(UserError, match="too small"):
        train_bpe(["hello"], 256)  # 256 bytes + <|endoftext|> do not fit
    with pytest.raises(UserError, match="258"):
        train_bpe(["hello"], 258, chat=True)  # 256 + 3 specials


def test_bpe_round_trip_shakespeare(shakespeare_path):
    text = open(shakespeare_path, encoding="utf-8").read()
    tok = train_bpe([text[: len(text) // 4]], 512)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 1.5  # it does compress


def test_char_round_trip(shakespeare_path, tmp_path):
    text = open(shakespeare_path, encoding="utf-8").read()
    tok = train_char([text])
    assert tok.vocab_size == 65 + 2  # 65 distinct characters + <|endoftext|>, <unk>
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    loaded = load_tokenizer(tok.save(tmp_path / "tokenizer.json"))
    assert isinstance(loaded, CharTokenizer) and loaded.encode(text[:1000]) == ids[:1000]


@pytest.mark.parametrize("corpus", [stories, stdlib_texts, rustgpt_texts, lambda: TRICKY])
def test_char_round_trip_builtin(corpus):
    texts = corpus()
    tok = train_char(texts)
    for t, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert tok.decode(ids) == t


def test_char_specials_and_unknown():
    tok = train_char(["abc <|>"])
    ids = tok.encode("ab<|endoftext|>c")
    assert ids == [tok.token_to_id("a"), tok.token_to_id("b"), tok.eot_id, tok.token_to_id("c")]
    assert tok.encode("aZb") == [tok.token_to_id("a"), tok.token_to_id(UNK), tok.token_to_id("b")]
    assert tok.encode("😀")[0] == tok.token_to_id(UNK)  # code points beyond the table


def test_word_rules_match_the_seed():
    assert split_words("Hello, world!") == ["Hello", ",", "world", "!"]
    assert split_words("The sun rises in the east </s>") == [
        "The",
        "sun",
        "rises",
        "in",
        "the",
        "east",
        "</s>",
    ]
    assert split_words("don't stop...") == ["don", "'", "t", "stop", ".", ".", "."]
    assert split_words("west</s>") == ["west", "<", "/", "s", ">"]  # </s> only as a whole word
    assert split_words("(a+b)=c") == ["(", "a", "+", "b", ")", "=", "c"]
    assert split_words("  many\t spaces\n") == ["many", "spaces"]
    assert split_words("café’s") == ["café’s"]  # only ASCII punctuation splits, as in Rust


def test_word_tokenizer(tmp_path):
    tok = train_word(["User: What is snow? Assistant: Snow is cold </s>"])
    assert tok.kind == "word"
    assert tok.eot_id == tok.token_to_id("</s>")
    ids = tok.encode("What is snow? </s>")
    assert len(ids) == 5 and ids[-1] == tok.eot_id
    assert tok.decode(ids) == "What is snow ? </s>"  # lossy by design: joined with spaces
    assert tok.encode("What is rain?") == [
        tok.token_to_id("What"),
        tok.token_to_id("is"),
        tok.token_to_id(UNK),  # unknown word -> <unk> (the seed drops it)
        tok.token_to_id("?"),
    ]
    loaded = load_tokenizer(tok.save(tmp_path))
    assert isinstance(loaded, WordTokenizer) and loaded.vocab == tok.vocab
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["archlab_kind"] == "word"


def test_word_vocab_cap_keeps_most_frequent():
    tok = train_word(["a a a b b c"], vocab_size=4)
    assert tok.vocab_size == 4 and tok.token_to_id("a") is not None and tok.token_to_id("c") is None
    with pytest.raises(UserError, match="too small"):
        train_word(["a"], vocab_size=2)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="corrupt tokenizer"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"archlab_kind": "char", "vocab": ["a"]}))
    with pytest.raises(UserError, match="corrupt tokenizer"):
        load_tokenizer(bad)


def test_foreign_hf_tokenizer_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"</s>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.eot_id == 0 and tok.encode("hi hi") == [1, 1] and tok.vocab_size == 3


def test_encode_batch_matches_encode(bpe):
    texts = list(islice(iter(stories(50)), 50))
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]

"""prepare: sources, splits, reuse, dtypes, atomic output, resolve_data and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from archlab.cli import main
from archlab.data import TokenDataset, load_meta, load_tokenizer, prepare_dataset, resolve_data
from archlab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def docs_of(out: Path, split: str) -> list[str]:
    """Decode a split back into its documents (split on end-of-text)."""
    meta = load_meta(out)
    tok = load_tokenizer(out)
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
    docs, cur = [], []
    for i in ids:
        if i == tok.eot_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur  # every document ends with end-of-text
    return docs


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------------------


def test_stories_dir_contents(tmp_path):
    out = prepare_dataset("stories", tmp_path / "s", num_stories=300, vocab_size=400, verbose=False)
    meta = load_meta(out)
    for key in ("tokenizer", "vocab_size", "eot_id", "dtype", "train_tokens", "val_tokens", "train_docs",
                "val_docs", "source", "hash", "entropy_floor", "has_mask", "task"):  # fmt: skip
        assert key in meta
    assert meta["task"] == "lm" and meta["tokenizer"] == "bpe" and meta["dtype"] == "uint16"
    assert meta["train_docs"] + meta["val_docs"] == 300 and meta["val_docs"] > 0
    assert 0.3 < meta["entropy_floor"] < 1.5
    assert os.path.getsize(out / "train.bin") == 2 * meta["train_tokens"]
    train, val = docs_of(out, "train"), docs_of(out, "val")
    assert len(train) == meta["train_docs"] and len(val) == meta["val_docs"]
    assert not set(train) & set(val)  # train and val share no document
    from archlab.data.stories import StoryGrammar

    generated = [t for t, _ in StoryGrammar().sample(300, seed=0)]
    assert sorted(train + val) == sorted(generated)  # exactly the seeded stories, decoded back
    assert no_leftovers(tmp_path)


def test_reuse_and_rebuild_on_change(tmp_path):
    src = write(
        tmp_path / "corpus" / "a.txt", "first doc<|endoftext|>second doc<|endoftext|>third one"
    )
    out = tmp_path / "out"
    prepare_dataset(str(src), out, tokenizer="char", verbose=False)
    created = load_meta(out)["created"]
    stamp = (out / "train.bin").stat().st_mtime_ns
    prepare_dataset(str(src), out, tokenizer="char", verbose=False)  # same inputs: reused
    assert (out / "train.bin").stat().st_mtime_ns == stamp and load_meta(out)["created"] == created
    h1 = load_meta(out)["hash"]
    write(src, "first doc<|endoftext|>second doc<|endoftext|>third one, changed")
    prepare_dataset(str(src), out, tokenizer="char", verbose=False)  # content changed: rebuilt
    h2 = load_meta(out)["hash"]
    assert h2 != h1 and any("changed" in d for d in docs_of(out, "train") + docs_of(out, "val"))
    prepare_dataset(str(src), out, tokenizer="char", seed=1, verbose=False)  # setting changed
    assert load_meta(out)["hash"] not in (h1, h2)
    prepare_dataset(str(src), out, tokenizer="char", seed=1, force=True, verbose=False)
    assert no_leftovers(tmp_path)


def test_duplicates_never_straddle_splits(tmp_path):
    lines = [json.dumps({"body": f"document number {i % 40}"}) for i in range(400)]
    src = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    out = prepare_dataset(
        str(src), tmp_path / "o", tokenizer="char", text_field="body", verbose=False
    )
    train, val = docs_of(out, "train"), docs_of(out, "val")
    assert len(train) + len(val) == 400 and val and train
    assert not set(train) & set(val)


def test_local_formats_folder_and_glob(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    write(folder / "a.txt", "alpha one\n\nbeta two\n\n\ngamma three")
    write(folder / "sub" / "b.jsonl", '{"text": "delta four"}\n\n{"text": "epsilon five"}\n')
    pq.write_table(pa.table({"text": ["zeta six", None, "eta seven"]}), folder / "c.parquet")
    out = prepare_dataset(
        str(folder), tmp_path / "o", tokenizer="char", doc_separator="\\n\\n", verbose=False
    )
    docs = sorted(docs_of(out, "train") + docs_of(out, "val"))
    assert docs == sorted(
        [
            "alpha one",
            "beta two",
            "gamma three",
            "delta four",
            "epsilon five",
            "zeta six",
            "eta seven",
        ]
    )
    out2 = prepare_dataset(
        str(folder / "**" / "*.jsonl"), tmp_path / "o2", tokenizer="char", verbose=False
    )
    assert sorted(docs_of(out2, "train") + docs_of(out2, "val")) == ["delta four", "epsilon five"]


def test_single_document_is_split_at_its_tail(shakespeare_path, tmp_path):
    out = prepare_dataset(shakespeare_path, tmp_path / "sh", tokenizer="char", verbose=False)
    meta = load_meta(out)
    assert meta["split"] == "tail" and meta["vocab_size"] == 67
    text = open(shakespeare_path, encoding="utf-8").read()
    tok = load_tokenizer(out)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    # exact round trip of the real data, the first ~90% for training (nanoGPT's split)
    assert tok.decode(train[:-1].tolist()) + tok.decode(val[:-1].tolist()) == text.strip()
    assert abs(len(train) - 0.9 * len(text)) < 200


def test_uint32_for_large_vocabularies(tmp_path):
    words = " ".join(f"w{i}" for i in range(66_000))
    src = write(tmp_path / "big.txt", words + "<|endoftext|>" + words)
    out = prepare_dataset(str(src), tmp_path / "o", tokenizer="word", verbose=False)
    meta = load_meta(out)
    assert meta["vocab_size"] > 65_536 and meta["dtype"] == "uint32"
    assert os.path.getsize(out / "val.bin") == 4 * meta["val_tokens"]
    x, _ = TokenDataset(out, "val").get_batch(2, 8, __import__("torch").Generator())
    assert int(x.max()) < meta["vocab_size"]


def test_max_tokens(tmp_path):
    out = prepare_dataset(
        "stories",
        tmp_path / "s",
        num_stories=500,
        tokenizer="char",
        max_tokens=20_000,
        verbose=False,
    )
    meta = load_meta(out)
    assert meta["train_tokens"] + meta["val_tokens"] <= 20_000
    assert meta["train_tokens"] + meta["val_tokens"] > 19_000 and meta["truncated_by_max_tokens"]


def test_rustgpt_stages_share_vocabulary(tmp_path):
    a = prepare_dataset("rustgpt", tmp_path / "r", verbose=False)
    b = prepare_dataset("rustgpt-chat", tmp_path / "c", verbose=False)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    ma, mb = load_meta(a), load_meta(b)
    assert ma["tokenizer"] == "word" and ma["vocab_size"] == mb["vocab_size"]
    assert not ma["has_mask"] and mb["has_mask"] and mb["chat_format"]["user"] == "User:"
    tok = load_tokenizer(a)
    assert tok.eot_id == tok.token_to_id("</s>")
    ids = np.fromfile(a / "train.bin", dtype=np.uint16)
    assert tok.token_to_id("<unk>") not in ids.tolist()  # the vocabulary covers the corpus
    assert "The sun rises in the east and sets in the west </s>" in docs_of_word(a)


def docs_of_word(out: Path) -> list[str]:
    tok = load_tokenizer(out)
    ids = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    return [s.strip() + " </s>" for s in tok.decode(ids.tolist()).split("</s>") if s.strip()]


def test_python_source(tmp_path):
    out = prepare_dataset(
        "python", tmp_path / "py", max_tokens=60_000, vocab_size=300, verbose=False
    )
    meta = load_meta(out)
    assert meta["source"] == "python" and meta["train_docs"] > 0 and meta["val_docs"] > 0
    docs = docs_of(out, "train") + docs_of(out, "val")
    assert any("def " in d or "import " in d for d in docs)
    assert not set(docs_of(out, "train")) & set(docs_of(out, "val"))


def test_given_tokenizer_and_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lang = resolve_data(None, "language", None, num_stories=200, vocab_size=300)
    assert lang.resolve() == (tmp_path / "data" / "stories-bpe300").resolve()
    assert resolve_data(str(lang), "language", None) == lang  # a prepared folder passes through
    # the chat stage with the pretraining tokenizer (--init-from)
    chat = resolve_data(None, "chat", None, tokenizer=str(lang / "tokenizer.json"))
    assert load_tokenizer(chat).to_json() == load_tokenizer(lang).to_json()
    assert chat.name.startswith("rustgpt-chat-tok")
    with pytest.raises(UserError, match="different tokenizer"):
        resolve_data(
            str(chat), "chat", None, tokenizer=str(prepare_dataset("rustgpt", verbose=False))
        )
    assert resolve_data(None, "language", "rustgpt").name == "rustgpt"
    assert resolve_data(None, "chat", "rustgpt").name == "rustgpt-chat"
    with pytest.raises(UserError, match="neither a prepared folder"):
        resolve_data("no-such-thing", "language", None)
    with pytest.raises(UserError, match="unknown stage"):
        resolve_data(None, "poetry", None)


# --------------------------------------------------------------------------------------
# Bad input through the CLI: one line, exit 2, nothing half-written
# --------------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["prepare", *argv])
    except SystemExit as exc:  # a value its flag's type refuses (argparse, one line, exit 2)
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("archlab prepare: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_summary(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "rustgpt", "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0
    assert "train" in out and "vocabulary" in out and str(tmp_path / "r") in out
    code, out2, _ = run_cli(capsys, str(tmp_path / "r"))  # a prepared folder: describe it
    assert code == 0 and out2 == out


def test_cli_missing_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no such file", "nope.txt")
    assert not (tmp_path / "o").exists()


def test_cli_empty_corpus(tmp_path, capsys):
    src = write(tmp_path / "empty.txt", "  \n<|endoftext|>\n\n")
    code, _, err = run_cli(capsys, str(src), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "empty corpus")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_cli_non_utf8(tmp_path, capsys):
    src = write(
        tmp_path / "bad.txt", b"good text " * 3 + b"\xff\xfe then more<|endoftext|>another doc"
    )
    code, _, err = run_cli(capsys, str(src), "--out", str(tmp_path / "o"), "--tokenizer", "char")
    assert_one_line_error(code, err, "bad.txt", "byte offset 30", "--errors replace")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)
    code, _, _ = run_cli(
        capsys,
        str(src),
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        "char",
        "--errors",
        "replace",
        "--quiet",
    )
    assert code == 0
    assert any(
        "\ufffd" in d for d in docs_of(tmp_path / "o", "train") + docs_of(tmp_path / "o", "val")
    )


def test_cli_non_utf8_jsonl_offset(tmp_path, capsys):
    src = write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "b\xc3("}\n')
    code, _, err = run_cli(capsys, str(src), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "bad.jsonl", "byte offset 26")


def test_cli_vocab_too_small(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "stories",
        "--num-stories",
        "20",
        "--vocab-size",
        "100",
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(code, err, "--vocab-size 100 is too small")
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path)


def test_cli_corrupt_meta(tmp_path, capsys):
    out = prepare_dataset("rustgpt", tmp_path / "r", verbose=False)
    (out / "meta.json").write_text('{"tokenizer": "word", truncated')
    code, _, err = run_cli(capsys, str(out))
    assert_one_line_error(code, err, "corrupt", "meta.json")
    with pytest.raises(UserError, match="corrupt"):
        TokenDataset(out)
    # prepare into that folder again rebuilds it
    prepare_dataset("rustgpt", out, verbose=False)
    assert load_meta(out)["tokenizer"] == "word"


def test_cli_truncated_data_file(tmp_path, capsys):
    out = prepare_dataset("rustgpt", tmp_path / "r", verbose=False)
    with open(out / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(UserError, match="incomplete"):
        TokenDataset(out)
    code, _, err = run_cli(capsys, str(out))
    assert_one_line_error(code, err, "incomplete")


def test_cli_bad_options(tmp_path, capsys):
    cases = [
        (["stories", "--text-field", "body"], "--text-field does not apply"),
        (["stories", "--tokenizer", "nonsense"], "neither bpe, char, word"),
        (["stories", "--val-fraction", "1.5"], "--val-fraction"),
        (
            ["stories", "--tokenizer", "char", "--vocab-size", "50"],
            "does not apply to --tokenizer char",
        ),
        (["mqar", "--mqar-pairs", "40", "--mqar-seq-len", "64"], "too short"),
        (["stories", "--mqar-pairs", "4"], "mqar source only"),
        ([], "no source"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()
    other = write(tmp_path / "notdata" / "x.txt", "mine")
    code, _, err = run_cli(capsys, "rustgpt", "--out", str(other.parent))
    assert_one_line_error(code, err, "not a prepared data folder")
    assert other.read_text() == "mine"


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from archlab.data import corpus as prep

    def boom(*a, **k):
        raise RuntimeError("disk full")

    out = prepare_dataset("rustgpt", tmp_path / "r", verbose=False)
    before = (out / "train.bin").read_bytes()
    monkeypatch.setattr(prep, "_encode_docs", boom)
    with pytest.raises(RuntimeError):
        prepare_dataset("rustgpt", out, seed=3, verbose=False)
    assert (out / "train.bin").read_bytes() == before  # the old, complete folder is untouched
    with pytest.raises(RuntimeError):
        prepare_dataset("stories", tmp_path / "new", num_stories=10, verbose=False)
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path)


def test_tinystories_offline_error(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError(
            "Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, _, err = run_cli(capsys, "tinystories", "--out", str(tmp_path / "t"))
    assert_one_line_error(code, err, "roneneldan/TinyStories", "local copy", "--data path/to/*.txt")
    assert not (tmp_path / "t").exists() and no_leftovers(tmp_path)


@pytest.mark.slow
def test_tinystories_offline_env(tmp_path):
    """For real: offline mode and an empty Hugging Face cache, in a fresh process."""
    pytest.importorskip("datasets")
    env = dict(
        os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")
    )
    r = subprocess.run(
        [sys.executable, "-m", "archlab", "prepare", "tinystories", "--out", str(tmp_path / "t")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "local copy" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "t").exists()


def test_script_shim(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_datasets.py"), "rustgpt", "--out", str(tmp_path / "r"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "rustgpt" in r.stdout and load_meta(tmp_path / "r")["tokenizer"] == "word"


def test_tinystories_keeps_official_splits_without_shared_documents(tmp_path, monkeypatch):
    from archlab.data import hub

    rows = {
        "train": [{"text": f"Once there was story {i}."} for i in range(300)],
        "validation": [{"text": "Once there was story 3."}]
        + [{"text": f"A val story {i}."} for i in range(20)],
    }
    monkeypatch.setattr(hub, "load_hub_split", lambda split, streaming=False: iter(rows[split]))
    out = prepare_dataset("tinystories", tmp_path / "t", tokenizer="char", verbose=False)
    meta = load_meta(out)
    assert meta["split"] == "given" and meta["train_docs"] == 300 and meta["val_docs"] == 20
    assert meta["source_info"]["val_duplicates_dropped"] == 1
    assert not set(docs_of(out, "train")) & set(docs_of(out, "val"))
    with pytest.raises(UserError, match="own validation split"):
        prepare_dataset("tinystories", tmp_path / "t2", val_fraction=0.2, verbose=False)


def test_bpe_chat_stage_has_role_tokens(tmp_path):
    out = prepare_dataset(
        "rustgpt-chat", tmp_path / "c", tokenizer="bpe", vocab_size=400, verbose=False
    )
    tok = load_tokenizer(out)
    assert tok.token_to_id("User:") is not None and tok.token_to_id("Assistant:") is not None
    ids = np.fromfile(out / "train.bin", dtype=np.uint16)
    mask = np.fromfile(out / "train_mask.bin", dtype=np.uint8)
    assert tok.token_to_id("User:") in ids.tolist()
    assert tok.token_to_id("User:") not in ids[mask == 1].tolist()
    # counted: the answers, their closing </s> and the end-of-text after them
    counted = tok.decode(ids[mask == 1].tolist())
    assert counted.count("<|endoftext|>") == load_meta(out)["train_docs"]
    assert (
        "Mountains are tall and rocky" in counted
        or "Mountains are tall and rocky"
        in tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16).tolist())
    )


def test_max_tokens_on_a_single_document(shakespeare_path, tmp_path):
    out = prepare_dataset(
        shakespeare_path, tmp_path / "sh", tokenizer="char", max_tokens=10_000, verbose=False
    )
    meta = load_meta(out)
    assert meta["train_tokens"] == 9_000 and meta["val_tokens"] == 1_000 and meta["split"] == "tail"


# ---- long documents are encoded in pieces (progress, parallelism), exactly --------------------
def test_pieces_cut_only_at_safe_newlines():
    from archlab.data import corpus as prep

    text = "ab\ncd  \n ef\ngh\n\nij\nkl"
    pieces = prep._pieces(text, size=1)
    assert "".join(pieces) == text
    # after "ab\n" (b|c), not after "cd  \n" (space before) nor " ef"-side cuts, after "ef\n"
    assert pieces == ["ab\n", "cd  \n ef\n", "gh\n\nij\n", "kl"]
    assert prep._pieces("no newline at all " * 10, size=5) == ["no newline at all " * 10]


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_encoding_in_pieces_equals_the_whole_text(shakespeare_path, kind):
    from archlab.data import corpus as prep
    from archlab.data.tokenizer import train_bpe, train_char, train_word

    text = open(shakespeare_path, encoding="utf-8").read()
    text += "\n<|endoftext|>\nTail after a special token.\n"
    tok = {
        "bpe": lambda: train_bpe([text], 600),
        "char": lambda: train_char([text]),
        "word": lambda: train_word([text], 3000),
    }[kind]()
    pieces = prep._pieces(text, size=20_000)
    assert len(pieces) > 40 and "".join(pieces) == text
    whole = tok.encode(text)
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == whole


def test_one_large_document_shows_progress_and_gives_the_same_data(
    shakespeare_path, tmp_path, capsys, monkeypatch
):
    from archlab import progress as progress_mod
    from archlab.data import corpus as prep

    ref = prepare_dataset(shakespeare_path, tmp_path / "ref", tokenizer="char", verbose=False)
    monkeypatch.setattr(prep, "_PIECE_CHARS", 50_000)
    monkeypatch.setattr(prep, "_PIECE_BATCH_CHARS", 100_000)
    monkeypatch.setattr(progress_mod, "PLAIN_INTERVAL_S", 0.0)
    capsys.readouterr()
    out = prepare_dataset(shakespeare_path, tmp_path / "pieces", tokenizer="char")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("archlab prepare: tokenizing ")]
    assert len(lines) >= 10 and "\r" not in err  # ~1.1M characters in calls of ~100k
    assert "(100%)" in lines[-1]
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()

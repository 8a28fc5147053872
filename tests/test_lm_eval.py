"""lm-evaluation-harness through `ArchlabLM`: exact log-likelihoods, left truncation, rolling
windows, cached batched generation for every architecture, and `archlab eval --tasks` offline
on a local multiple-choice task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from archlab import build_model, preset_config
from archlab.cli import main
from archlab.data.tokenizer import train_char
from archlab.generate import SamplingParams, generate_ids
from archlab.train.checkpoint import save_checkpoint

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from archlab.bench.eval import lm_eval_tasks  # noqa: E402
from archlab.bench.eval.lm_eval_adapter import ArchlabLM, score_windows  # noqa: E402

ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "duck", "goat"]
SMALL = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=48)
GREEDY = SamplingParams(greedy=True)
TEXT = "The little fox saw a cat and a dog. The owl sang to the bear. A duck met a goat."


@pytest.fixture(scope="module")
def tok():
    return train_char([TEXT, " ".join(ANIMALS), "?!.,:'\n"])


def small_model(arch: str, vocab: int, **kw) -> torch.nn.Module:
    cfg = preset_config(arch, vocab_size=vocab, **{**SMALL, **kw})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # sharper distributions than the init, so argmaxes are not ties
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def own_logprob(model, tokens: list[int], n_scored: int) -> float:
    """Sum of archlab's log p(token | prefix) over the last n_scored of `tokens` (one forward)."""
    idx = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        lp = F.log_softmax(model(idx)[0].float(), dim=-1)  # (T-1, V)
    tgt = torch.tensor(tokens[1:])
    return float(lp[-n_scored:].gather(1, tgt[-n_scored:, None]).double().sum())


def ll_requests(pairs):
    return [
        Instance("loglikelihood", {}, (c, x), i, metadata=("t", i, 1))
        for i, (c, x) in enumerate(pairs)
    ]


def test_score_windows_cover_each_target_once_with_max_context():
    ctx, cont = [0, 1, 2], list(range(10, 20))
    w = list(score_windows(ctx, cont, 4))
    assert [t for _, t in w] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    full = ctx + cont
    for inputs, targets in w:  # inputs end right before the last target, at most 4 of them
        end = full.index(targets[-1])
        assert inputs == full[max(0, end - 4) : end] and len(inputs) <= 4
    # short requests: all of the context (HFLM's (context + continuation)[-(L+1):][:-1])
    assert list(score_windows([5, 6], [7], 4)) == [([5, 6], [7])]
    assert list(score_windows(list(range(8)), [8, 9], 4)) == [([5, 6, 7, 8], [8, 9])]


@pytest.mark.parametrize("arch", ["dense", "hypermixer", "mamba", "hybrid"])
def test_loglikelihood_is_the_sum_of_archlabs_token_logprobs(tok, arch):
    model = small_model(arch, tok.vocab_size)
    pairs = [("The little", " fox"), ("A duck met", " a goat."), ("", "The owl")]
    lm = ArchlabLM(model, tok, batch_size=1)
    got = lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    for (ctx, cont), (lp, _) in zip(pairs, got, strict=True):
        c = tok.encode(ctx) if ctx else [tok.eot_id]
        x = tok.encode(cont)
        assert lp == own_logprob(model, c + x, len(x))  # exact: the same forward
    # batched, right-padded: the same numbers up to float noise of other batch shapes
    batched = ArchlabLM(model, tok, batch_size=3).loglikelihood(
        ll_requests(pairs), disable_tqdm=True
    )
    for (a, ga), (b, gb) in zip(got, batched, strict=True):
        assert abs(a - b) < 1e-4 and ga == gb


def test_is_greedy_flag_is_true_exactly_for_the_argmax_continuation(tok):
    model = small_model("dense", tok.vocab_size)
    ctx = tok.encode("The little fox")
    best = list(generate_ids(model, ctx, 3, GREEDY, stop_ids=[]))
    lm = ArchlabLM(model, tok, batch_size=2)
    greedy_text = tok.decode(best)
    other = "".join(chr(ord(c) + 1) if c.isalpha() else "a" for c in greedy_text)
    other = "".join(c if tok.token_to_id(c) is not None else "a" for c in other)
    (lp1, g1), (lp2, g2) = lm.loglikelihood(
        ll_requests([("The little fox", greedy_text), ("The little fox", other)]),
        disable_tqdm=True,
    )
    assert g1 is True and g2 is False and lp1 > lp2


def test_context_longer_than_the_window_is_truncated_left(tok):
    model = small_model("dense", tok.vocab_size)  # learned positions: 48
    ctx = TEXT * 2  # 160 characters
    cont = " owl"
    lm = ArchlabLM(model, tok, batch_size=1)
    (lp, _), = lm.loglikelihood(ll_requests([(ctx, cont)]), disable_tqdm=True)  # fmt: skip
    full = tok.encode(ctx + cont)
    window = full[-(48 + 1) :]  # the last 48 inputs plus the final target
    assert lp == own_logprob(model, window, len(tok.encode(cont)))
    # a continuation longer than the window is scored in windows, not cut
    long_cont = " " + TEXT
    (lp_long, _), = lm.loglikelihood(ll_requests([("A", long_cont)]), disable_tqdm=True)  # fmt: skip
    ref = 0.0
    for inputs, targets in score_windows(tok.encode("A"), tok.encode(long_cont), 48):
        ref += own_logprob(model, inputs + [targets[-1]], len(targets))
    assert lp_long == pytest.approx(ref, abs=1e-6) and len(tok.encode(long_cont)) > 48


def test_loglikelihood_rolling_uses_disjoint_windows(tok):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model = small_model("mamba", tok.vocab_size)
    lm = ArchlabLM(model, tok, batch_size=4, max_length=16)
    doc = TEXT
    ids = tok.encode(doc)
    (got,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True
    )
    ref = 0.0  # lm-eval's own window recipe (as HFLM uses it)
    for ctx, pred in map(
        make_disjoint_window,
        get_rolling_token_windows(ids, tok.eot_id, max_seq_len=16, context_len=1),
    ):
        seq = ctx + pred
        ref += own_logprob(model, seq, len(pred))
    assert got == pytest.approx(ref, abs=1e-4)
    # a document inside one window: a single forward over [eot] + document
    short = "A duck met a goat."
    (one,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (short,), 0)], disable_tqdm=True
    )
    s = tok.encode(short)
    assert one == pytest.approx(own_logprob(model, [tok.eot_id] + s, len(s)), abs=1e-5)


@pytest.mark.parametrize("arch", ["dense", "hypermixer", "mamba", "hybrid", "moe"])
def test_generate_until_equals_cached_greedy_decoding(tok, arch):
    """Batched rows (equal prompt lengths) give what archlab's own generate gives per prompt."""
    model = small_model(arch, tok.vocab_size)
    prompts = ["The little fox", "The old bear ", "A duck"]  # two of 14 chars, one of 6
    kwargs = {"until": ["."], "max_gen_toks": 12, "do_sample": False}
    lm = ArchlabLM(model, tok, batch_size=4)
    reqs = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    for p, text in zip(prompts, got, strict=True):
        ref = tok.decode(
            list(generate_ids(model, tok.encode(p), 12, GREEDY, stop_ids=[tok.eot_id]))
        )
        assert text == ref.split(".")[0]


def test_generation_context_is_cut_to_leave_room(tok):
    model = small_model("dense", tok.vocab_size)  # 48 learned positions
    lm = ArchlabLM(model, tok, batch_size=1)
    ctx = TEXT  # 80 characters: keep the last 48 - 10
    (got,) = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 10}), 0)],
        disable_tqdm=True,
    )
    kept = tok.encode(ctx)[-38:]
    ref = tok.decode(list(generate_ids(model, kept, 10, GREEDY, stop_ids=[tok.eot_id])))
    assert got == ref


# ---- archlab eval --tasks, offline ----------------------------------------------------------------
def write_mc_task(folder: Path, n: int = 20) -> str:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a = rng.sample(ANIMALS, 4)
        rows.append({"question": f"The little {a[0]} saw a", "choices": a,
                     "answer": i % 4})  # fmt: skip
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(
        f"""task: archlab_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    return "archlab_test_mc"


@pytest.fixture
def run(tmp_path, tok):
    model = small_model("hypermixer", tok.vocab_size)
    # HyperMixer's residual branches start at zero (its init, issue #9): give every weight a
    # random value so the choices' scores are far apart and the argmax below cannot flip on
    # float rounding between lm-eval's padded batches and one unpadded forward
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    tok_path = tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, model, model.cfg, tok_path, {"step": 1})
    return tmp_path / "run"


def test_local_multiple_choice_task_offline_end_to_end(tmp_path, tok, run, capsys, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    name = write_mc_task(tasks)
    monkeypatch.setattr(lm_eval_tasks, "_hub_reachable", lambda timeout=3.0: False)
    _isolate_offline_switch(monkeypatch)
    rc = main(["eval", "--checkpoint", str(run), "--tasks", name, "--include-path", str(tasks),
               "--batch-size", "8", "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)["results"][name]
    acc = res["acc,none"]
    assert 0.0 <= acc <= 1.0
    # the same accuracy from archlab's own log-probabilities: argmax over the choices
    from archlab.train.checkpoint import load_model

    model, _, _ = load_model(run)
    correct = 0
    for line in (tasks / "mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        ctx = tok.encode(doc["question"])
        scores = [
            own_logprob(model, ctx + tok.encode(c), len(tok.encode(c))) for c in doc["choices"]
        ]
        correct += int(max(range(4), key=scores.__getitem__) == doc["answer"])
    assert acc == pytest.approx(correct / 20)
    # --limit: only the first documents; stderr is not a terminal here: no bar redraws
    rc = main(["eval", "--checkpoint", str(run), "--tasks", name, "--include-path", str(tasks),
               "--limit", "5", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and "\r" not in captured.err
    acc5 = json.loads(captured.out)["results"][name]["acc,none"]
    assert acc5 in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # --quiet: the table only
    rc = main(["eval", "--checkpoint", str(run), "--tasks", name, "--include-path", str(tasks),
               "--limit", "5", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == "" and name in captured.out and "acc" in captured.out


def _isolate_offline_switch(monkeypatch) -> None:
    """Let offline_unless_reachable flip the hub flags for this test only."""
    import sys

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for n in names:
            if mod is not None and hasattr(mod, n):
                monkeypatch.setattr(mod, n, getattr(mod, n))


def test_hub_task_without_network_fails_in_one_line(tmp_path, run, capsys, monkeypatch):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text(
        "task: archlab_test_hub\ndataset_path: EleutherAI/lambada_openai\n"
        "dataset_name: default\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{text}}"\ndoc_to_target: " x"\nmetric_list:\n  - metric: acc\n'
    )
    monkeypatch.setattr(lm_eval_tasks, "_hub_reachable", lambda timeout=3.0: False)
    _isolate_offline_switch(monkeypatch)
    rc = main(["eval", "--checkpoint", str(run), "--tasks", "archlab_test_hub",
               "--include-path", str(tasks)])  # fmt: skip
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("archlab eval:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert "hub" in lines[0] and "network" in lines[0] and "--include-path" in lines[0]


def test_eval_tasks_refuses_the_split_flags(run, capsys):
    rc = main(["eval", "--checkpoint", str(run), "--tasks", "x", "--max-tokens", "5"])
    assert rc == 2 and "do not apply with --tasks" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(run), "--tasks", "x", "--include-path", "/no/such"])
    assert rc == 2 and "--include-path: /no/such does not exist" in capsys.readouterr().err


@pytest.mark.slow  # indexes lm-eval's thousands of built-in task YAMLs (~10-30 s)
def test_unknown_task_is_one_line(tmp_path, run, capsys):
    rc = main(["eval", "--checkpoint", str(run), "--tasks", "no_such_task_xyz",
               "--include-path", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "unknown task(s) no_such_task_xyz" in err and "Traceback" not in err

"""The stories grammar: exact probabilities, injectivity, and the recorded entropy floor."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np

from archlab.data import load_tokenizer, prepare_dataset
from archlab.data.stories import ReplayChooser, StoryGrammar, entropy_floor
from archlab.data.stories_lexicon import EVENTS, NAMES, SPECIES, Lexicon


def enumerate_tiny() -> dict[str, float]:
    out = {}
    for text, logp, _ in StoryGrammar(Lexicon.tiny()).enumerate():
        assert text not in out, "two choice paths gave one text"
        out[text] = logp
    return out


def test_tiny_grammar_is_a_distribution():
    stories = enumerate_tiny()
    assert len(stories) > 100
    assert math.isclose(math.fsum(math.exp(lp) for lp in stories.values()), 1.0, abs_tol=1e-12)


def test_sampled_logp_is_exact():
    exact = enumerate_tiny()
    for text, logp in StoryGrammar(Lexicon.tiny()).sample(200, seed=3):
        assert abs(logp - exact[text]) < 1e-12


def test_replay_reproduces_sampled_story():
    g = StoryGrammar()
    for text, logp, path in g.sample_with_paths(50, seed=5):
        c = ReplayChooser(list(path))
        assert g.generate(c) == text and abs(c.logp - logp) < 1e-9


def test_every_template_is_unambiguous():
    """All templates, two names, one word per slot, one event: choices -> text injective."""
    fresh = {k: v[:1] for k, v in Lexicon().fresh.items()}
    lex = replace(
        Lexicon(),
        names=NAMES[:2],
        species=SPECIES[:1],
        traits=("kind",),
        homes=("near a big forest",),
        places=("park",),
        fresh=fresh,
        num_events={1: 1.0},
    )
    texts = {}
    for text, _logp, path in StoryGrammar(lex).enumerate():
        assert text not in texts, f"ambiguous: {path} and {texts.get(text)}"
        texts[text] = path
    assert len(texts) == 2 * len(EVENTS) * 5 * 6 * 4 * 7  # hero, event, openings, ... endings


def test_full_grammar_samples_are_injective_and_varied():
    seen: dict[str, tuple[int, ...]] = {}
    words = set()
    for text, _, path in StoryGrammar().sample_with_paths(3000, seed=0):
        assert seen.setdefault(text, path) == path
        words.update(text.split())
    assert len(seen) > 2990  # almost no repeats
    assert len(words) > 500  # a rich vocabulary
    a = [t for t, _ in StoryGrammar().sample(5, seed=1)]
    assert a == [t for t, _ in StoryGrammar().sample(5, seed=1)]
    assert a != [t for t, _ in StoryGrammar().sample(5, seed=2)]


def test_recorded_floor_is_exact(tmp_path):
    """meta.json's floor == sum(-log p(story)) / tokens over the split, with p from enumeration."""
    exact = enumerate_tiny()
    out = prepare_dataset(
        "stories",
        tmp_path / "tiny",
        stories_grammar="tiny",
        num_stories=300,
        tokenizer="char",
        verbose=False,
    )
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert ids[-1] == tok.eot_id
        neglogp, tokens, doc = 0.0, 0, []
        for i in ids:
            tokens += 1
            if i == tok.eot_id:
                neglogp -= exact[tok.decode(doc)]
                doc = []
            else:
                doc.append(i)
        key = "entropy_floor" if split == "val" else "entropy_floor_train"
        assert abs(meta[key] - neglogp / tokens) < 1e-9
    # and the sample floor estimates the true floor H(story) / E[tokens per story]
    H = -math.fsum(math.exp(lp) * lp for lp in exact.values())
    L = math.fsum(math.exp(lp) * (len(tok.encode(t)) + 1) for t, lp in exact.items())
    assert abs(meta["entropy_floor_train"] - H / L) < 0.05 * H / L


def test_entropy_floor_function():
    assert entropy_floor([-2.0, -4.0], [3, 3]) == 1.0

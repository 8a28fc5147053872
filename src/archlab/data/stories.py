"""Built-in ``stories``: children's stories from a probabilistic grammar, with exact log p.

A story is: an opening (the hero), one describing sentence, the meeting with a friend at a
place, 3 to 7 events (finds, dialogue, feelings, games, surprises) and an ending. Every random
decision goes through a :class:`Chooser`, which adds its log-probability, so each story comes
with the exact ``log p(choices)``. The grammar is written so that the map from choices to text
is injective (word lists of different slots are disjoint, every sentence template has its own
skeleton, the friend's name differs from the hero's, articles and pronouns are deterministic),
hence ``log p(choices) == log p(text)``; the tests check this exhaustively on a small lexicon and
by sampling on the full one. Were two choice paths ever to give one text, the recorded floor
would be an over-estimate (a weaker bound), never silently too low... see ``entropy_floor``.

The entropy floor of a token stream of independent stories, each followed by end-of-text, is
``sum(-log p(story)) / sum(tokens incl. end-of-text)`` nats per token: the stream is an
injective function of the stories, so its entropy is the sum of theirs. No model can average
below it (in expectation); models with a finite context sit above it.

The templates and word lists the grammar chooses from are ``stories_lexicon``.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .stories_lexicon import Lexicon

GRAMMAR_VERSION = 1  # bump with any change to the grammar or its lexicon (stories_lexicon)


# --------------------------------------------------------------------------------------
# Choosers: random sampling and exhaustive enumeration share the grammar code
# --------------------------------------------------------------------------------------


class Chooser:
    """Makes the grammar's decisions and accumulates their log-probability."""

    logp: float = 0.0
    path: list[int]

    def uniform(self, n: int) -> int:
        raise NotImplementedError

    def weighted(self, table: WeightTable) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class WeightTable:
    probs: tuple[float, ...]
    cum: tuple[float, ...] = field(init=False)
    logps: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        total = sum(self.probs)
        probs = tuple(p / total for p in self.probs)
        acc, cum = 0.0, []
        for p in probs:
            acc += p
            cum.append(acc)
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "cum", tuple(cum))
        object.__setattr__(self, "logps", tuple(math.log(p) for p in probs))


class RandomChooser(Chooser):
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.logp = 0.0
        self.path = []
        self._logn = [0.0] + [math.log(n) for n in range(1, 512)]

    def reset(self) -> None:
        self.logp = 0.0
        self.path = []

    def uniform(self, n: int) -> int:
        i = int(self.rng.random() * n)
        self.logp -= self._logn[n] if n < 512 else math.log(n)
        self.path.append(i)
        return i

    def weighted(self, table: WeightTable) -> int:
        i = min(bisect.bisect_right(table.cum, self.rng.random()), len(table.cum) - 1)
        self.logp += table.logps[i]
        self.path.append(i)
        return i


class ReplayChooser(Chooser):
    """Follows a forced prefix of choices, then takes option 0; records branching factors."""

    def __init__(self, prefix: list[int]) -> None:
        self.prefix = prefix
        self.path = []
        self.arity: list[int] = []
        self.logp = 0.0

    def _take(self, n: int) -> int:
        k = len(self.path)
        i = self.prefix[k] if k < len(self.prefix) else 0
        self.path.append(i)
        self.arity.append(n)
        return i

    def uniform(self, n: int) -> int:
        i = self._take(n)
        self.logp -= math.log(n)
        return i

    def weighted(self, table: WeightTable) -> int:
        i = self._take(len(table.probs))
        self.logp += table.logps[i]
        return i


# --------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------

_ARTICLE = "\x00"
_ARTICLE_CAP = "\x01"
_ARTICLE_RE = re.compile("([\x00\x01]) (.)")


def _fix_article(m: re.Match) -> str:
    an = m.group(2) in "aeiouAEIOU"
    word = ("an" if an else "a") if m.group(1) == _ARTICLE else ("An" if an else "A")
    return f"{word} {m.group(2)}"


def _compile(template: str) -> list[tuple[str, str | None]]:
    """Template -> [(literal, field or None)]."""
    return [(lit, name) for lit, name, _, _ in string.Formatter().parse(template)]


class StoryGrammar:
    """Generates stories with their exact log-probability (see the module docstring)."""

    def __init__(self, lexicon: Lexicon | None = None) -> None:
        self.lex = lexicon or Lexicon()
        lx = self.lex
        self._openings = [_compile(t) for t in lx.openings]
        self._descriptions = [_compile(t) for t in lx.descriptions]
        self._meetings = [_compile(t) for t in lx.meetings]
        self._events = [_compile(t) for t in lx.events]
        self._endings = [_compile(t) for t in lx.endings]
        self._n_events = sorted(lx.num_events)
        self._n_table = WeightTable(tuple(lx.num_events[k] for k in self._n_events))

    def _render(self, parts: list[tuple[str, str | None]], env: dict, c: Chooser) -> str:
        out = []
        fresh = self.lex.fresh
        for lit, name in parts:
            out.append(lit)
            if name is None:
                continue
            if name in env:
                out.append(env[name])
            else:
                words = fresh[name]
                out.append(words[c.uniform(len(words))])
        return "".join(out)

    def generate(self, c: Chooser) -> str:
        """One story; ``c.logp`` holds log p(story) afterwards."""
        lx = self.lex
        hero_i = c.uniform(len(lx.names))
        hero, pron = lx.names[hero_i]
        friend_i = c.uniform(len(lx.names) - 1)
        friend_i += friend_i >= hero_i  # any name but the hero's
        env = dict(pron)
        env.update(
            Hero=hero,
            Friend=lx.names[friend_i][0],
            species=lx.species[c.uniform(len(lx.species))],
            fspecies=lx.species[c.uniform(len(lx.species))],
            trait=lx.traits[c.uniform(len(lx.traits))],
            home=lx.homes[c.uniform(len(lx.homes))],
            place=lx.places[c.uniform(len(lx.places))],
            a=_ARTICLE,
            A=_ARTICLE_CAP,
        )
        sents = [
            self._render(self._openings[c.uniform(len(self._openings))], env, c),
            self._render(self._descriptions[c.uniform(len(self._descriptions))], env, c),
            self._render(self._meetings[c.uniform(len(self._meetings))], env, c),
        ]
        first = " ".join(sents)
        n = self._n_events[c.weighted(self._n_table)]
        events = [
            self._render(self._events[c.uniform(len(self._events))], env, c) for _ in range(n)
        ]
        ending = self._render(self._endings[c.uniform(len(self._endings))], env, c)
        text = first + "\n\n" + " ".join(events) + "\n\n" + ending
        return _ARTICLE_RE.sub(_fix_article, text)

    def sample(self, n: int, seed: int) -> Iterator[tuple[str, float]]:
        """``n`` stories ``(text, log p)`` from a seeded stream (same seed, same stories)."""
        c = RandomChooser(random.Random(f"archlab-stories-{seed}"))
        for _ in range(n):
            c.reset()
            text = self.generate(c)
            yield text, c.logp

    def sample_with_paths(self, n: int, seed: int) -> Iterator[tuple[str, float, tuple[int, ...]]]:
        c = RandomChooser(random.Random(f"archlab-stories-{seed}"))
        for _ in range(n):
            c.reset()
            text = self.generate(c)
            yield text, c.logp, tuple(c.path)

    def enumerate(self, limit: int = 1_000_000) -> Iterator[tuple[str, float, tuple[int, ...]]]:
        """Every story with its probability, depth-first (for small lexicons)."""
        prefix: list[int] = []
        for _ in range(limit):
            c = ReplayChooser(prefix)
            text = self.generate(c)
            yield text, c.logp, tuple(c.path)
            # odometer: advance the deepest choice that has options left
            path, arity = c.path, c.arity
            k = len(path) - 1
            while k >= 0 and path[k] + 1 >= arity[k]:
                k -= 1
            if k < 0:
                return
            prefix = path[:k] + [path[k] + 1]
        raise ValueError(f"grammar has more than {limit} stories")


def entropy_floor(logps: Sequence[float], token_counts: Sequence[int]) -> float:
    """Nats per token: total -log p over total tokens (both over the same stories)."""
    total = sum(token_counts)
    return -math.fsum(logps) / total if total else float("nan")

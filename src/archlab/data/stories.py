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
"""

from __future__ import annotations

import bisect
import math
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

GRAMMAR_VERSION = 1


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
# The lexicon
# --------------------------------------------------------------------------------------

HE = {"he": "he", "He": "He", "him": "him", "his": "his", "His": "His"}
SHE = {"he": "she", "He": "She", "him": "her", "his": "her", "His": "Her"}

# Sentence templates. Fields: bound per story (Hero, Friend, species, fspecies, trait, home,
# place, pronouns he/He/him/his/His of the hero) or drawn fresh at each use (FRESH below).
# "{a}" becomes "a" or "an" from the next word.
OPENINGS = (
    "Once upon a time, there was {a} {trait} {species} named {Hero}.",
    "Once upon a time, {a} {trait} {species} named {Hero} lived {home}.",
    "There once was {a} {trait} {species} called {Hero}.",
    "Long ago, {home}, there lived {a} {trait} {species} named {Hero}.",
    "{Hero} was {a} {trait} {species} who lived {home}.",
)
DESCRIPTIONS = (
    "{He} loved to {hobby}.",
    "Every day, {he} liked to {hobby} with {his} {color} {toy}.",
    "{His} favorite food was {food}.",
    "{He} had {a} {color} {toy} that {he} took everywhere.",
    "More than anything, {he} wanted to {wish}.",
    "{He} was small, but {he} was very brave.",
)
MEETINGS = (
    "One {time}, {Hero} went to the {place} with {his} friend {Friend}, {a} {fspecies}.",
    "One {time}, {Hero} met {a} {fspecies} named {Friend} at the {place}.",
    "One {time}, {Hero} and {his} friend {Friend} the {fspecies} walked to the {place}.",
    "On {a} {weather} {time}, {Hero} saw {a} {fspecies} named {Friend} near the {place}.",
)
EVENTS = (
    "{Hero} found {a} {adj} {object} near the {spot}.",
    '"{line}" said {Friend}.',
    '"{question}" asked {Hero}.',
    '{Friend} smiled and said, "{answer}"',
    "{Hero} felt {feeling} because {reason}.",
    "Suddenly, {Hero} heard {a} {sound} coming from the {spot}.",
    "{Hero} and {Friend} played {game} until the sun went down.",
    "Then they ate some {food} together.",
    "The sky turned {color} and the air felt {air}.",
    "{Friend} gave {Hero} {a} {color} {toy} as a gift.",
    "{Hero} wanted to {wish}, but {he} was too {limit}.",
    "{Hero} tried to {task}, but it was very hard.",
    "Together, they decided to {task}.",
    "{Hero} looked at {Friend} and felt {feeling}.",
    "They ran to the {spot} as fast as they could.",
    '{A} {adj} {animal} came out of the {spot} and said, "{line}"',
    "{Friend} showed {Hero} how to {hobby}.",
)
ENDINGS = (
    "In the end, {Hero} and {Friend} were very {glad}.",
    "From that day on, {Hero} and {Friend} were best friends.",
    "From that day on, {Hero} always remembered to {habit}.",
    "{Hero} learned that {moral}.",
    "That night, {Hero} went to sleep with a big smile.",
    "It was the best {time} ever, and {Hero} never forgot it.",
    "And so, {Hero} went home feeling {glad}.",
)
NUM_EVENTS = {3: 0.2, 4: 0.3, 5: 0.25, 6: 0.15, 7: 0.1}

_BOYS = "Tom Ben Max Sam Leo Jack Tim Finn Noah Jake Oscar Hugo Dan Bob Eli Otto Ray Ned".split()
_GIRLS = (
    "Lily Mia Sue Anna Lucy Emma Zoe Ruby Ella Amy Rose Ivy Kim Lola Nora Pia Tess Gwen".split()
)
NAMES = tuple(x for b, g in zip(_BOYS, _GIRLS, strict=True) for x in ((b, HE), (g, SHE)))
SPECIES = (
    "cat", "dog", "rabbit", "bear", "fox", "mouse", "duck", "frog", "owl", "lion",
    "turtle", "squirrel", "pig", "horse", "cow", "goat", "sheep", "hen", "bird", "fish",
    "puppy", "kitten", "elephant", "monkey", "tiger", "deer", "hedgehog", "penguin",
    "dragon", "robot", "unicorn", "boy", "girl",
)  # fmt: skip
TRAITS = (
    "little", "kind", "curious", "brave", "shy", "happy", "clever", "funny", "gentle",
    "silly", "busy", "sleepy", "tiny", "friendly", "playful", "quiet", "proud", "lazy",
    "smart", "helpful", "cheerful", "careful", "young", "old", "strong", "fluffy",
)  # fmt: skip
HOMES = (
    "in a small house by the sea", "near a big forest", "on a quiet farm", "in a busy town",
    "in a cozy hole under a tree", "at the top of a green hill", "next to a sparkling river",
    "in a tall tower", "in a little village", "under a bridge", "in a warm nest",
    "behind an old barn", "in a yellow house", "near the mountains", "by a blue lake",
    "in a garden full of flowers", "in a big city", "on a tiny island",
)  # fmt: skip
PLACES = (
    "park", "beach", "forest", "lake", "garden", "market", "zoo", "school", "library",
    "pond", "farm", "river", "hill", "playground", "castle", "bakery", "meadow", "cave",
    "field", "harbor", "museum", "circus", "fair", "orchard", "swamp", "valley",
)  # fmt: skip
SPOTS = (
    "big tree", "old fence", "tall grass", "bushes", "rocks", "little bridge", "water",
    "sand", "flowers", "hole", "box", "wall", "stairs", "basket", "window", "door",
)  # fmt: skip
OBJECTS = (
    "shell", "stone", "feather", "key", "coin", "leaf", "map", "hat", "shoe", "bell",
    "ribbon", "cup", "book", "button", "acorn", "star", "ring", "stick", "jar", "letter",
    "egg", "flower", "umbrella", "lamp", "spoon", "sock", "bottle", "pebble", "crown", "rope",
)  # fmt: skip
ADJS = (
    "shiny", "strange", "tiny", "huge", "pretty", "broken", "soft", "heavy", "magic",
    "golden", "dusty", "smooth", "round", "wet", "warm", "funny", "secret", "bright",
)  # fmt: skip
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown", "gray", "gold")  # fmt: skip
TOYS = ("ball", "kite", "teddy", "drum", "boat", "car", "doll", "train", "balloon", "blanket", "bike", "scarf")  # fmt: skip
FOODS = (
    "apples", "cookies", "soup", "bread", "cheese", "carrots", "honey", "cake", "berries",
    "pancakes", "grapes", "pie", "rice", "ice cream", "bananas", "nuts", "muffins", "pears",
)  # fmt: skip
FEELINGS = (
    "happy", "sad", "scared", "excited", "proud", "angry", "surprised", "calm", "lonely",
    "curious", "nervous", "silly", "brave", "tired", "hopeful", "grumpy",
)  # fmt: skip
GLAD = ("happy", "proud", "glad", "thankful", "calm", "tired but happy")
HOBBIES = (
    "sing songs", "draw pictures", "read books", "dance", "build towers", "climb trees",
    "jump in puddles", "count the stars", "bake cakes", "paint", "swim", "run fast",
    "play games", "look at clouds", "collect leaves", "tell jokes", "plant seeds", "hum",
)  # fmt: skip
WISHES = (
    "fly", "see the sea", "touch the moon", "find a treasure", "win a race", "make a friend",
    "visit the city", "ride a train", "grow tall", "catch a fish", "learn to whistle",
    "climb the big hill",
)  # fmt: skip
TIMES = ("day", "morning", "afternoon", "evening", "night", "spring day", "summer day", "winter day")  # fmt: skip
WEATHER = ("sunny", "rainy", "windy", "snowy", "cloudy", "warm", "cold", "foggy")
SOUNDS = (
    "loud bang", "soft song", "funny noise", "tiny squeak", "big splash", "quiet buzz",
    "happy laugh", "strange whistle", "low growl", "sad cry",
)  # fmt: skip
GAMES = ("hide and seek", "tag", "catch", "ball", "chase", "jump rope", "pretend", "leapfrog")
AIR = ("cool", "warm", "fresh", "wet", "still", "sweet")
LIMITS = ("small", "tired", "scared", "slow", "young", "hungry")
TASKS = (
    "fix the fence", "build a raft", "climb the wall", "open the box", "cross the river",
    "find the way home", "carry the basket", "dig a hole", "reach the top shelf",
    "make a sandcastle", "help a little bird", "clean the garden", "look for the lost key",
)  # fmt: skip
ANIMALS = ("frog", "snail", "beetle", "crab", "bee", "butterfly", "mole", "worm", "bat", "ladybug")  # fmt: skip
REASONS = (
    "the sun was warm", "the wind was loud", "it started to rain", "the day was bright",
    "the path was long", "the night was dark", "the birds were singing", "a storm was coming",
    "the flowers smelled sweet", "the water was cold",
)  # fmt: skip
LINES = (
    "Look at that!", "Let us play!", "I am so hungry.", "This is fun!", "Wait for me!",
    "I can help you.", "Do not be afraid.", "We did it!", "What a nice day.",
    "I have an idea.", "Be careful!", "Follow me!", "I like it here.", "That was close!",
    "Thank you, friend.", "I want to try.", "It is too far.", "Let us go home.",
    "I am not scared.", "You are so kind.",
)  # fmt: skip
QUESTIONS = (
    "What is that?", "Where are we going?", "Can you help me?", "Do you want to play?",
    "Who lives here?", "Why is the sky so dark?", "How did you do that?",
    "Is it safe?", "Are you hungry?", "Can we go now?", "What should we do?",
    "Will you be my friend?",
)  # fmt: skip
ANSWERS = (
    "Yes, of course!", "I do not know.", "Let us find out.", "Maybe later.",
    "It is a surprise.", "Follow the path.", "Do not worry.", "I will show you.",
    "We can do it together.", "Not today.",
)  # fmt: skip
HABITS = (
    "share", "say thank you", "be kind", "help others", "ask for help", "tell the truth",
    "clean up", "listen", "be patient", "try again",
)  # fmt: skip
MORALS = (
    "sharing makes everyone happy", "friends help each other", "it is good to be brave",
    "being kind is important", "trying again is how you learn", "the truth is always best",
    "even small friends can do big things", "patience pays off", "it is fun to try new things",
    "home is the best place",
)  # fmt: skip

FRESH = {
    "object": OBJECTS, "adj": ADJS, "color": COLORS, "toy": TOYS, "food": FOODS,
    "feeling": FEELINGS, "glad": GLAD, "hobby": HOBBIES, "wish": WISHES, "time": TIMES,
    "weather": WEATHER, "sound": SOUNDS, "game": GAMES, "air": AIR, "limit": LIMITS,
    "task": TASKS, "animal": ANIMALS, "reason": REASONS, "line": LINES, "question": QUESTIONS,
    "answer": ANSWERS, "habit": HABITS, "moral": MORALS, "spot": SPOTS,
}  # fmt: skip


@dataclass(frozen=True)
class Lexicon:
    """Everything the grammar chooses from; ``tiny()`` is small enough to enumerate."""

    names: tuple = NAMES
    species: tuple = SPECIES
    traits: tuple = TRAITS
    homes: tuple = HOMES
    places: tuple = PLACES
    fresh: dict = field(default_factory=lambda: dict(FRESH))
    openings: tuple = OPENINGS
    descriptions: tuple = DESCRIPTIONS
    meetings: tuple = MEETINGS
    events: tuple = EVENTS
    endings: tuple = ENDINGS
    num_events: dict = field(default_factory=lambda: dict(NUM_EVENTS))

    @classmethod
    def tiny(cls) -> Lexicon:
        """A few hundred stories in all: for tests that enumerate every story."""
        fresh = {k: v[:1] for k, v in FRESH.items()}
        fresh["feeling"] = FEELINGS[:2]
        return cls(
            names=NAMES[:3],
            species=SPECIES[:2],
            traits=TRAITS[:1],
            homes=HOMES[:1],
            places=PLACES[:1],
            fresh=fresh,
            openings=OPENINGS[:2],
            descriptions=DESCRIPTIONS[:1],
            meetings=MEETINGS[1:2],
            events=(EVENTS[4], EVENTS[7], EVENTS[13]),
            endings=ENDINGS[:2],
            num_events={1: 0.7, 2: 0.3},
        )


LEXICONS = {"full": Lexicon, "tiny": Lexicon.tiny}

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

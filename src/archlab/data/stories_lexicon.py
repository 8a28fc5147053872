"""The lexicon of the built-in ``stories`` grammar: sentence templates and word lists.

What ``stories.StoryGrammar`` chooses from. The lists are written so that the grammar's map
from choices to text stays injective (see ``stories``): word lists of different slots are
disjoint and every template has its own skeleton. Changing any list changes the corpus:
bump ``stories.GRAMMAR_VERSION`` with it. ``Lexicon.tiny()`` is small enough to enumerate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

"""A generated corpus of children's stories whose entropy per character is known exactly.

Every story is written by one small program (`tell_story`) that makes random choices and emits
text. The same program is run by three interpreters:

* `_Sampler` makes the choices at random and adds up their surprisal, −log2 p, in bits;
* `_Parser` makes every choice in turn against a given text and counts the derivations that
  produce it: exactly one for every story, so p(story) is the product of its choices' probabilities;
* `_Expectation` runs each sentence template over all of its choices, with the story's
  characters and things standing for their mean lengths, and combines the templates through
  the Markov chain of events in closed form: the exact expected bits and characters of a story.

Their ratio is the entropy rate of the corpus in bits per character, the floor that no model of
this text can go below, and that every loss curve in the book is plotted against. Stories
repeat their characters, pet, place and favourite thing many sentences apart, which a model
must remember and an n-gram cannot: a character 5-gram stays far above the floor.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "STORY_GRAMMAR_VERSION",
    "StoryStats",
    "cast_of",
    "count_derivations",
    "entropy",
    "sample_stories",
    "stories",
]

STORY_GRAMMAR_VERSION = 1

GIRLS = (
    "Mia",
    "Lily",
    "Emma",
    "Zoe",
    "Ava",
    "Lucy",
    "Nora",
    "Ella",
    "Ruby",
    "Rosa",
    "Maya",
    "Ivy",
    "Hana",
    "Sara",
    "Alice",
    "Grace",
    "Clara",
    "Daisy",
    "Olive",
    "Pia",
)
BOYS = (
    "Tom",
    "Ben",
    "Sam",
    "Leo",
    "Max",
    "Jack",
    "Finn",
    "Noah",
    "Omar",
    "Theo",
    "Hugo",
    "Luca",
    "Eli",
    "Kai",
    "Owen",
    "Ravi",
    "Timo",
    "Jonas",
    "Felix",
    "Oscar",
)
NAMES = GIRLS + BOYS
PLACES = (
    "park",
    "forest",
    "beach",
    "garden",
    "library",
    "farm",
    "market",
    "river",
    "school",
    "zoo",
    "hill",
    "lake",
)
PETS = ("dog", "cat", "rabbit", "duck", "frog", "owl", "fox", "turtle", "mouse", "bird")
THINGS = (
    "ball",
    "kite",
    "book",
    "hat",
    "box",
    "shell",
    "drum",
    "cup",
    "lamp",
    "key",
    "map",
    "boat",
    "coin",
    "sock",
    "bell",
    "doll",
)
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown")
FEELINGS = ("happy", "sad", "scared", "excited", "tired", "proud", "surprised", "angry")
SPOTS = ("tree", "rock", "bench", "bed", "table", "bush")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm")


class _Sym:
    """A value known only by its mean length (the expectation interpreter's stand-in)."""

    def __init__(self, mean_len: float) -> None:
        self.mean_len = mean_len


Text = str | _Sym


def _mean_len(values: Sequence[str]) -> float:
    return sum(map(len, values)) / len(values)


# --------------------------------------------------------------------------------------------
# The story program. `g` is an interpreter: g.choose(options, probs) returns one option,
# g.pick(values) a uniformly chosen entity, g.emit(text) writes text.


@dataclass
class _Cast:
    hero: Text
    friend: Text
    pronoun: Text  # "She"/"He", fixed by the hero
    kind: Text  # "girl"/"boy"
    place: Text
    pet: Text
    color: Text
    thing: Text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _subject(g: Any, c: _Cast) -> Text:
    """The hero by name or by pronoun (the friend is always named: no ambiguous 'she')."""
    return g.choose((c.hero, c.pronoun))


def _opening(g: Any) -> _Cast:
    hero = g.pick(NAMES)
    girl = g.derive(hero, lambda h: h in GIRLS, p_true=len(GIRLS) / len(NAMES))
    kind = g.const("girl", "boy", girl)
    pronoun = g.const("She", "He", girl)
    form = g.choose(("once", "there", "long"))
    if form == "once":
        g.emit("Once upon a time, there was a ", kind, " named ", hero, ".")
    elif form == "there":
        g.emit("There once was a ", kind, " called ", hero, ".")
    else:
        g.emit("Long ago, a ", kind, " named ", hero, " lived in a small town.")
    weather = g.choose(WEATHER)
    g.emit(" It was a ", weather, " day.")
    g.emit(" ", hero, " had a ")
    pet = g.pick(PETS)
    g.emit(pet, " and a ")
    color = g.pick(COLORS)
    g.emit(color, " ")
    thing = g.pick(THINGS)
    g.emit(thing, ". ", hero, " liked to go to the ")
    place = g.pick(PLACES)
    g.emit(place, ". ", pronoun, " had a best friend called ")
    friend = g.pick_other(NAMES, hero)
    g.emit(friend, ".")
    return _Cast(hero, friend, pronoun, kind, place, pet, color, thing)


def _go(g: Any, c: _Cast) -> None:
    g.emit(_subject(g, c), " went to the ", c.place)
    if g.choose((True, False)):
        g.emit(" with ", c.friend)
    g.emit(".")


def _find(g: Any, c: _Cast) -> None:
    color = g.choose(COLORS)
    g.emit(_subject(g, c), " found ", g.map(color, _article, {"an": 1 / 8}), " ", color, " ")
    g.emit(g.choose(THINGS), " under a ", g.choose(SPOTS), ".")


def _lose(g: Any, c: _Cast) -> None:
    g.emit("Oh no! ", _subject(g, c), " lost the ", c.color, " ", c.thing, ".")


def _say(g: Any, c: _Cast) -> None:
    g.emit('"')
    quote = g.choose(("like", "play", "where", "feel"))
    if quote == "like":
        g.emit("I like your ", c.color, " ", c.thing, ", ", c.hero, "!")
    elif quote == "play":
        g.emit("Let us play at the ", c.place, "!")
    elif quote == "where":
        g.emit("Where is your ", c.pet, "?")
    else:
        g.emit("I feel ", g.choose(FEELINGS), " today,")
    g.emit('" said ', c.friend, ".")


def _feel(g: Any, c: _Cast) -> None:
    g.emit(_subject(g, c), " felt ", g.choose(FEELINGS), ".")


def _play(g: Any, c: _Cast) -> None:
    g.emit(c.hero, " and ", c.friend, " played with the ")
    g.emit(g.choose((c.pet, c.thing)), " all afternoon.")


def _help(g: Any, c: _Cast) -> None:
    g.emit(c.friend, " helped ", c.hero, " look for the ", c.thing, ". They found it near the ")
    g.emit(g.choose(SPOTS), ".")


EVENTS: tuple[Callable[[Any, _Cast], None], ...] = (_go, _find, _lose, _say, _feel, _play, _help)
# First event, and the Markov chain from each event to the next (last column: the story ends).
START = np.array([0.35, 0.15, 0.1, 0.15, 0.1, 0.15, 0.0])
NEXT = np.array(
    [
        # go    find  lose  say   feel  play  help  END
        [0.05, 0.20, 0.15, 0.20, 0.10, 0.15, 0.00, 0.15],  # after go
        [0.15, 0.05, 0.10, 0.25, 0.20, 0.10, 0.00, 0.15],  # after find
        [0.00, 0.00, 0.00, 0.20, 0.30, 0.00, 0.50, 0.00],  # after lose: someone helps, or not yet
        [0.20, 0.10, 0.10, 0.10, 0.15, 0.20, 0.00, 0.15],  # after say
        [0.15, 0.10, 0.10, 0.25, 0.05, 0.15, 0.00, 0.20],  # after feel
        [0.10, 0.10, 0.15, 0.20, 0.15, 0.05, 0.00, 0.25],  # after play
        [0.15, 0.05, 0.00, 0.25, 0.20, 0.15, 0.00, 0.20],  # after help
    ]
)
ENDINGS = ("happy", "tired", "proud")


def tell_story(g: Any) -> None:
    """The whole story: an opening that introduces everyone, a chain of events, an ending."""
    cast = _opening(g)
    event = g.choose(range(len(EVENTS)), START)
    while event < len(EVENTS):
        g.emit(" ")
        EVENTS[event](g, cast)
        event = g.choose(range(len(EVENTS) + 1), NEXT[event])
    g.emit(" In the end, ", cast.hero, " and ", cast.friend, " were ", g.choose(ENDINGS))
    g.emit(". The end.\n")


# --------------------------------------------------------------------------------------------
# Interpreter 1: sampling, with the surprisal of every choice.


class _Sampler:
    def __init__(self, rng: random.Random) -> None:
        self.rng, self.parts, self.bits = rng, [], 0.0

    def choose(self, options: Sequence, probs: Sequence[float] | None = None) -> Any:
        options = list(options)
        if probs is None:
            self.bits += math.log2(len(options))
            return options[self.rng.randrange(len(options))]
        i = self.rng.choices(range(len(options)), weights=probs)[0]
        self.bits -= math.log2(probs[i])
        return options[i]

    def pick(self, values: Sequence[str]) -> str:
        return self.choose(values)

    def pick_other(self, values: Sequence[str], taken: str) -> str:
        return self.choose([v for v in values if v != taken])

    def derive(self, value: str, rule: Callable[[str], bool], p_true: float) -> bool:
        return rule(value)

    def const(self, if_true: str, if_false: str, flag: bool) -> str:
        return if_true if flag else if_false

    def map(self, value: str, fn: Callable[[str], str], dist: dict[str, float]) -> str:
        return fn(value)

    def emit(self, *texts: Text) -> None:
        self.parts.extend(texts)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Interpreter 2: counting the derivations of a given text (depth-first, by replaying choices).


class _Mismatch(Exception):
    pass


class _Branch(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


class _Replay:
    """Follows a forced path of choice indices; a choice beyond the path raises `_Branch`."""

    def __init__(self, prefix: list[int]) -> None:
        self.prefix, self.made = prefix, 0

    def _next_index(self, options: int) -> int:
        if self.made == len(self.prefix):
            raise _Branch(options)
        self.made += 1
        return self.prefix[self.made - 1]


def _complete_runs(
    make: Callable[[list[int]], _Replay], program: Callable[[Any], None]
) -> Iterator[Any]:
    """Every run of `program` that gets to its end, depth first over all choice paths."""
    stack: list[list[int]] = [[]]
    while stack:
        prefix = stack.pop()
        g = make(prefix)
        try:
            program(g)
        except _Branch as branch:
            stack.extend([*prefix, i] for i in reversed(range(branch.n)))
            continue
        except _Mismatch:
            continue
        yield g


class _Parser(_Replay):
    def __init__(self, text: str, prefix: list[int]) -> None:
        super().__init__(prefix)
        self.text, self.pos = text, 0

    def choose(self, options: Sequence, probs: Sequence[float] | None = None) -> Any:
        options = list(options)
        i = self._next_index(len(options))
        if probs is not None and probs[i] == 0:
            raise _Mismatch
        return options[i]

    def pick(self, values: Sequence[str]) -> str:
        return self.choose(values)

    def pick_other(self, values: Sequence[str], taken: str) -> str:
        return self.choose([v for v in values if v != taken])

    derive = _Sampler.derive
    const = _Sampler.const
    map = _Sampler.map

    def emit(self, *texts: Text) -> None:
        for text in texts:
            assert isinstance(text, str)
            if not self.text.startswith(text, self.pos):
                raise _Mismatch
            self.pos += len(text)


def count_derivations(text: str, limit: int = 2) -> int:
    """How many ways the grammar can produce `text` (stops counting at `limit`)."""
    found = 0
    for run in _complete_runs(lambda prefix: _Parser(text, prefix), tell_story):
        found += run.pos == len(text)
        if found >= limit:
            break
    return found


def is_story(text: str) -> bool:
    """Whether the grammar derives `text`, a story as generated text comes (its closing
    newline, which `slmlab.distill.teacher_texts` strips, optional): an exact checker of
    synthetic stories (chapter 07)."""
    return count_derivations(text if text.endswith("\n") else text + "\n", limit=1) == 1


# --------------------------------------------------------------------------------------------
# Interpreter 3: exact expectations. Each template is enumerated over its own choices; the
# cast is symbolic (mean lengths); the Markov chain of events is solved in closed form.


class _Expectation(_Replay):
    """Runs one piece of the program along one path of choices, forced by `prefix`."""

    def __init__(self, prefix: list[int]) -> None:
        super().__init__(prefix)
        self.prob, self.bits, self.length = 1.0, 0.0, 0.0

    def choose(self, options: Sequence, probs: Sequence[float] | None = None) -> Any:
        options = list(options)
        i = self._next_index(len(options))
        p = 1 / len(options) if probs is None else probs[i]
        if p == 0:
            raise _Mismatch
        self.prob *= p
        return options[i]

    def pick(self, values: Sequence[str]) -> _Sym:
        # A uniform entity: log2(n) bits, and its mean length (its marginal is uniform).
        self.bits += math.log2(len(values))
        return _Sym(_mean_len(values))

    def pick_other(self, values: Sequence[str], taken: _Sym) -> _Sym:
        # Uniform over the others; by symmetry its marginal is still uniform over all values.
        self.bits += math.log2(len(values) - 1)
        return _Sym(_mean_len(values))

    def derive(self, value: _Sym, rule: Callable[[str], bool], p_true: float) -> float:
        return p_true

    def const(self, if_true: str, if_false: str, p_true: float) -> _Sym:
        return _Sym(p_true * len(if_true) + (1 - p_true) * len(if_false))

    def map(self, value: str, fn: Callable[[str], str], dist: dict[str, float]) -> str:
        return fn(value)

    def emit(self, *texts: Text) -> None:
        for text in texts:
            self.length += text.mean_len if isinstance(text, _Sym) else len(text)


def _expect(piece: Callable[[Any], None]) -> tuple[float, float]:
    """Exact (expected bits, expected characters) of one piece of the program."""
    bits = length = mass = 0.0
    for g in _complete_runs(_Expectation, piece):
        bits += g.prob * (g.bits - math.log2(g.prob))
        length += g.prob * g.length
        mass += g.prob
    assert abs(mass - 1) < 1e-9, f"the paths of {piece} carry probability {mass}, not 1"
    return bits, length


def _symbolic_cast() -> _Cast:
    girls = len(GIRLS) / len(NAMES)
    return _Cast(
        hero=_Sym(_mean_len(NAMES)),
        friend=_Sym(_mean_len(NAMES)),
        pronoun=_Sym(girls * 3 + (1 - girls) * 2),
        kind=_Sym(girls * 4 + (1 - girls) * 3),
        place=_Sym(_mean_len(PLACES)),
        pet=_Sym(_mean_len(PETS)),
        color=_Sym(_mean_len(COLORS)),
        thing=_Sym(_mean_len(THINGS)),
    )


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class StoryStats:
    """Exact statistics of the story distribution."""

    bits_per_story: float
    chars_per_story: float
    events_per_story: float

    @property
    def bits_per_char(self) -> float:
        """The entropy rate of a stream of stories: the floor of any model's loss, in bits."""
        return self.bits_per_story / self.chars_per_story

    @property
    def nats_per_char(self) -> float:
        return self.bits_per_char * math.log(2)


def entropy() -> StoryStats:
    """The exact entropy of the story grammar, per story and per character."""
    cast = _symbolic_cast()
    bits, length = _expect(lambda g: _opening(g))
    per_event = [_expect(lambda g, e=e: e(g, cast)) for e in EVENTS]
    # Expected visits to each event: start · (I − Q)⁻¹, Q the event-to-event block of NEXT.
    q = NEXT[:, : len(EVENTS)]
    visits = START @ np.linalg.inv(np.eye(len(EVENTS)) - q)
    bits += _entropy_bits(START)
    for v, (event_bits, event_len), row in zip(visits, per_event, NEXT, strict=True):
        bits += v * (event_bits + _entropy_bits(row))
        length += v * (event_len + 1)  # + the space before each event
    end_bits, end_len = _expect(
        lambda g: g.emit(
            " In the end, ",
            cast.hero,
            " and ",
            cast.friend,
            " were ",
            g.choose(ENDINGS),
            ". The end.\n",
        )
    )
    return StoryStats(bits + end_bits, length + end_len, float(visits.sum()))


# --------------------------------------------------------------------------------------------
# The corpus.


def sample_stories(n: int, seed: int = 0) -> list[tuple[str, float]]:
    """`n` stories with their exact surprisal in bits, deterministic for a `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        g = _Sampler(rng)
        tell_story(g)
        out.append(("".join(g.parts), g.bits))  # type: ignore[arg-type]
    return out


def stories(n: int, seed: int = 0) -> Iterator[str]:
    """`n` stories (each ends with a newline), deterministic for a `seed`."""
    for text, _ in sample_stories(n, seed):
        yield text


# --------------------------------------------------------------------------------------------
# Reading a story back: its cast, from the opening every story starts with.

_OPENING = re.compile(
    r"(?:named|called) (?P<hero>\w+)[ .].*? It was an? (?P<weather>\w+) day\. .*? had an? "
    r"(?P<pet>\w+) and an? (?P<color>\w+) (?P<thing>\w+)\. .*?liked to go to the "
    r"(?P<place>\w+)\. .*?best friend called (?P<friend>\w+)\."
)


def cast_of(story: str) -> tuple[dict[str, str], int]:
    """The opening's cast (``hero``, ``weather``, ``pet``, ``color``, ``thing``, ``place``,
    ``friend``) and the index where the opening ends."""
    match = _OPENING.search(story)
    if match is None:
        raise ValueError(f"not a story of this grammar: {story[:80]!r}")
    return match.groupdict(), match.end()

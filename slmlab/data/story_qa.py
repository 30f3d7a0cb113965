"""Questions about stories, with answers the grammar knows: instruction data that checks itself.

Each example is a story from the grammar and one question about it: who the best friend is,
which pet, which thing, its colour, the place, the weather, how the story ends, and whether the
thing got lost (which needs the story's middle, not its opening). The answer is a short sentence
that states the fact in the story's own words ("The best friend is Ivy."), so that a story model
writes it with tokens it knows: a bare "Ivy" at the start of a reply would be spelt with pieces
it has never produced, since every name in its stories follows a space. Because every answer is
known, a reply is scored exactly, and a wrong one is of two kinds: it names something the story
does say (a confusion: the hero for the friend), or something it never says (a hallucination).
`score_answers` counts both.

`preference_pairs` gives the data of preference tuning: a question, its right answer (chosen)
and a wrong one in the same words (rejected), which names what the story never says: the
hallucination the model is to unlearn.

Splits are seeds: `SPLIT_SEEDS` keeps training, validation and test stories apart from each
other and from the pre-training corpus (seeds 1 and 2) and the evaluation suites (9001).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .story_grammar import (
    COLORS,
    ENDINGS,
    NAMES,
    PETS,
    PLACES,
    THINGS,
    WEATHER,
    cast_of,
    stories,
)

__all__ = [
    "ANSWER_WORDS",
    "QUESTION_KINDS",
    "SPLIT_SEEDS",
    "QAExample",
    "hallucinated",
    "preference_pairs",
    "qa_conversations",
    "qa_examples",
    "question_about",
    "score_answers",
    "wrong_answer",
]

SPLIT_SEEDS = {"train": 11, "validation": 12, "test": 13}

# The question of each kind and its answer, written with the story's cast.
QUESTIONS = {
    "friend": ("Who is {hero}'s best friend?", "The best friend is {friend}."),
    "pet": ("What pet does {hero} have?", "It is a {pet}."),
    "thing": ("What {color} thing does {hero} have?", "It is a {thing}."),
    "color": ("What color is {hero}'s {thing}?", "The {thing} is {color}."),
    "place": ("Where does {hero} like to go?", "It is the {place}."),
    "weather": ("What was the day like?", "It was a {weather} day."),
    "ending": ("How were {hero} and {friend} in the end?", "They were {ending}."),
    "lost": ("Did {hero} lose the {thing}?", "{lost}"),
}
QUESTION_KINDS = tuple(QUESTIONS)

# Every word a story can name: a reply naming one of them that its story never says is made up.
_STORY_WORDS = frozenset(
    w.lower() for w in (*NAMES, *PLACES, *PETS, *THINGS, *COLORS, *WEATHER, *ENDINGS)
)
_ENDING = re.compile(r" were (\w+)\. The end\.")


@dataclass(frozen=True)
class QAExample:
    """A story, a question about it, and the answer the story gives."""

    story: str
    question: str
    answer: str
    kind: str

    def prompt(self) -> str:
        """The user's turn: the story, then the question on its own line."""
        return f"{self.story.rstrip()}\n{self.question}"

    def messages(self, *, with_answer: bool = True) -> list[dict[str, str]]:
        """The example as a conversation (``{"role", "content"}`` turns), as chat data is."""
        turns = [{"role": "user", "content": self.prompt()}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns


def _facts(story: str) -> dict[str, str]:
    """What the questions ask about `story`: its opening's cast, its ending, and whether the
    thing got lost (anywhere in the story)."""
    cast, _ = cast_of(story)
    cast["ending"] = _ENDING.search(story).group(1)  # type: ignore[union-attr]
    lost = f" lost the {cast['color']} {cast['thing']}." in story
    cast["lost"] = f"Yes, {cast['hero']} lost it." if lost else f"No, {cast['hero']} did not."
    return cast


def question_about(story: str, kind: str) -> QAExample:
    """The question of `kind` (one of `QUESTION_KINDS`) about `story`, with its answer."""
    if kind not in QUESTIONS:
        raise ValueError(f"kind must be one of {list(QUESTION_KINDS)}, got {kind!r}")
    facts = _facts(story)
    question, answer = QUESTIONS[kind]
    return QAExample(story, question.format(**facts), answer.format(**facts), kind)


# The words an answer of each kind names, and a wrong answer draws from.
ANSWER_WORDS = {
    "friend": NAMES,
    "pet": PETS,
    "thing": THINGS,
    "color": COLORS,
    "place": PLACES,
    "weather": WEATHER,
    "ending": ENDINGS,
}


def wrong_answer(example: QAExample, rng: random.Random) -> str:
    """An answer to `example`'s question in the right words with the wrong fact: a word of the
    same kind that the story never says (a hallucination), the other ending, or the opposite
    yes or no."""
    facts = _facts(example.story)
    kind = example.kind
    if kind == "lost":
        hero = facts["hero"]
        return (
            f"No, {hero} did not." if facts["lost"].startswith("Yes") else f"Yes, {hero} lost it."
        )
    said = {w.lower() for w in re.findall(r"\w+", example.story)}
    unsaid = [w for w in ANSWER_WORDS[kind] if w.lower() not in said]
    if kind == "ending":  # an ending word may be said as a feeling; any other ending is wrong
        unsaid = [w for w in ENDINGS if w != facts["ending"]]
    wrong = {**facts, kind: rng.choice(unsaid)}
    return QUESTIONS[kind][1].format(**wrong)


def preference_pairs(
    n: int,
    split: str = "train",
    *,
    kinds: Sequence[str] = QUESTION_KINDS,
    keep: Callable[[QAExample], bool] | None = None,
) -> list[dict[str, list[dict[str, str]]]]:
    """`n` preference pairs of `split`, in the conversational shape TRL reads:
    ``{"prompt": [user turn], "chosen": [right reply], "rejected": [wrong reply]}``, the
    wrong reply from `wrong_answer`. `kinds` and `keep` are `qa_examples`'."""
    rng = random.Random(f"story-qa-preference-{SPLIT_SEEDS.get(split, split)}")
    pairs = []
    for example in qa_examples(n, split, kinds=kinds, keep=keep):
        prompt = example.messages(with_answer=False)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": example.answer}],
                "rejected": [{"role": "assistant", "content": wrong_answer(example, rng)}],
            }
        )
    return pairs


def qa_examples(
    n: int,
    split: str = "train",
    *,
    kinds: Sequence[str] = QUESTION_KINDS,
    keep: Callable[[QAExample], bool] | None = None,
) -> list[QAExample]:
    """`n` examples of `split` (``train``, ``validation``, ``test``), a question of a kind drawn
    uniformly from `kinds` for each story; `keep` skips the examples it refuses (those too long
    for a model's context, say). The same arguments give the same examples."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    unknown = [k for k in kinds if k not in QUESTIONS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be among {list(QUESTION_KINDS)}, got {list(kinds)!r}")
    seed = SPLIT_SEEDS[split]
    rng = random.Random(f"story-qa-{seed}")
    found: list[QAExample] = []
    for batch in range(20):
        for story in stories(max(n, 1000), seed=seed + 1000 * batch):
            example = question_about(story, rng.choice(list(kinds)))
            if keep is None or keep(example):
                found.append(example)
                if len(found) == n:
                    return found
    raise ValueError(f"keep refused nearly every story: only {len(found)} of {n} examples found")


def qa_conversations(
    n: int,
    split: str = "train",
    *,
    questions: int = 4,
    keep: Callable[[list[dict[str, str]]], bool] | None = None,
) -> list[list[dict[str, str]]]:
    """`n` conversations of `split`, each a story and up to `questions` questions about it of
    different kinds in a random order, one a turn (the story comes with the first): a story
    read once teaches several answers. Where `keep` refuses a conversation (too long for a
    model's context, say), its last questions are dropped until it keeps it, and a story it
    refuses even with one question is skipped."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    if not 1 <= questions <= len(QUESTION_KINDS):
        raise ValueError(f"questions must be 1 to {len(QUESTION_KINDS)}, got {questions}")
    seed = SPLIT_SEEDS[split]
    rng = random.Random(f"story-qa-conversations-{seed}")
    found: list[list[dict[str, str]]] = []
    for batch in range(20):
        for story in stories(max(n, 1000), seed=seed + 1000 * batch):
            asked = [question_about(story, kind) for kind in rng.sample(QUESTION_KINDS, questions)]
            turns = asked[0].messages()
            for example in asked[1:]:
                turns += [
                    {"role": "user", "content": example.question},
                    {"role": "assistant", "content": example.answer},
                ]
            while keep is not None and turns and not keep(turns):
                turns = turns[:-2]
            if turns:
                found.append(turns)
                if len(found) == n:
                    return found
    raise ValueError(
        f"only {len(found)} of {n} story conversations fit even with one question: "
        "raise seq_len (the model's context) or ask for fewer"
    )


def _normalise(text: str) -> str:
    """A reply as exact match compares it: its first line, trimmed, without a final full stop,
    in lower case."""
    lines = text.strip().splitlines()
    return (lines[0] if lines else "").strip().rstrip(".!").strip().lower()


def hallucinated(reply: str, story: str) -> bool:
    """Whether `reply` names a story word (a name, place, pet, thing, colour, weather, ending)
    that `story` never says."""
    said = {w.lower() for w in re.findall(r"\w+", story)}
    named = {w.lower() for w in re.findall(r"\w+", reply)} & _STORY_WORDS
    return bool(named - said)


def score_answers(examples: Sequence[QAExample], replies: Iterable[str]) -> dict[str, float]:
    """Exact match (of the reply's first line with the answer, both trimmed, in lower case,
    without a final full stop), and the share of replies that hallucinate, over `examples`;
    also each kind's exact match (``exact_match/friend``...)."""
    replies = list(replies)
    if len(replies) != len(examples):
        raise ValueError(f"{len(replies)} replies for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")
    right = [_normalise(r) == _normalise(e.answer) for e, r in zip(examples, replies, strict=True)]
    made_up = [hallucinated(r, e.story) for e, r in zip(examples, replies, strict=True)]
    scores = {
        "exact_match": sum(right) / len(right),
        "hallucination": sum(made_up) / len(made_up),
    }
    for kind in QUESTION_KINDS:
        of_kind = [ok for ok, e in zip(right, examples, strict=True) if e.kind == kind]
        if of_kind:
            scores[f"exact_match/{kind}"] = sum(of_kind) / len(of_kind)
    return scores

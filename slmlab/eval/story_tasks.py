"""Offline task suites from the story grammar, with answers known by construction.

Each item is a held-out story cut just before a word that the grammar copies from the story's
opening, so answering needs memory of the story, not of the language:

* ``stories_who``: "... In the end, Mia and" → the best friend's name (4 choices);
* ``stories_where``: "... Mia went to the" → the place she likes (4 choices);
* ``stories_what``: "... Oh no! Mia lost the red" / "... look for the" → her thing (4 choices);
* ``stories_who_gen``: the first item, answered by greedy generation, scored by exact match
  after removing the leading space and everything from " were" on (the story's last words).

A wrong choice is drawn from the same word list as the answer (never the hero, for names), so
guessing gives 25%, and an n-gram model that cannot see the opening does no better. Every suite
has `SUITE_SIZE` items from a fixed seed that the training corpora do not use; the files are
lm-evaluation-harness task YAMLs with jsonl data, written under ``$SLMLAB_HOME/tasks`` on first
use, so ``lm_eval --include_path`` runs the very same items.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from ..data.story_grammar import NAMES, PLACES, STORY_GRAMMAR_VERSION, THINGS, cast_of, stories
from ..env import cache_dir
from ..io import atomic_write_text

__all__ = ["STORY_TASKS", "SUITE_SIZE", "story_items", "story_task_file"]

SUITE_SIZE = 200
SEED = 9_001  # the training corpora use seeds 1 (train) and 2 (validation)
CHOICES = 4


def _who(story: str) -> tuple[str, str, tuple[str, ...], set[str]] | None:
    cast, _ = cast_of(story)
    cue = f" In the end, {cast['hero']} and"
    return story[: story.rindex(cue) + len(cue)], cast["friend"], NAMES, {cast["hero"]}


def _where(story: str) -> tuple[str, str, tuple[str, ...], set[str]] | None:
    cast, opened = cast_of(story)
    at = story.find(" went to the ", opened)
    if at < 0:
        return None
    return story[: at + len(" went to the")], cast["place"], PLACES, set()


def _what(story: str) -> tuple[str, str, tuple[str, ...], set[str]] | None:
    cast, opened = cast_of(story)
    cue = re.compile(rf"(lost the {cast['color']}|look for the|I like your {cast['color']}) ")
    match = cue.search(story, opened)
    if match is None:
        return None
    return story[: match.end() - 1], cast["thing"], THINGS, set()


_CLOZES: dict[str, Callable[[str], tuple[str, str, tuple[str, ...], set[str]] | None]] = {
    "stories_who": _who,
    "stories_where": _where,
    "stories_what": _what,
}
STORY_TASKS = (*_CLOZES, "stories_who_gen")


def story_items(name: str, size: int = SUITE_SIZE, seed: int = SEED) -> list[dict]:
    """The items of suite `name`: ``{"context", "choices", "gold", "answer"}`` each."""
    cloze = _CLOZES[name.removesuffix("_gen")]
    rng = random.Random(f"{name.removesuffix('_gen')}-{seed}")
    items: list[dict] = []
    batch = 0
    while len(items) < size:
        for story in stories(4 * size, seed=seed + 1000 * batch):
            found = cloze(story)
            if found is None:
                continue
            context, answer, pool, excluded = found
            wrong = rng.sample([w for w in pool if w != answer and w not in excluded], CHOICES - 1)
            choices = [answer, *wrong]
            rng.shuffle(choices)
            items.append(
                {
                    "context": context,
                    "choices": choices,
                    "gold": choices.index(answer),
                    "answer": answer,
                }
            )
            if len(items) == size:
                break
        batch += 1
    return items


def _yaml(name: str, data: Path) -> str:
    common = (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "doc_to_text: context\n"
    )
    if name.endswith("_gen"):
        return common + (
            "output_type: generate_until\n"
            "doc_to_target: answer\n"
            'generation_kwargs:\n  until: [".", "\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
            "metric_list:\n"
            "  - metric: exact_match\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            '    regexes_to_ignore: ["^ ", " were.*"]\n'
        )
    return common + (
        "output_type: multiple_choice\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )


def story_task_file(name: str, directory: Path | None = None) -> Path:
    """The YAML file of built-in suite `name`, written (with its jsonl) if not there yet."""
    if name not in STORY_TASKS:
        raise KeyError(f"no built-in task {name!r}; there are {', '.join(STORY_TASKS)}")
    directory = directory or cache_dir() / "tasks" / f"stories-v{STORY_GRAMMAR_VERSION}-{SEED}"
    yaml_file = directory / f"{name}.yaml"
    if not yaml_file.is_file():
        data = directory / f"{name.removesuffix('_gen')}.jsonl"
        if not data.is_file():
            rows = story_items(name)
            atomic_write_text(data, "".join(json.dumps(row) + "\n" for row in rows))
        atomic_write_text(yaml_file, _yaml(name, data.resolve()))
    return yaml_file

"""The story corpus: one derivation per story, and an entropy that samples agree with."""

from __future__ import annotations

import math
import random

import pytest

from slmlab.data import CharNGram, count_derivations, entropy, is_story, sample_stories, stories

STATS = entropy()


def test_every_story_has_exactly_one_derivation() -> None:
    for text, _ in sample_stories(150, seed=11):
        assert count_derivations(text) == 1, text


def test_the_parser_rejects_what_the_grammar_cannot_say() -> None:
    text = next(stories(1, seed=3))
    hero = (
        text.split(" named ")[1].split()[0].rstrip(".")
        if " named " in text
        else text.split(" called ")[1].split(".")[0]
    )
    other = "Zoe" if hero != "Zoe" else "Mia"
    # the hero renamed halfway through: no derivation produces it
    half = len(text) // 2
    broken = text[:half] + text[half:].replace(hero, other)
    assert broken != text and count_derivations(broken) == 0
    assert count_derivations(text.replace("The end.", "The End.")) == 0
    # The checker of generated stories: with or without the closing newline, never half a story.
    assert text.endswith("\n") and is_story(text) and is_story(text.rstrip("\n"))
    assert not is_story(broken) and not is_story(text[:half])


def test_samples_agree_with_the_exact_entropy() -> None:
    """Mean surprisal per character over samples is the exact rate, within 4 standard errors."""
    samples = sample_stories(6000, seed=5)
    bits = [b for _, b in samples]
    chars = [len(t) for t, _ in samples]
    n, mean_b, mean_c = len(samples), sum(bits) / len(bits), sum(chars) / len(chars)
    rate = mean_b / mean_c
    # delta-method standard error of a ratio of means
    resid = [(b - rate * c) / mean_c for b, c in zip(bits, chars, strict=True)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 1) / n)
    assert abs(rate - STATS.bits_per_char) < 4 * se, (rate, STATS.bits_per_char, se)
    se_chars = math.sqrt(sum((c - mean_c) ** 2 for c in chars) / (n - 1) / n)
    assert abs(mean_c - STATS.chars_per_story) < 4 * se_chars


def test_event_chain_expectations() -> None:
    """The closed-form expected number of events agrees with the sampled chain."""
    import numpy as np

    from slmlab.data import story_grammar as grammar

    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(20000):
        event, n = rng.choice(7, p=grammar.START), 0
        while event < 7:
            n += 1
            event = rng.choice(8, p=grammar.NEXT[event])
        lengths.append(n)
    se = np.std(lengths) / np.sqrt(len(lengths))
    assert abs(np.mean(lengths) - STATS.events_per_story) < 4 * se


def test_stories_are_deterministic_per_seed() -> None:
    assert list(stories(5, seed=1)) == list(stories(5, seed=1))
    assert list(stories(5, seed=1)) != list(stories(5, seed=2))


def test_a_character_5gram_stays_well_above_the_floor() -> None:
    model = CharNGram(5).fit(stories(3000, seed=1))
    assert model.bits_per_char(stories(150, seed=2)) > 1.25 * STATS.bits_per_char


@pytest.mark.parametrize("n", [1, 3, 5])
def test_ngram_distributions_sum_to_one(n: int) -> None:
    model = CharNGram(n).fit(["abracadabra", "cadabra abra"])
    rng = random.Random(0)
    for context in ["", "abr", "xyz", "cada", "".join(rng.choice("abcdr ") for _ in range(6))]:
        seen = sum(model.prob(context, ch) for ch in model.alphabet)
        unseen_slot = model.prob(context, "\x00")  # any character never seen in training
        assert seen + unseen_slot == pytest.approx(1.0, abs=1e-12)


def test_ngram_on_a_known_sequence() -> None:
    """On a text it has seen, a high order is nearly certain; order 1 is the unigram mix."""
    text = "abcabcabcabc" * 20
    model = CharNGram(4).fit([text])
    assert model.prob("ab", "c") > 0.95
    unigram = CharNGram(1).fit([text])
    assert unigram.prob("", "a") == pytest.approx((80 + 3 * 0.25) / (240 + 3))

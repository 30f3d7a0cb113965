"""Byte-level BPE: exact round trips, and the same ids as Hugging Face tokenizers."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import slmlab
from slmlab.data import python_source, stories
from slmlab.tokenizers import BPETokenizer, train_bpe

CORPUS = [*stories(1500, seed=1), *python_source("train")[:40]]
TOKENIZER = train_bpe(CORPUS, 700)
HF = TOKENIZER.to_hf()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_is_identity_on_any_unicode(text: str) -> None:
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_same_ids_as_tokenizers_on_random_text(text: str) -> None:
    assert TOKENIZER.encode(text) == HF.encode(text).ids


def test_same_ids_as_tokenizers_on_a_large_sample() -> None:
    sample = [*stories(300, seed=7), *python_source("validation")]
    assert sum(map(len, sample)) > 500_000
    for text in sample:
        assert TOKENIZER.encode(text) == HF.encode(text).ids
    assert HF.decode(HF.encode(sample[0]).ids) == sample[0]


def test_special_tokens_are_single_ids() -> None:
    eot = TOKENIZER.token_id("<|endoftext|>")
    ids = TOKENIZER.encode("The end.<|endoftext|>Once")
    assert ids.count(eot) == 1 and ids == HF.encode("The end.<|endoftext|>Once").ids
    assert TOKENIZER.decode(ids) == "The end.<|endoftext|>Once"


def test_merges_are_learned_most_frequent_first() -> None:
    tok = train_bpe(["aaab aaab aaab ab"], 256 + 1 + 2, special_tokens=("<s>",))
    # 'a a' is the most frequent adjacent pair (6 times), so it is merged first.
    assert tok.merges[0] == ("a", "a")
    assert tok.vocab_size == 259


def test_fast_training_through_tokenizers_encodes_identically() -> None:
    fast = train_bpe(CORPUS, 1200, backend="tokenizers")
    hf = fast.to_hf()
    for text in CORPUS[:50] + CORPUS[-5:]:
        assert fast.encode(text) == hf.encode(text).ids


# Superword tokens: merges may cross spaces. The Python trainer rescans whole stories for every
# merge, so its corpus is small; what it learns still reaches across words.
SUPERWORDS = train_bpe(list(stories(40, seed=1)), 420, superwords=True)
SUPERWORDS_HF = SUPERWORDS.to_hf()


def test_superword_merges_cross_spaces_and_word_merges_never_do() -> None:
    def crosses(tok: BPETokenizer) -> bool:  # some token has a space after a non-space
        return any(re.search(r"\S\s", tok.decode([i])) for i in tok.vocab.values())

    assert crosses(SUPERWORDS)
    assert not crosses(TOKENIZER)  # GPT-2's pre-tokens: a space only before a word


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_superwords_round_trip_and_match_tokenizers(text: str) -> None:
    ids = SUPERWORDS.encode(text)
    assert SUPERWORDS.decode(ids) == text
    assert ids == SUPERWORDS_HF.encode(text).ids


def test_superwords_match_tokenizers_on_stories_and_survive_saving(tmp_path) -> None:
    for text in stories(60, seed=7):
        assert SUPERWORDS.encode(text) == SUPERWORDS_HF.encode(text).ids
    SUPERWORDS.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(tmp_path)
    assert again.superwords and again.merges == SUPERWORDS.merges
    assert not BPETokenizer.from_str(TOKENIZER.to_str()).superwords


def test_superwords_compress_a_narrow_domain_further() -> None:
    # Chapter 02's claim: on the story grammar, word-level merges run out (every word is one
    # token long before 1024), so characters per token stop growing; superwords keep going.
    train, held_out = list(stories(3000, seed=1)), list(stories(200, seed=2))
    chars = sum(map(len, held_out))

    def chars_per_token(vocab_size: int, superwords: bool) -> float:
        tok = train_bpe(train, vocab_size, backend="tokenizers", superwords=superwords).to_hf()
        return chars / sum(len(e.ids) for e in tok.encode_batch(held_out))

    words_1024, words_2048 = chars_per_token(1024, False), chars_per_token(2048, False)
    assert words_2048 == pytest.approx(words_1024, rel=0.01)
    assert chars_per_token(1024, True) > 2 * words_1024


def test_save_load_and_checkpoint_round_trip(tmp_path) -> None:
    TOKENIZER.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(tmp_path)
    assert again.vocab == TOKENIZER.vocab and again.merges == TOKENIZER.merges
    from slmlab.models import DecoderLM, ModelConfig

    model = DecoderLM(
        ModelConfig(
            vocab_size=TOKENIZER.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    path = slmlab.save(model, tmp_path / "ckpt", tokenizer=TOKENIZER)
    assert slmlab.load_tokenizer(path).encode(CORPUS[0]).ids == TOKENIZER.encode(CORPUS[0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe(["x"], 100)
    with pytest.raises(ValueError, match="backend must be"):
        train_bpe(["x"], 300, backend="sentencepiece")

"""Sliding-window log-likelihood against a naive per-token computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slmlab.eval import score_texts, token_bits
from slmlab.models import DecoderLM, ModelConfig

CONFIG = ModelConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)


@pytest.fixture(scope="module")
def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(CONFIG).eval()


def naive(model: DecoderLM, ids: list[int], i: int, context: int) -> float:
    """−log2 p(ids[i] | up to `context` tokens before it), one forward per token."""
    window = torch.tensor(ids[max(0, i - context) : i + 1])
    with torch.no_grad():
        logits = model(window[None, :-1])[0, -1]
    return F.cross_entropy(logits[None], window[-1:]).item() / math.log(2)


def test_short_text_is_one_forward(model) -> None:
    ids = torch.randint(0, 50, (12,)).tolist()
    bits = token_bits(model, ids)
    assert torch.allclose(
        bits, torch.tensor([naive(model, ids, i, 16) for i in range(1, 12)]), atol=1e-5
    )


def test_stride_one_gives_every_token_the_full_context(model) -> None:
    ids = torch.randint(0, 50, (40,)).tolist()
    bits = token_bits(model, ids, stride=1)
    assert torch.allclose(
        bits, torch.tensor([naive(model, ids, i, 16) for i in range(1, 40)]), atol=1e-5
    )


def test_every_token_is_scored_once_for_any_stride(model) -> None:
    ids = torch.randint(0, 50, (45,)).tolist()
    full = token_bits(model, ids, stride=1)
    for stride in (16, 7, 3):
        bits = token_bits(model, ids, stride=stride)
        assert bits.shape == (44,)
        assert torch.allclose(bits[:15], full[:15], atol=1e-5)  # the first window is shared
    with pytest.raises(ValueError, match="stride must be in"):
        token_bits(model, ids, stride=17)


def test_score_texts_sums_bits_and_characters(model) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    alphabet = "abcdefghijklmnopqrstuvwxyz ."
    chars = Tokenizer(models.WordLevel({c: i + 2 for i, c in enumerate(alphabet)}, unk_token="."))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")

    def encode(text: str) -> list[int]:
        return [alphabet.index(c) + 2 for c in text]

    texts = ["hello", "a longer text than the context of sixteen tokens"]
    score = score_texts(model, chars, texts, separator=1)
    expected = sum(float(token_bits(model, [1, *encode(t), 1]).sum()) for t in texts)
    assert score.bits == pytest.approx(expected)
    assert score.chars == sum(map(len, texts)) and score.tokens == sum(len(t) + 1 for t in texts)
    assert score.perplexity == pytest.approx(2 ** (score.bits / score.tokens))
    assert score.words == 1 + 9 and score.bytes == score.chars
    assert score.word_perplexity == pytest.approx(2 ** (score.bits / 10))
    # Without the end: lm-evaluation-harness's rolling log-likelihood of the text alone.
    bare = score_texts(model, chars, texts, separator=1, score_end=False)
    assert bare.bits == pytest.approx(
        sum(float(token_bits(model, [1, *encode(t)]).sum()) for t in texts)
    )

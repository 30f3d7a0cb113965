"""Shared fixtures. Tests run on CPU, deterministically, with whatever threads the machine has."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project; tests that need it skip cleanly when it is absent."""
    path = Path(os.environ.get("SLMLAB_SHARED", SHARED)) / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set SLMLAB_SHARED to its parent)")
    return path


def _story_tokenizer(superwords: bool):
    from slmlab.data import stories
    from slmlab.tokenizers import train_bpe

    docs = list(stories(300, seed=5))
    special = ("<|endoftext|>",)
    # The Python trainer for word tokens; superword training rescans whole stories, so Rust.
    backend = "tokenizers" if superwords else "python"
    return train_bpe(docs, 400, special_tokens=special, backend=backend, superwords=superwords)


def _random_decoder(tokenizer):
    """A small random decoder over `tokenizer`, context 64 (shorter than a story)."""
    from slmlab.models import DecoderLM, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    return DecoderLM(config).eval()


@pytest.fixture(scope="session")
def story_tokenizer():
    """A 400-token BPE trained on a few hundred stories, with the document separator."""
    return _story_tokenizer(superwords=False).to_hf()


@pytest.fixture(scope="session")
def story_model(story_tokenizer):
    """A small random decoder over `story_tokenizer`, context 64 (shorter than a story)."""
    return _random_decoder(story_tokenizer)


@pytest.fixture(scope="session")
def superword_tokenizer():
    """`story_tokenizer`'s stories and size, with merges that cross spaces."""
    return _story_tokenizer(superwords=True).to_hf()


@pytest.fixture(scope="session")
def superword_model(superword_tokenizer):
    return _random_decoder(superword_tokenizer)

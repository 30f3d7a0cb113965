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


@pytest.fixture(scope="session")
def story_tokenizer():
    """A 400-token BPE trained on a few hundred stories, with the document separator."""
    from slmlab.data import stories
    from slmlab.tokenizers import train_bpe

    return train_bpe(list(stories(300, seed=5)), 400, special_tokens=("<|endoftext|>",)).to_hf()


@pytest.fixture(scope="session")
def story_model(story_tokenizer):
    """A small random decoder over `story_tokenizer`, context 64 (shorter than a story)."""
    from slmlab.models import DecoderLM, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=story_tokenizer.get_vocab_size(),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        eos_token_id=story_tokenizer.token_to_id("<|endoftext|>"),
    )
    return DecoderLM(config).eval()

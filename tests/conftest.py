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

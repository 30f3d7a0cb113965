"""Packing documents into fixed-length training sequences, and shuffling them reproducibly."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["pack", "shuffled"]


def pack(documents: Iterable[list[int]], seq_len: int, separator: int) -> torch.Tensor:
    """Concatenate token ids, each document followed by `separator`, and cut into rows.

    Each row holds ``seq_len + 1`` tokens: a model reads ``row[:-1]`` and is trained to predict
    ``row[1:]``. Rows cross document boundaries (the separator tells the model where one ends),
    so no token is wasted on padding; the incomplete last row is dropped.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(separator)
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise ValueError(
            f"{len(stream)} tokens do not fill one sequence of {seq_len + 1}; use more data or a shorter seq_len"
        )
    return torch.tensor(stream[: rows * (seq_len + 1)], dtype=torch.long).view(rows, seq_len + 1)


def shuffled(n: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """A permutation of range(n), the same for the same (seed, epoch) on every machine."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)

"""Which weights to remove: a score per weight, and the mask that keeps the highest scores.

* Magnitude: |W|. Small weights matter least, if every input were equally large.
* Wanda (Sun et al., 2023): |W_ij|·‖X_j‖, the weight times the norm of the input it multiplies
  over the calibration tokens. A small weight on an outlier input channel moves the output more
  than a large weight on a quiet one, and language models have a few very loud channels.

A mask is boolean, True where the weight stays. Unstructured masks remove a share of the
weights of each output row (Wanda's comparison group), of each layer, or of the whole model
(global magnitude); an N:M pattern keeps N weights of every M consecutive inputs of a row (2:4
is what sparse tensor cores and `slmlab.prune.packed` store).
"""

from __future__ import annotations

import torch

__all__ = [
    "check_sparsity",
    "magnitude_scores",
    "nm_mask",
    "parse_pattern",
    "top_mask",
    "wanda_scores",
]


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` as (2, 4): keep 2 of every 4 consecutive weights of a row. None stays None."""
    if pattern is None:
        return None
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise ValueError(
            f"pattern {pattern!r} is not N:M: give the weights kept and the group, e.g. '2:4'"
        ) from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} must keep 0 < N < M weights of each M, e.g. '2:4'")
    return n, m


def check_sparsity(sparsity: float) -> float:
    """`sparsity`, the share of weights removed, if it lies in [0, 1); else a one-line error."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
        raise ValueError(
            f"sparsity must be a share of the weights in [0, 1) (0.5 removes half), got {sparsity!r}"
        )
    return float(sparsity)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖ for a (out, in) weight and the (in,) norms of its input channels."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"input_norms must hold one norm per input ({weight.shape[1]}), "
            f"got shape {tuple(input_norms.shape)}"
        )
    return weight.detach().abs().float() * input_norms.float()[None, :]


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` lowest entries of each row of a 2-d `scores`, ties going to the
    first index: what a stable sort would pick, found with a selection instead of a sort
    (kthvalue is linear in the row, and real layers have a million weights)."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(count, dim=1, keepdim=True).values
    below, ties = scores < kth, scores == kth
    missing = count - below.sum(1, keepdim=True)  # how many of the ties go, first ones first
    return below | (ties & (ties.cumsum(1) <= missing))


def top_mask(scores: torch.Tensor, sparsity: float, *, per: str = "row") -> torch.Tensor:
    """Remove the lowest-scoring `sparsity` of the weights of each row (``per="row"``) or of
    the whole tensor (``per="layer"``): exactly round(sparsity · count) of each."""
    check_sparsity(sparsity)
    if per == "row":
        return ~_lowest(scores, round(sparsity * scores.shape[1]))
    if per == "layer":
        flat = scores.reshape(1, -1)
        return ~_lowest(flat, round(sparsity * flat.shape[1])).view_as(scores)
    raise ValueError(f"per must be 'row' or 'layer', got {per!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores of every `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(
            f"an {n}:{m} pattern needs rows whose width is a multiple of {m}; this layer has "
            f"{cols} inputs: choose an M that divides it"
        )
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
    return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, lowest, False).view(rows, cols)

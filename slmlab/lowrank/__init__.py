"""Low-rank factorisation (chapter 09): replace a linear layer's weight W by two thin factors.

`low_rank_(model, LowRankConfig(...))` swaps each linear layer for a `LowRankLinear` holding
B (out, r) and A (r, in) with B·A ≈ W. What "≈" means is the method:

* ``svd``: the truncated SVD of W, the best rank-r weight (Eckart–Young): it minimises
  ‖W − BA‖_F, treating every input channel as equally important.
* ``asvd`` (Yuan et al., 2023): scale each input channel j by s_j = rms(x_j)^α first, take the
  SVD of W·diag(s), and undo the scale in A: loud channels' columns are kept more faithfully.
  (ASVD's paper scales by the mean absolute activation; slmlab uses the root mean square, the
  diagonal of the Hessian the calibration walk already collects.)
* ``svd-llm`` (Wang et al., 2024): whiten with the Cholesky factor S of the inputs' second
  moment (S Sᵀ = XᵀX / tokens), take the SVD of W·S, undo S in A. The error on the calibration
  outputs, ‖(W − BA) X ᵀ‖², is then exactly the sum of the squared singular values of W·S that
  were dropped: the best any rank-r layer can do on those inputs.

The rank is given (`rank`), chosen per layer to keep a share of the spectrum's energy (`energy`:
Σ_{i≤r} σ_i² ≥ energy · Σ σ_i², of the matrix being truncated), or to keep a share of each
layer's parameters (`ratio`: r = ⌊ratio · out · in / (out + in)⌋). A factored model saves and
loads with `slmlab.save`/`slmlab.load` (a ``low_rank_config`` section in config.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.lowrank import LowRankLinear
from ..models.swap import KEEP, LINEAR_TARGETS, linear_layers, replace_module
from ..quant.calibrate import check_enough_tokens, require_calibration, sequential_hessians

__all__ = ["METHODS", "LowRankConfig", "LowRankLinear", "factorize", "low_rank_", "rank_for"]

METHODS = ("svd", "asvd", "svd-llm")


@dataclass(frozen=True)
class LowRankConfig:
    """What `low_rank_` does: the method, and one of `rank`, `energy` or `ratio` (module doc)."""

    method: str = "svd-llm"
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    alpha: float = 0.5  # ASVD's exponent on the channel scale
    targets: Sequence[str] = LINEAR_TARGETS
    skip: Sequence[str] = KEEP
    damp: float = 0.01  # SVD-LLM: a share of the mean diagonal added before the Cholesky factor

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        given = [k for k in ("rank", "energy", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of rank, energy or ratio to choose each layer's rank, got {given or 'none'}"
            )
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        for name in ("energy", "ratio"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1
            ):
                raise ValueError(f"{name} must be a share in (0, 1], got {value!r}")
        if not (isinstance(self.alpha, int | float) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1] (ASVD uses 0.5), got {self.alpha!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd"


def rank_for(
    singular_values: torch.Tensor,
    shape: tuple[int, int],
    config: LowRankConfig,
    name: str = "layer",
) -> int:
    """The rank `config` asks for a weight of `shape` whose (truncated matrix's) singular values
    are `singular_values`, largest first."""
    out, inp = shape
    most = min(out, inp)
    if config.rank is not None:
        if config.rank > most:
            raise ValueError(
                f"rank {config.rank} is above {name}'s {out} x {inp} weight's largest rank, {most}: "
                "choose a smaller rank, or energy or ratio"
            )
        return config.rank
    if config.ratio is not None:
        return max(1, min(most, math.floor(config.ratio * out * inp / (out + inp))))
    energy = singular_values.double().pow(2).cumsum(0)
    reached = energy >= config.energy * energy[-1] * (1 - 1e-12)
    return int(torch.nonzero(reached)[0]) + 1


def _whitening(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """S with S Sᵀ = XᵀX / tokens (lower Cholesky), H = 2 XᵀX / tokens damped to be invertible."""
    H = hessian.double() / 2
    H = H + torch.eye(H.shape[0], dtype=H.dtype) * damp * H.diagonal().mean().clamp(min=1e-12)
    return torch.linalg.cholesky(H)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᴴ of `matrix` (thin). A wide matrix is decomposed through its transpose: the same
    factors, and LAPACK's driver was 40x slower on the wide shape (576 x 1536) than the tall."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    V, sigma, Uh = torch.linalg.svd(matrix.T.contiguous(), full_matrices=False)
    return Uh.T, sigma, V.T


def factorize(
    weight: torch.Tensor,
    config: LowRankConfig,
    hessian: torch.Tensor | None = None,
    *,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r) and A (r, in) for a (out, in) `weight`, as `config` says; `hessian` is
    2 XᵀX / tokens of the layer's calibration inputs (ASVD uses its diagonal, SVD-LLM all of
    it). Decomposes in the weight's dtype, at least float32 (the Hessian's factor is taken in
    float64); returns the weight's dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype)
    if config.method == "svd":
        right = left = None
    elif hessian is None:
        raise ValueError(f"{config.method} needs the layer's calibration Hessian")
    elif config.method == "asvd":
        scale = (hessian.double().diagonal() / 2).sqrt().clamp(min=1e-8) ** config.alpha
        right, left = torch.diag(scale).to(dtype), torch.diag(1 / scale).to(dtype)
    else:
        S = _whitening(hessian, config.damp).to(dtype)
        right, left = S, None  # undo S by a triangular solve, not an explicit inverse
    target = W if right is None else W @ right
    U, sigma, Vh = _svd(target)
    r = rank_for(sigma, tuple(W.shape), config, name)
    root = sigma[:r].sqrt()
    B = U[:, :r] * root
    A = root[:, None] * Vh[:r]
    if config.method == "asvd":
        A = A @ left
    elif config.method == "svd-llm":
        # A = A' S⁻¹: solve A Sᵀ... written as Sᵀ Aᵀ = A'ᵀ with S lower triangular.
        A = torch.linalg.solve_triangular(S.T, A.T, upper=True).T
    return B.to(weight.dtype), A.to(weight.dtype)


@torch.no_grad()
def low_rank_(
    model: nn.Module, config: LowRankConfig, *, calibration: torch.Tensor | None = None
) -> nn.Module:
    """Replace each linear layer of `model` named by `config.targets` (except `config.skip`) by
    its rank-r factors, in place. ASVD and SVD-LLM need `calibration` token ids (rows, seq_len);
    they factor block by block, each block seeing the outputs of the factored blocks before it.
    """
    targets = linear_layers(model, config.targets, skip=config.skip)
    if config.needs_calibration:
        require_calibration(calibration, config.method, "low_rank_")
    if config.method == "svd-llm":
        check_enough_tokens(calibration, targets, "svd-llm")
    if config.rank is not None:  # every layer is checked before any is changed
        for name, layer in targets:
            rank_for(torch.empty(0), tuple(layer.weight.shape), config, name)
    if config.method == "svd":
        found = ((name, layer, None) for name, layer in targets)
    else:
        found = sequential_hessians(model, calibration, dict(targets))
    for name, layer, hessian in found:
        B, A = factorize(layer.weight, config, hessian, name=name)
        replace_module(model, name, LowRankLinear(A, B, layer.bias))
    return model

"""`prune_(model, PruneConfig(...))`: set a share of each linear layer's weights to zero, in place.

The model stays a plain model: its ``nn.Linear`` layers keep their shape and hold zeros, so it
saves, loads and runs as before (and `slmlab.prune.packed` turns 2:4 layers into a storage that
is smaller and faster). `PruneConfig.method` says which weights go:

* ``magnitude``: the smallest |W| of each layer, or of all layers at once (``scope="global"``).
* ``wanda``: the smallest |W|·‖X‖ of each output row; needs calibration data.
* ``sparsegpt``: OBS with updates to the weights that stay (`sparsegpt.py`); needs calibration.

The two that look at data prune block by block, each block seeing the inputs that the already
pruned blocks before it produce (the Hessians GPTQ collects: `slmlab.quant.calibrate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.sparse import Sparse24Linear
from ..models.swap import KEEP, linear_layers
from ..quant.calibrate import check_enough_tokens, require_calibration, sequential_hessians
from .masks import check_sparsity, magnitude_scores, nm_mask, parse_pattern, top_mask, wanda_scores
from .sparsegpt import sparsegpt_prune

__all__ = ["METHODS", "PruneConfig", "prune_", "sparsity"]

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("row", "layer", "global", "block")
DEFAULT_SCOPES = {"magnitude": "layer", "wanda": "row", "sparsegpt": "block"}


@dataclass(frozen=True)
class PruneConfig:
    """What `prune_` does. `sparsity` is the share of weights removed (0.5 unless a `pattern`
    says otherwise); `pattern` ``"N:M"`` keeps N of every M consecutive inputs of a row;
    `scope` is the group whose weights compete for a place: ``row`` (Wanda's default),
    ``layer`` (magnitude's default), ``global`` (magnitude only: every layer at once) or
    ``block`` (SparseGPT's, and its only one: each block of columns as it is reached)."""

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    scope: str | None = None
    skip: Sequence[str] = KEEP  # module names (suffixes) left dense
    block_size: int = 128  # SparseGPT's columns per lazy update
    damp: float = 0.01  # SparseGPT's Hessian dampening, a share of the mean diagonal

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.scope is None:
            object.__setattr__(self, "scope", DEFAULT_SCOPES[self.method])
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose from {', '.join(SCOPES)}")
        if (self.scope == "block") != (self.method == "sparsegpt"):
            raise ValueError(
                "sparsegpt, and only sparsegpt, chooses its weights per block of columns: "
                f"scope {self.scope!r} does not go with method {self.method!r}"
            )
        if self.scope == "global" and (self.method != "magnitude" or self.pattern is not None):
            raise ValueError(
                "scope='global' ranks every layer's magnitudes together: it is for "
                "method='magnitude' without a pattern"
            )
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} removes {implied:g} of the weights, but sparsity "
                    f"is {self.sparsity}: give one of the two"
                )
            object.__setattr__(self, "sparsity", implied)
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        check_sparsity(self.sparsity)
        if isinstance(self.skip, str):
            raise ValueError(f"skip must be a list of module names, got the string {self.skip!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def _mask(scores: torch.Tensor, config: PruneConfig, per: str) -> torch.Tensor:
    nm = config.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    return top_mask(scores, config.sparsity, per=per)


@torch.no_grad()
def prune_(
    model: nn.Module, config: PruneConfig, *, calibration: torch.Tensor | None = None
) -> nn.Module:
    """Zero the weights `config` chooses in every ``nn.Linear`` of `model` except `config.skip`.

    `calibration`: token ids (rows, seq_len) of representative text, for Wanda and SparseGPT.
    """
    targets = linear_layers(model, "all", skip=config.skip)
    if config.needs_calibration:
        require_calibration(calibration, config.method, "prune_")
    if config.method == "sparsegpt":
        check_enough_tokens(calibration, targets, "sparsegpt")
    if config.nm is not None:  # every layer is checked before any is changed
        for name, layer in targets:
            if layer.in_features % config.nm[1]:
                raise ValueError(
                    f"pattern {config.pattern}: {name} has {layer.in_features} inputs, not a "
                    f"multiple of {config.nm[1]}; choose an M that divides it or skip the layer"
                )
    if config.method == "magnitude":
        if config.scope == "global":
            scores = torch.cat([magnitude_scores(layer.weight).flatten() for _, layer in targets])
            count = round(config.sparsity * scores.numel())
            if count:  # every weight at or below the count-th smallest magnitude goes
                threshold = torch.kthvalue(scores, count).values
                for _, layer in targets:
                    layer.weight.masked_fill_(magnitude_scores(layer.weight) <= threshold, 0.0)
            return model
        for _, layer in targets:
            layer.weight.mul_(_mask(magnitude_scores(layer.weight), config, config.scope))
        return model
    wanda = config.method == "wanda"
    hessians = sequential_hessians(model, calibration, dict(targets), diagonal=wanda)
    for _name, layer, hessian in hessians:
        if wanda:
            # ‖X_j‖ ∝ √H_jj: the constant (2 / tokens) does not change any comparison in a row.
            scores = wanda_scores(layer.weight, hessian.sqrt())
            layer.weight.mul_(_mask(scores, config, config.scope))
        else:
            pruned, _ = sparsegpt_prune(
                layer.weight,
                hessian,
                config.sparsity,
                pattern=config.nm,
                block_size=config.block_size,
                damp=config.damp,
            )
            layer.weight.copy_(pruned)
    return model


def sparsity(
    model: nn.Module, targets: Sequence[str] | str = "all", *, skip: Sequence[str] = KEEP
) -> dict[str, float]:
    """The share of zero weights in each linear layer, packed 2:4 ones included (``"total"``:
    over all of them)."""
    layers = linear_layers(model, targets, skip=skip, kinds=(nn.Linear, Sparse24Linear))
    weights = {
        name: layer.dense_weight() if isinstance(layer, Sparse24Linear) else layer.weight
        for name, layer in layers
    }
    shares = {name: float((w == 0).float().mean()) for name, w in weights.items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    shares["total"] = zeros / sum(w.numel() for w in weights.values())
    return shares

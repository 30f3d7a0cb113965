"""Pruning (chapter 09): remove weights, channels, heads or whole blocks, and measure the cost.

* `masks`: scores (magnitude, Wanda) and the masks that keep the highest: per row, per layer,
  global, or N:M.
* `sparsegpt`: OBS pruning with updates to the weights that stay, one layer at a time.
* `unstructured`: `prune_(model, PruneConfig(...))`, the one verb for zeroing weights, and
  `sparsity(model)`.
* `packed`: `pack_2to4_(model)`, 2:4 layers stored as their kept values and 2-bit positions,
  which a CPU kernel multiplies without unpacking; `to_semi_structured_(model)`, the same layers
  as PyTorch's semi-structured sparse tensors for a GPU's sparse tensor cores.
* `structured`: importance of MLP channels, key/value groups of heads and whole blocks, the verbs
  that cut them out, and `prune_structure_(model, StructureConfig(...))` over all three: a
  smaller model of the same architecture.
"""

from .masks import magnitude_scores, nm_mask, top_mask, wanda_scores
from .packed import pack_2to4_, to_semi_structured_
from .sparsegpt import sparsegpt_prune
from .structured import (
    IMPORTANCE,
    StructureConfig,
    drop_layers_,
    head_group_importance,
    layer_importance,
    mlp_channel_importance,
    prune_heads_,
    prune_mlp_,
    prune_structure_,
)
from .unstructured import METHODS, PruneConfig, prune_, sparsity

__all__ = [
    "IMPORTANCE",
    "METHODS",
    "PruneConfig",
    "StructureConfig",
    "drop_layers_",
    "head_group_importance",
    "layer_importance",
    "magnitude_scores",
    "mlp_channel_importance",
    "nm_mask",
    "pack_2to4_",
    "prune_",
    "prune_heads_",
    "prune_mlp_",
    "prune_structure_",
    "sparsegpt_prune",
    "sparsity",
    "to_semi_structured_",
    "top_mask",
    "wanda_scores",
]

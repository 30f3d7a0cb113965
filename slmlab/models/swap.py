"""One way to swap a module of a model for another: what every transform (quantization, LoRA,
pruning, low rank) does to a model's linear layers."""

from __future__ import annotations

from torch import nn

__all__ = ["replace_module"]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where `model` has the submodule called `name` (``model.layers.0.mlp.up_proj``)
    and return the one it replaces. A tied output head is re-tied by the caller that changes
    the embedding: the head is a module of its own."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    setattr(parent, child, module)
    return old

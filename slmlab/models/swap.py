"""One way to swap a model's layers for others: what every transform (quantization, LoRA,
pruning, low rank) does to a model's linear layers.

`swap_linears(model, build, targets)` replaces the ``nn.Linear`` layers whose names end in one
of `targets` (Llama-family names: ``q_proj`` … ``down_proj``) by whatever `build` makes of
each; `replace_module` swaps one module by name. The model keeps its own modules around the
swapped ones (and the hooks on them), and a head tied to the embedding stays tied: replacing
the embedding re-ties the head through the model's ``tie_weights``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = [
    "ATTENTION",
    "KEEP",
    "LINEAR_TARGETS",
    "MAMBA",
    "MLP",
    "linear_layers",
    "replace_module",
    "swap_linears",
]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MAMBA = ("in_proj", "out_proj")  # a Mamba-2 layer's, where a hybrid has one instead of attention
LINEAR_TARGETS = ATTENTION + MLP  # every linear layer of a block; the head is not among them
# What a transform over "all" linear layers leaves as it is by default: the output head, and a
# mixture of experts' router and shared-expert gate (small, and read by every token to choose
# its experts: llama.cpp's quantizer keeps them too).
KEEP = ("lm_head", "mlp.gate", "mlp.shared_expert_gate")

EMBEDDING = "model.embed_tokens"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where `model` has the submodule called `name` (``model.layers.0.mlp.up_proj``)
    and return the one it replaces. Replacing the embedding of a model with a tied head re-ties
    the head (``model.tie_weights()``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    setattr(parent, child, module)
    if name == EMBEDDING and hasattr(model, "tie_weights"):
        model.tie_weights()
    return old


def linear_layers(
    model: nn.Module,
    targets: Sequence[str] | str = LINEAR_TARGETS,
    *,
    skip: Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of each ``nn.Linear`` (subclasses included; or of another of `kinds`, a
    quantized linear layer, say) whose name ends in one of `targets` (``"all"``: every one)
    and in none of `skip`, in the model's order."""
    if isinstance(targets, str) and targets != "all":
        raise ValueError(f"targets must be a list of layer names or 'all', got {targets!r}")
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        and (targets == "all" or name.rpartition(".")[2] in targets or name in targets)
        and not any(name.endswith(s) for s in skip)
    ]
    if not found:
        raise ValueError(
            f"no linear layer of {type(model).__name__} matches targets {targets!r} "
            f"(skipping {list(skip)}); its linear layers end in "
            f"{sorted({n.rpartition('.')[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})}"
        )
    return found


def swap_linears(
    model: nn.Module,
    build: Callable[[str, nn.Linear], nn.Module | None],
    targets: Sequence[str] | str = LINEAR_TARGETS,
    *,
    skip: Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> dict[str, nn.Module]:
    """Replace each linear layer `linear_layers` finds by ``build(name, layer)`` (None keeps the
    layer), in place; returns the new layers by name. Layers are found before any is built, so
    a `build` that wraps its layer is not offered its own output."""
    swapped = {}
    for name, layer in linear_layers(model, targets, skip=skip, kinds=kinds):
        new = build(name, layer)
        if new is not None:
            replace_module(model, name, new)
            swapped[name] = new
    return swapped

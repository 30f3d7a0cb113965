"""Structured pruning: cut out whole MLP channels, key/value groups of heads, or blocks, so the
model is physically smaller and every kernel runs faster, with no sparse format needed.

Importance says what to cut, measured on calibration text:

* ``activation``: the size of what a unit adds to the residual stream. For MLP channel c that is
  exactly ‖h_c‖·‖W_down[:, c]‖ (h the input of ``down_proj``, summed over tokens); for a group of
  heads, the norm of the group's share of ``o_proj``'s output.
* ``taylor``: the first-order change of the loss when each of the unit's weights is zeroed,
  Σ |w·∂L/∂w| over them (LLM-Pruner's element-wise importance; the vector-wise |Σ w·∂L/∂w|,
  one derivative for the whole unit, cancels signs and ranked far worse on SmolLM2).
* Blocks: ShortGPT's block influence, 1 − cos(x_in, x_out) averaged over tokens (a block that
  barely turns the hidden state does little), or the angular distance arccos(cos)/π between the
  states `span` blocks apart (Gromov et al.), to remove `span` consecutive blocks at once.

The cuts are uniform: every layer keeps the same number of channels and of groups, so the
result is an ordinary configuration (smaller ``intermediate_size``, fewer heads with
``head_dim`` written out, fewer layers) that transformers loads as it loads any Llama.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mlp import SparseMoE
from ..models.swap import replace_module
from ..quant.calibrate import blocks, run_until

__all__ = [
    "IMPORTANCE",
    "StructureConfig",
    "drop_layers_",
    "head_group_importance",
    "layer_importance",
    "mlp_channel_importance",
    "prune_heads_",
    "prune_mlp_",
    "prune_structure_",
]

IMPORTANCE = ("activation", "taylor")
LAYER_METRICS = ("block-influence", "angular")


def _plain(layer: nn.Module, name: str) -> nn.Linear:
    if type(layer) is not nn.Linear:
        raise ValueError(
            f"{name} is a {type(layer).__name__}, not a plain nn.Linear: prune the structure "
            "before quantizing or adding adapters"
        )
    return layer


def _gradients(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> None:
    """Accumulate ∂(mean next-token loss)/∂w over the calibration rows into each ``.grad``."""
    model.zero_grad(set_to_none=True)
    rows = calibration.shape[0]
    with torch.enable_grad():
        for batch in calibration.split(batch_size):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            (loss * batch.shape[0] / rows).backward()


def _check_importance(importance: str) -> None:
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; choose from {', '.join(IMPORTANCE)}")


def _dense_mlp_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks, each with a dense SwiGLU: MLP channels are a dense MLP's."""
    stack = blocks(model)
    for i, block in enumerate(stack):
        if isinstance(block.mlp, SparseMoE):
            raise ValueError(
                f"model.layers.{i}.mlp is a mixture of experts: MLP channel pruning takes dense "
                "MLPs; prune the experts' linear layers by weight instead (slmlab.prune)"
            )
    return stack


def mlp_channel_importance(
    model: nn.Module, calibration: torch.Tensor, *, importance: str = "activation"
) -> list[torch.Tensor]:
    """Per block, one score per MLP channel (``intermediate_size`` of them)."""
    _check_importance(importance)
    stack = _dense_mlp_blocks(model)
    if importance == "taylor":

        def channels(block: nn.Module) -> torch.Tensor:
            mlp = block.mlp
            return (
                _taylor(mlp.gate_proj).sum(1)
                + _taylor(mlp.up_proj).sum(1)
                + _taylor(mlp.down_proj).sum(0)
            )

        return _taylor_scores(model, calibration, channels)
    squares = [torch.zeros(block.mlp.down_proj.in_features, dtype=torch.float64) for block in stack]

    def add(i: int):
        def watch(x: torch.Tensor) -> None:  # a hook that returned a tensor would replace x
            squares[i].add_(x.reshape(-1, x.shape[-1]).double().pow(2).sum(0))

        return watch

    run_until(model, calibration, model, {b.mlp.down_proj: add(i) for i, b in enumerate(stack)})
    return [
        (s.sqrt() * b.mlp.down_proj.weight.double().norm(dim=0)).float()
        for s, b in zip(squares, stack, strict=True)
    ]


def _taylor_scores(
    model: nn.Module, calibration: torch.Tensor, per_block: Callable[[nn.Module], torch.Tensor]
) -> list[torch.Tensor]:
    """``per_block(block)`` for every block, with the loss's gradients on the weights."""
    _gradients(model, calibration)
    scores = [per_block(block) for block in blocks(model)]
    model.zero_grad(set_to_none=True)
    return scores


def _taylor(layer: nn.Linear) -> torch.Tensor:
    """|w·∂L/∂w| per weight: the first-order change of the loss if that weight were zeroed."""
    return (layer.weight * layer.weight.grad).abs().detach()


def head_group_importance(
    model: nn.Module, calibration: torch.Tensor, *, importance: str = "activation"
) -> list[torch.Tensor]:
    """Per block, one score per key/value head, standing for the query heads that share it."""
    _check_importance(importance)
    _check_attention_only(model)
    stack = blocks(model)
    if importance == "taylor":

        def groups(block: nn.Module) -> torch.Tensor:
            attn = block.self_attn
            K = attn.num_kv_heads
            return (
                _taylor(attn.q_proj).sum(1).view(K, -1).sum(1)
                + _taylor(attn.k_proj).sum(1).view(K, -1).sum(1)
                + _taylor(attn.v_proj).sum(1).view(K, -1).sum(1)
                + _taylor(attn.o_proj).sum(0).view(K, -1).sum(1)
            )

        return _taylor_scores(model, calibration, groups)
    squares = [torch.zeros(b.self_attn.num_kv_heads, dtype=torch.float64) for b in stack]

    def add(i: int, attn: nn.Module):
        K = attn.num_kv_heads
        width = attn.o_proj.in_features // K
        weight = attn.o_proj.weight.double().view(-1, K, width)  # (hidden, K, group·D)

        def watch(x: torch.Tensor) -> None:
            parts = x.reshape(-1, K, width).double()  # (tokens, K, group·D)
            out = torch.einsum("tkw,hkw->tkh", parts, weight)  # each group's share of o_proj
            squares[i].add_(out.pow(2).sum((0, 2)))

        return watch

    run_until(
        model,
        calibration,
        model,
        {b.self_attn.o_proj: add(i, b.self_attn) for i, b in enumerate(stack)},
    )
    return [s.sqrt().float() for s in squares]


@torch.no_grad()
def layer_importance(
    model: nn.Module, calibration: torch.Tensor, *, metric: str = "block-influence", span: int = 1
) -> torch.Tensor:
    """One score per run of `span` consecutive blocks (entry i: blocks i … i + span − 1), low
    where removing them changes the hidden state least: ShortGPT's block influence
    (``block-influence``) or the angular distance (``angular``), averaged over tokens."""
    if metric not in LAYER_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(LAYER_METRICS)}")
    stack = blocks(model)
    if isinstance(span, bool) or not isinstance(span, int) or not 1 <= span < len(stack):
        raise ValueError(
            f"span must be a number of consecutive blocks from 1 to {len(stack) - 1} "
            f"(the model has {len(stack)}), got {span!r}"
        )
    states: list[list[torch.Tensor]] = [[] for _ in range(len(stack) + 1)]
    watch = {
        b: (lambda x, i=i: states[i].append(x.reshape(-1, x.shape[-1])))
        for i, b in enumerate(stack)
    }
    final = stack[-1].register_forward_hook(
        lambda _m, _a, out: states[-1].append(out.reshape(-1, out.shape[-1]))
    )
    try:
        run_until(model, calibration, model, watch)
    finally:
        final.remove()
    hidden = [torch.cat(s).double() for s in states]
    cosines = torch.stack(
        [
            F.cosine_similarity(hidden[i], hidden[i + span], dim=-1)
            for i in range(len(stack) - span + 1)
        ]
    )  # (runs, tokens)
    if metric == "block-influence":
        return (1 - cosines).mean(1).float()
    return (cosines.clamp(-1, 1).arccos() / math.pi).mean(1).float()


def _kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the `keep` highest scores, in their original order."""
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:keep]).values


def _sliced(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = layer.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new = new.to(dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach() if rows is None else bias.detach()[rows])
    return new


def _count(keep: int | float, total: int, what: str, least: int = 1) -> int:
    if isinstance(keep, float) and not isinstance(keep, bool):
        if not 0 < keep <= 1:
            raise ValueError(f"keep as a share of the {what} must be in (0, 1], got {keep}")
        keep = max(least, round(keep * total))
    if isinstance(keep, bool) or not isinstance(keep, int) or not least <= keep <= total:
        raise ValueError(f"keep must be a number of {what} from {least} to {total}, got {keep!r}")
    return keep


@torch.no_grad()
def prune_mlp_(model: nn.Module, keep: int | float, scores: Sequence[torch.Tensor]) -> nn.Module:
    """Keep the `keep` highest-scoring MLP channels of every block (a count, or a share of
    ``intermediate_size``); ``intermediate_size`` becomes `keep`."""
    stack = _dense_mlp_blocks(model)
    total = model.config.intermediate_size
    keep = _count(keep, total, "MLP channels")
    _check_scores(scores, stack, total, "MLP channel")
    for i, (block, s) in enumerate(zip(stack, scores, strict=True)):
        index = _kept(s, keep)
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            layer = _plain(getattr(block.mlp, name), prefix + name)
            replace_module(model, prefix + name, _sliced(layer, index, None))
        down = _plain(block.mlp.down_proj, prefix + "down_proj")
        replace_module(model, prefix + "down_proj", _sliced(down, None, index))
    model.config = dataclasses.replace(model.config, intermediate_size=keep)
    return model


@torch.no_grad()
def prune_heads_(model: nn.Module, keep: int | float, scores: Sequence[torch.Tensor]) -> nn.Module:
    """Keep the `keep` highest-scoring key/value groups of every block (a count, or a share of
    ``num_key_value_heads``), with the query heads that read them. ``head_dim`` is unchanged;
    the hidden size no longer equals heads × head_dim, so the config says ``head_dim`` itself."""
    _check_attention_only(model)
    stack = blocks(model)
    config = model.config
    K, group, D = (
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
        config.head_dim,
    )
    keep = _count(keep, K, "key/value groups (a block keeps at least one)")
    _check_scores(scores, stack, K, "key/value group")
    for i, (block, s) in enumerate(zip(stack, scores, strict=True)):
        groups = _kept(s, keep)
        kv = (groups[:, None] * D + torch.arange(D)).flatten()
        q = (groups[:, None] * group * D + torch.arange(group * D)).flatten()
        attn, prefix = block.self_attn, f"model.layers.{i}.self_attn."
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            layer = _plain(getattr(attn, name), prefix + name)
            replace_module(model, prefix + name, _sliced(layer, rows, None))
        o = _plain(attn.o_proj, prefix + "o_proj")
        replace_module(model, prefix + "o_proj", _sliced(o, None, q))
        attn.num_heads, attn.num_kv_heads = keep * group, keep
    model.config = dataclasses.replace(
        config, num_attention_heads=keep * group, num_key_value_heads=keep, head_dim=D
    )
    return model


def drop_layers_(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Remove the blocks numbered in `layers`; the rest keep their order and are renumbered."""
    stack = blocks(model)
    count = len(stack)
    gone = set()
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"layers must be block numbers from 0 to {count - 1}, got {index!r}")
        gone.add(index)
    if len(gone) == count:
        raise ValueError(f"layers names all {count} blocks: a model keeps at least one")
    kept = [block for i, block in enumerate(stack) if i not in gone]
    for i, block in enumerate(kept):
        mixer = block.mamba if hasattr(block, "mamba") else block.self_attn
        mixer.layer_index = i  # the KV cache is indexed by position in the stack
    model.model.layers = nn.ModuleList(kept)
    types = model.config.layer_types  # which layers slide: the kept ones' own
    model.config = dataclasses.replace(
        model.config,
        num_hidden_layers=len(kept),
        layer_types=None if types is None else [t for i, t in enumerate(types) if i not in gone],
    )
    return model


def _check_attention_only(model: nn.Module) -> None:
    if model.config.latent:
        raise ValueError(
            "head pruning takes key/value groups out of every block, and this model's heads "
            "read one shared latent (latent attention: model_type 'deepseek_v3'); prune its "
            "MLP channels or its layers instead"
        )
    if any(model.config.linear_layers):
        raise ValueError(
            "head pruning takes key/value groups out of every block, and this model has "
            "Mamba-2 layers (layer_types 'linear_attention'); prune its MLP channels or its "
            "layers instead"
        )


def _check_scores(scores: Sequence[torch.Tensor], stack: list, width: int, what: str) -> None:
    if len(scores) != len(stack) or any(s.shape != (width,) for s in scores):
        raise ValueError(
            f"scores must hold one tensor of {width} {what} scores per block ({len(stack)} "
            f"blocks), got {[tuple(s.shape) for s in scores]}"
        )


@dataclass(frozen=True)
class StructureConfig:
    """What `prune_structure_` cuts: whole blocks first (`layers` of them, by `layer_metric`),
    then MLP channels and key/value groups in every block left (`mlp`, `kv_groups`: a share
    in (0, 1] as a float, or a count kept as an int), ranked by `importance` on the
    calibration text."""

    mlp: int | float | None = None  # None keeps them all
    kv_groups: int | float | None = None
    layers: int = 0
    importance: str = "activation"
    layer_metric: str = "block-influence"

    def __post_init__(self) -> None:
        _check_importance(self.importance)
        if self.layer_metric not in LAYER_METRICS:
            raise ValueError(
                f"unknown layer_metric {self.layer_metric!r}; choose from {', '.join(LAYER_METRICS)}"
            )
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(
                f"layers must be a number of blocks to remove (≥ 0), got {self.layers!r}"
            )


def prune_structure_(
    model: nn.Module, config: StructureConfig, *, calibration: torch.Tensor
) -> dict[str, object]:
    """Cut `model` down as `config` says, in place; returns what went: the blocks removed (their
    numbers in the original model) and the MLP channels and key/value groups each block kept."""
    removed: list[int] = []
    if config.layers:
        count = len(blocks(model))
        if config.layers >= count:
            raise ValueError(f"layers={config.layers} would remove all {count} blocks: keep one")
        if config.layer_metric == "angular":  # the run of consecutive blocks that turns least
            start = int(
                torch.argmin(
                    layer_importance(model, calibration, metric="angular", span=config.layers)
                )
            )
            removed = list(range(start, start + config.layers))
        else:  # ShortGPT: the blocks of lowest influence, wherever they are
            scores = layer_importance(model, calibration)
            removed = sorted(int(i) for i in torch.argsort(scores, stable=True)[: config.layers])
        drop_layers_(model, removed)
    kept: dict[str, object] = {"removed_layers": removed}
    if config.mlp is not None:
        scores = mlp_channel_importance(model, calibration, importance=config.importance)
        prune_mlp_(model, config.mlp, scores)
        kept["mlp_channels"] = [_kept(s, model.config.intermediate_size).tolist() for s in scores]
    if config.kv_groups is not None:
        scores = head_group_importance(model, calibration, importance=config.importance)
        prune_heads_(model, config.kv_groups, scores)
        kept["kv_groups"] = [_kept(s, model.config.num_key_value_heads).tolist() for s in scores]
    return kept

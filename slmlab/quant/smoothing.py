"""Moving scale between activations and weights: SmoothQuant and AWQ.

For any per-input-channel vector s > 0, ``(x / s) · (W · s)ᵀ = x · Wᵀ``: dividing the inputs
and multiplying the weight's columns by the same s changes nothing, and the division can be
folded into whatever produced x (the RMSNorm's weight before q/k/v and gate/up, the rows of
up_proj before down_proj), so the model stays exactly the same function. What changes is
what is easy to round.

* SmoothQuant (Xiao et al., 2023) rounds activations too (W8A8). A few input channels carry
  activations 10–100× larger than the rest, which wrecks per-token int8; choosing
  s_j = max|x_j|^α / max|W_j|^(1−α) moves part of that range into the weights, which are
  rounded per output channel and can take it. α = 0.5 splits the difficulty evenly.
* AWQ (Lin et al., 2024) rounds weights only. The weights that multiply large activations
  matter most; scaling their columns up before rounding gives them relatively finer steps.
  s = mean|x|^α, with α searched on a grid to minimise the layer's output error on the
  calibration inputs after round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..layers.formats import dequantize, quantize
from ..models.mlp import SparseMoE
from .calibrate import blocks, collect_inputs, walk_blocks

__all__ = ["awq_scales", "fold_scales", "scale_groups", "smooth_", "smoothquant_scales"]

_AWQ_GRID = 20  # α in 0, 1/20, …, 19/20, as the AWQ paper's search
_AWQ_TOKENS = 4096  # calibration tokens kept per layer group for the search


def scale_groups(block: nn.Module) -> Iterator[tuple[nn.Module, list[nn.Linear]]]:
    """(producer, linears that read its output) pairs of a Llama block, where s can be folded.

    SmoothQuant folds into the norms only; AWQ also into up_proj (which feeds down_proj), and
    into v_proj when it feeds o_proj one to one (no grouped key/value heads).
    """
    if hasattr(block, "mamba"):
        raise ValueError(
            "smoothing (AWQ, SmoothQuant) folds scales into attention blocks only; this model "
            "has Mamba-2 layers: use method='rtn' or 'gptq'"
        )
    attn, mlp = block.self_attn, block.mlp
    if not hasattr(attn, "k_proj"):
        raise ValueError(
            "smoothing (AWQ, SmoothQuant) folds scales into q, k and v projections; this "
            "block's attention is latent (DeepSeek's), which has none: use method='rtn' or 'gptq'"
        )
    if isinstance(mlp, SparseMoE):  # the router reads the norm too: folding would reroute
        raise ValueError(
            "smoothing (AWQ, SmoothQuant) folds scales into dense MLPs only; this block's MLP "
            "is a mixture of experts: use method='rtn' or 'gptq'"
        )
    yield block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]
    yield block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]
    yield mlp.up_proj, [mlp.down_proj]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        yield attn.v_proj, [attn.o_proj]


@torch.no_grad()
def fold_scales(producer: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide `producer`'s output by s and multiply the `linears`' input columns by s."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s[:, None])
        if producer.bias is not None:
            producer.bias.div_(s)
    else:  # a norm: its weight scales each channel
        producer.weight.div_(s)
    for linear in linears:
        linear.weight.mul_(s[None, :])


def smoothquant_scales(
    act_absmax: torch.Tensor, linears: list[nn.Linear], alpha: float
) -> torch.Tensor:
    """s_j = max|x_j|^α / max|W_j|^(1−α), over the columns of all `linears`."""
    weight_absmax = torch.stack([m.weight.abs().amax(0) for m in linears]).amax(0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def awq_scales(
    inputs: torch.Tensor,
    linears: list[nn.Linear],
    bits: int,
    group_size: int | None,
    symmetric: bool,
) -> torch.Tensor:
    """The s = mean|x|^α (α on a grid) whose rounded weights best keep the layers' outputs."""
    weight = torch.cat([m.weight for m in linears])
    reference = inputs @ weight.T
    importance = inputs.abs().mean(0)
    best, best_error = torch.ones_like(importance), float("inf")
    for step in range(_AWQ_GRID):
        s = importance.pow(step / _AWQ_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1, so neither side's range explodes
        rounded = dequantize(
            quantize(weight * s, "int", bits, group_size=group_size, symmetric=symmetric)
        )
        error = float((inputs @ (rounded / s).T - reference).pow(2).mean())
        if error < best_error:
            best, best_error = s, error
    return best


@torch.no_grad()
def smooth_(model: nn.Module, calibration: torch.Tensor, config) -> None:  # config: QuantConfig
    """Fold SmoothQuant's or AWQ's scales into `model` (block by block), in place."""
    layer_blocks = blocks(model)
    if layer_blocks == [model]:
        raise ValueError(
            f"{config.method} folds scales into the layers that feed each linear group and knows "
            "Llama-family blocks (model.model.layers) only; use rtn or gptq for this model"
        )
    for block, run in walk_blocks(model, calibration):
        groups = [
            (producer, linears)
            for producer, linears in scale_groups(block)
            if config.method == "awq" or not isinstance(producer, nn.Linear)
        ]
        inputs_of = collect_inputs(run, [linears[0] for _, linears in groups])
        for (producer, linears), inputs in zip(groups, inputs_of, strict=True):
            if config.method == "smoothquant":
                s = smoothquant_scales(inputs.abs().amax(0), linears, config.alpha)
            else:
                every = max(1, inputs.shape[0] // _AWQ_TOKENS)
                s = awq_scales(
                    inputs[::every][:_AWQ_TOKENS],
                    linears,
                    config.bits,
                    config.group_size,
                    config.symmetric,
                )
            fold_scales(producer, linears, s)

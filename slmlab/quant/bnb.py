"""bitsandbytes' layers in place of a model's linears: the library most practitioners use,
for comparison with slmlab's own (its NF4 codebook and its LLM.int8 are what slmlab's tests
check against).

``bitsandbytes_(model, "nf4")`` swaps every ``nn.Linear`` (except `skip`) for a ``Linear4bit``
(blocks of 64 weights, one absmax each: slmlab's ``QuantConfig(fmt="nf4", group_size=64)``);
``"int8"`` for a ``Linear8bitLt`` with the outlier threshold 6 (slmlab's ``llm_int8``).
bitsandbytes 0.50 runs both on CPU; it is an optional dependency (``pip install slmlab[quant]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..models.swap import KEEP, swap_linears

__all__ = ["bitsandbytes_"]


def bitsandbytes_(model: nn.Module, kind: str = "nf4", *, skip: Sequence[str] = KEEP) -> nn.Module:
    """Replace `model`'s linear layers by bitsandbytes' 4-bit (``nf4``, ``fp4``) or 8-bit
    (``int8``) layers, in place, on the model's device."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(
            "bitsandbytes is not installed: pip install 'slmlab[quant]' (or bitsandbytes)"
        ) from None
    if kind not in ("nf4", "fp4", "int8"):
        raise ValueError(f"kind must be nf4, fp4 or int8, got {kind!r}")

    def build(name: str, linear: nn.Linear) -> nn.Module:
        device = linear.weight.device
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
            )
            layer.load_state_dict(linear.state_dict())  # quantized when moved to the device
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=linear.weight.dtype,
                quant_type=kind,
            )
            layer.weight = bnb.nn.Params4bit(
                linear.weight.detach().clone(), requires_grad=False, quant_type=kind
            )
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer.to(device).eval()

    swap_linears(model, build, "all", skip=skip)
    return model

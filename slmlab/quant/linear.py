"""`quantize_(model, config)`: swap a model's linear layers for quantized ones, in place.

The verb works on plain ``nn.Module``s (torchao's style): every ``nn.Linear`` whose name is not
skipped becomes a `QuantLinear` that stores its weight as codes and scales (codes under 8 bits
packed tightly: two 4-bit codes a byte, eight 3-bit ones in three) and multiplies by a 4-bit
kernel where one applies (C++ on CPU, Triton on CUDA), or else by dequantize-then-matmul, the
reference that every kernel is tested against.

`QuantConfig.method` says how the codes are chosen:

* ``rtn``: round to nearest, layer by layer; needs no data.
* ``gptq``: round one column at a time and let the others absorb the error (`gptq.py`).
* ``awq``: scale the inputs that matter before rounding (`smoothing.py`).
* ``smoothquant``: W8A8, moving activation outliers into the weights (`smoothing.py`).
* ``llm_int8``: int8 weights and activations, outlier input features kept in full precision.

The last three and GPTQ look at calibration data: token ids passed as ``calibration=``.
By default the output head stays in full precision, as in most published 4-bit models.
`embedding_bits` also quantizes the token embedding (per row), which for a small model with a
large vocabulary is a large share of the bytes; the tied output head then shares its codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers.formats import FORMATS, quantize
from ..layers.quantized import QuantEmbedding, QuantLinear
from ..models.swap import KEEP, linear_layers, replace_module
from .calibrate import require_calibration

__all__ = ["METHODS", "QuantConfig", "quantize_"]

METHODS = ("rtn", "gptq", "awq", "smoothquant", "llm_int8")


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize_` does: the method, and the format, bits and granularity of the codes."""

    method: str = "rtn"
    fmt: str = "int"
    bits: int = 4
    group_size: int | None = 128  # None or -1: one scale per output channel
    symmetric: bool = True
    skip: Sequence[str] = KEEP  # module names (suffixes) left in full precision
    embedding_bits: int | None = None  # also quantize the token embedding (int, per row)
    act_order: bool = False  # GPTQ: round the most active input columns first
    alpha: float = 0.5  # SmoothQuant's migration strength
    outlier_threshold: float = 6.0  # LLM.int8: input features reaching this stay unrounded
    activation_bits: int | None = None  # also round each token's activations (8 for W8A8)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; choose from {', '.join(FORMATS)}")
        if self.method in ("gptq", "awq") and self.fmt != "int":
            raise ValueError(
                f"{self.method} chooses integer codes: use fmt='int', not {self.fmt!r}"
            )
        if self.method in ("smoothquant", "llm_int8") and (self.fmt, self.bits) != ("int", 8):
            raise ValueError(f"{self.method} is an int8 method: use fmt='int', bits=8")
        if self.method in ("smoothquant", "llm_int8") and self.activation_bits is None:
            object.__setattr__(self, "activation_bits", 8)  # W8A8 by definition
        if self.activation_bits not in (None, 8):
            raise ValueError(f"activation_bits must be None or 8, got {self.activation_bits}")
        if self.embedding_bits not in (None, 4, 8):
            raise ValueError(f"embedding_bits must be None, 4 or 8, got {self.embedding_bits}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "smoothquant")

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> QuantConfig:
        """A config's ``[where]`` table (``qat``, ``quantize_base``) as a QuantConfig: a field
        that does not exist (a typo such as ``bitz``) is an error, never a default in silence."""
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]} is not a QuantConfig field; known: {known}")
        return cls(**table)


@torch.no_grad()
def quantize_(
    model: nn.Module, config: QuantConfig, *, calibration: torch.Tensor | None = None
) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` (except `config.skip`) by a `QuantLinear`.

    `calibration`: token ids (rows, seq_len) that GPTQ, AWQ and SmoothQuant run through the
    model to see its activations (a few dozen rows of the training distribution suffice).
    """
    targets = linear_layers(model, "all", skip=config.skip)
    if config.needs_calibration:
        require_calibration(calibration, config.method, "quantize_")
    if config.method in ("awq", "smoothquant"):
        from .smoothing import smooth_

        smooth_(model, calibration, config)  # an exactly equivalent model, easier to round
    if config.method == "gptq":
        from .calibrate import check_enough_tokens, sequential_hessians
        from .gptq import gptq_quantize

        check_enough_tokens(calibration, targets, "gptq")

        for name, module, hessian in sequential_hessians(model, calibration, dict(targets)):
            q = gptq_quantize(
                module.weight,
                hessian,
                bits=config.bits,
                group_size=config.group_size,
                symmetric=config.symmetric,
                act_order=config.act_order,
            )
            replace_module(model, name, QuantLinear(q, module.bias))
    else:
        per_channel = config.method in ("smoothquant", "llm_int8")
        for name, module in targets:
            q = quantize(
                module.weight,
                config.fmt,
                config.bits,
                group_size=None if per_channel else config.group_size,
                symmetric=config.symmetric,
            )
            layer = QuantLinear(
                q,
                module.bias,
                activation_bits=config.activation_bits,
                outlier_threshold=config.outlier_threshold if config.method == "llm_int8" else None,
            )
            replace_module(model, name, layer)
    if config.embedding_bits is not None:
        _quantize_embedding(model, config)
    return model


def _quantize_embedding(model: nn.Module, config: QuantConfig) -> None:
    embedding = model.get_submodule("model.embed_tokens")
    group = config.group_size if config.embedding_bits == 4 else None
    if group is not None and embedding.weight.shape[1] % group:
        group = None  # a width the group does not divide: one scale per row
    q = quantize(embedding.weight, "int", config.embedding_bits, group_size=group)
    quantized = QuantEmbedding(q)
    replace_module(model, "model.embed_tokens", quantized)  # a tied head reads the same codes

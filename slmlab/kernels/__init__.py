"""Compiled kernels, built on first use for the machine they run on, with PyTorch fallbacks.

Each kernel has a pure-PyTorch reference that tests compare it with, and that slmlab uses
wherever the kernel cannot be built (no C++ compiler, another platform) or does not apply.
Set ``SLMLAB_KERNELS=0`` to use the references only. The CPU kernels are compiled for this
machine's CPU (``-march=native``); ``SLMLAB_CPU_ARCH`` names another target for GCC's
``-march`` (``x86-64-v3``: any AVX2 CPU), to build for a fleet or to time an older CPU's path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from ..env import cache_dir

__all__ = [
    "Int4Operands",
    "StepContext",
    "cpu_kernels",
    "decode_step",
    "decode_tokens",
    "disabled",
    "embedding_operands",
    "fused_operands",
    "gemv",
    "gemv_many",
    "int4_linear",
    "linear",
    "linear_many",
    "sparse24_linear",
    "triton_available",
]

_HERE = Path(__file__).resolve().parent


_enabled = os.environ.get("SLMLAB_KERNELS", "1") != "0"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the pure-PyTorch references instead of the kernels (tests compare the two)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def cpu_kernels() -> ModuleType | None:
    """The compiled CPU kernels, or None where they cannot be had (the caller falls back)."""
    return _build_cpu_kernels() if _enabled else None


@cache
def _build_cpu_kernels() -> ModuleType | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    from torch.utils.cpp_extension import load

    source = _HERE / "cpu_kernels.cpp"
    # -march=native: the build is for this machine alone, so use every instruction it has, and
    # key the cache on the CPU's features: a cache reused on another CPU must not be loaded there.
    from ..env import cpu_flags

    arch = os.environ.get("SLMLAB_CPU_ARCH", "native")
    cpu = " ".join(sorted(cpu_flags())) or platform.processor()
    key = hashlib.sha256(
        source.read_bytes() + torch.__version__.encode() + cpu.encode() + arch.encode()
    )
    build = cache_dir() / "kernels" / f"cpu-{key.hexdigest()[:12]}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        if not any(build.glob("*.so")):
            print(
                f"slmlab: compiling CPU kernels for -march={arch} (once, about 30 s)...",
                file=sys.stderr,
            )
        return load(
            name="slmlab_cpu_kernels",
            sources=[str(source)],
            build_directory=str(build),
            extra_cflags=["-O3", f"-march={arch}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, an exotic platform: fall back, say why
        hint = (
            ""
            if arch == "native"
            else f" (is SLMLAB_CPU_ARCH={arch!r} a target GCC's -march knows?)"
        )
        warnings.warn(
            f"slmlab CPU kernels unavailable, using PyTorch instead{hint}: {err}", stacklevel=2
        )
        return None


@cache
def triton_available() -> bool:
    """Whether Triton can be imported (the CUDA kernels are written in it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Up to this many rows of x, gemv's products are as fast as PyTorch's or faster (2 cores,
# AVX-512: a 49152 x 576 head, 8 rows, 11.7 against 17.4 ms; at 16 rows PyTorch wins).
GEMV_MAX_ROWS = 8


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel wins for a few rows of fp32 on CPU, outside autograd; PyTorch otherwise.
    Up to `GEMV_MAX_ROWS`: a speculative check's rows then go through the same products as
    tokens decoded one at a time, and come out the same to the bit.

    Called for every linear layer of every decoded token, so it is written to be cheap.
    """
    return (
        _enabled  # first: an exporter tracing with symbolic shapes turns the kernels off
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.device.type == "cpu"
        and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and cpu_kernels() is not None
    )


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (F.linear without bias), by the bandwidth-bound kernel where it applies."""
    if not (_kernel_applies(x, weight) and weight.is_contiguous()):
        return torch.nn.functional.linear(x, weight)
    y = cpu_kernels().gemv(x.reshape(-1, x.shape[-1]), weight)  # type: ignore[union-attr]
    return y.view(*x.shape[:-1], weight.shape[0])


def gemv_many(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x @ w.T for w in weights]`` in one pass over the weights where the kernel applies."""
    if not (
        _kernel_applies(x, weights[0])
        and all(w.dtype is torch.float32 and w.is_contiguous() for w in weights)
    ):
        return [torch.nn.functional.linear(x, w) for w in weights]
    outs = cpu_kernels().gemv_many(x.reshape(-1, x.shape[-1]), weights)  # type: ignore[union-attr]
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]


# Up to this many rows of x, int4_linear quantizes x to int8 and works in integers (decoding);
# more rows dequantize tiles of the weight to fp32 for PyTorch's GEMM (prefill, scoring), which
# is exact. The integer path would be faster up to 64 rows too (4096² layers read from memory,
# 2 cores: 9.3 against 14.5 ms at 64 rows), but a sequence's numbers would then depend on its
# length: it is kept for the few rows of a decoding step, where 4 rows share every unpacked
# block of codes.
INT4_MAX_ROWS_INT8 = 4


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    vector: bool = True,
) -> torch.Tensor | None:
    """``x @ W.T`` for a 4-bit weight W = scales * (codes - zeros) per group, never materialised.

    `codes` are packed two to a byte as `slmlab.quant.pack_int4` packs them, (out, in/2) uint8;
    `zeros` is None for symmetric codes (zero point 8). For up to `INT4_MAX_ROWS_INT8` rows, x is
    quantized to int8 in blocks of 32 (llama.cpp's Q8_0), so the result differs from
    dequantize-then-matmul by that rounding (about 0.5% of the output's scale); for more rows
    it is exact up to fp32 summation order. Returns None where the kernel does not apply (not
    fp32 on CPU, autograd, a group size that is not a multiple of 32, no compiled kernels):
    the caller dequantizes and multiplies instead. `vector=False` runs the portable loop.

    On a CUDA device the Triton kernel (`slmlab.kernels.triton_int4`) does the work, in x's
    dtype, where Triton is installed (``pip install 'slmlab[gpu]'``).
    """
    if x.is_cuda:
        if not (_enabled and triton_available()) or (torch.is_grad_enabled() and x.requires_grad):
            return None
        from .triton_int4 import int4_linear as triton_int4_linear

        return triton_int4_linear(x, codes, scales, zeros, group_size)
    if not (
        x.dtype is torch.float32
        and x.device.type == "cpu"
        and codes.dtype is torch.uint8
        and group_size % 32 == 0
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        return None
    kernels = cpu_kernels()
    if kernels is None:
        return None
    empty = torch.empty(0, dtype=torch.uint8)
    y = kernels.int4_linear(
        x.reshape(-1, x.shape[-1]),
        codes,
        scales,
        empty if zeros is None else zeros,
        group_size,
        INT4_MAX_ROWS_INT8,
        vector,
    )
    return y.view(*x.shape[:-1], codes.shape[0])


# Up to this many rows of x, sparse24_linear multiplies the packed weight; more rows are
# compute-bound, and PyTorch's GEMM on unpacked tiles wins.
SPARSE24_MAX_ROWS = 4


def sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, *, vector: bool = True
) -> torch.Tensor | None:
    """``x @ W.T`` for a 2:4-sparse W stored as its kept values (out, in/2) and their positions
    in their groups of four, 2 bits each, four to a byte (out, in/8) (`slmlab.layers.sparse`).
    Up to `SPARSE24_MAX_ROWS` rows of x (decoding) multiply the packed weight as it is; more
    rows unpack a tile of it at a time for PyTorch's GEMM. Exact up to fp32 summation order.
    Returns None where the kernel does not apply (not fp32 on CPU, autograd, no compiled
    kernels): the caller unpacks the weight and multiplies. `vector=False` runs the portable
    loop."""
    if not (
        x.dtype is torch.float32
        and values.dtype is torch.float32
        and x.device.type == "cpu"
        and positions.dtype is torch.uint8
        and x.shape[-1] % 8 == 0
        and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad))
        and cpu_kernels() is not None
    ):
        return None
    y = cpu_kernels().sparse24_linear(  # type: ignore[union-attr]
        x.reshape(-1, x.shape[-1]), values, positions, SPARSE24_MAX_ROWS, vector
    )
    return y.view(*x.shape[:-1], values.shape[0])


def linear_many(x: torch.Tensor, layers: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Apply several linear layers to the same `x`: one fused kernel pass where it applies.

    Only plain ``nn.Linear`` layers without hooks are fused, and only where the kernel applies
    (a few rows of fp32 on CPU); every other case calls the layers as they are, so a layer
    swapped in (quantized, LoRA) or watched by a hook (calibration) is never bypassed.
    """
    if all(
        type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)
        for layer in layers
    ) and _kernel_applies(x, layers[0].weight):
        outs = gemv_many(x, [layer.weight for layer in layers])
        return [
            y if layer.bias is None else y + layer.bias
            for y, layer in zip(outs, layers, strict=True)
        ]
    return [layer(x) for layer in layers]


def linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """``layer(x)``, through the bandwidth-bound kernel when `layer` is a plain ``nn.Linear``."""
    return linear_many(x, [layer])[0]


class Int4Operands(NamedTuple):
    """A 4-bit weight as `int4_linear` takes it: codes packed two a byte along each row, one
    scale (and, when asymmetric, one zero point) per `group_size` inputs."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int


def fused_operands(layer: torch.nn.Module, rows: int) -> list[torch.Tensor] | None:
    """The three tensors the fused step takes for one projection (see cpu_kernels.cpp), or None
    where it would not compute exactly what the layer computes on its own.

    A plain fp32 ``nn.Linear`` gives its weight; any other layer takes part by offering an
    ``int4_operands()`` method (returning `Int4Operands`, or None when it cannot) or a
    ``sparse24_operands()`` one (its fp32 values and their positions, or None); a layer that
    does none of these makes the caller run every layer through its own ``forward``."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None  # calibration, say: the hook must see the call
    none = torch.empty(0)
    if type(layer) is torch.nn.Linear and layer.weight.dtype is torch.float32:
        return [layer.weight, none, none]
    sparse = getattr(layer, "sparse24_operands", None)
    pair = sparse() if callable(sparse) else None
    if pair is not None:
        return [*pair, none]
    offer = getattr(layer, "int4_operands", None)
    packed = offer() if callable(offer) else None
    if (
        packed is not None
        and packed.group_size % 32 == 0
        and rows <= INT4_MAX_ROWS_INT8  # the rows int4_linear also computes in integers
    ):
        return [packed.codes, packed.scales, none if packed.zeros is None else packed.zeros]
    return None


def embedding_operands(table: torch.nn.Module) -> list[torch.Tensor] | None:
    """The three tensors the fused step looks token ids up in (as `fused_operands` gives a
    projection's), or None where a lookup there would not be the table's own: a plain fp32
    ``nn.Embedding`` gives its weight; a table of 4-bit rows (`QuantEmbedding`) its packed
    codes, read a row at a time and dequantized as the table's forward dequantizes them."""
    if table._forward_hooks or table._forward_pre_hooks:
        return None
    none = torch.empty(0)
    if type(table) is torch.nn.Embedding:
        plain = table.weight.dtype is torch.float32 and table.max_norm is None
        return [table.weight, none, none] if plain else None
    offer = getattr(table, "int4_operands", None)
    packed = offer() if callable(offer) else None
    if packed is None or packed.group_size % 32:
        return None
    return [packed.codes, packed.scales, none if packed.zeros is None else packed.zeros]


# What the compiled step is given for an operand it does not use; never written to.
_EMPTY = torch.empty(0)


class StepContext(NamedTuple):
    """What a compiled decoding call reads besides the weights and the new tokens: each
    block's key and value caches, filled from `length`; the cache's `key_mask` (B, max_len),
    False at padding; the rotary tables `cos` and `sin` (positions, D), indexed by each new
    token's position, the number of real tokens of its row before it (a left-padded row counts
    from 0, as `DecoderLM.forward` numbers it); the norms' epsilon and the head counts."""

    caches: list[list[torch.Tensor]]
    key_mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    length: int
    eps: float
    num_heads: int
    num_kv_heads: int


def decode_step(
    x: torch.Tensor,
    layers: list[list[torch.Tensor]],
    context: StepContext,
    *,
    embedding: list[torch.Tensor] | None = None,
    final_norm: torch.Tensor | None = None,
    head: list[torch.Tensor] | None = None,
    last_only: bool = False,
    row_tokens: list[int] | None = None,
) -> torch.Tensor | None:
    """All blocks of a decoder for a few new tokens per row, in one compiled call.

    `x` (B, T, d) holds the embedded new tokens, or (B, T) their ids, looked up in the rows of
    `embedding` (the table's `embedding_operands`); they continue the cache causally (T is 1
    when decoding, a few when a speculative step checks a draft). `layers` holds, per block, the input norm's weight, the
    three tensors `fused_operands` gives for each of q, k, v, q/k/v's biases (empty tensors
    where there are none), o's operands, the post-attention norm's weight, and gate's, up's and
    down's operands; `context` the caches and the rest (`StepContext`).

    With `row_tokens` (a count of 1 or more for each of the cache's B rows), the rows take
    different numbers of tokens: `x` (N, d) or (N,) holds row 0's tokens, then row 1's, and so
    on, and every row's last token goes to the cache's position `length`, the ones before it
    just in front (a newcomer's whole prompt beside the running rows' one token each, in one
    call: chunked prefill, as serving engines batch them).

    Returns the residual stream (B, T, d) after the last block; with `final_norm` (the last
    RMSNorm's weight) that stream normed, and with `head` too (`fused_operands` of the output
    head) the logits (B, T, vocab), of each row's last token alone where `last_only` (B, 1,
    ...); (N, ...) with `row_tokens` unless `last_only`. None where the kernels cannot be built
    (the caller runs the blocks itself)."""
    kernels = cpu_kernels()
    if kernels is None:
        return None
    if head is not None and final_norm is None:
        raise ValueError("decode_step applies the head to the normed stream: give final_norm too")
    if row_tokens is None:
        B, T = x.shape[:2]
        ids = x.dim() == 2
        counts = _EMPTY
    else:
        B, T = len(row_tokens), 1
        ids = x.dim() == 1
        counts = torch.tensor(row_tokens, dtype=torch.int64)
    if ids and embedding is None:
        raise ValueError("decode_step was given token ids: give their embedding too")
    none = _EMPTY
    out = kernels.decode_step(
        none if ids else x,
        x if ids else none,
        [] if embedding is None else embedding,
        layers,
        *context,
        T,
        counts,
        none if final_norm is None else final_norm,
        [] if head is None else head,
        last_only,
    )
    if last_only and final_norm is not None:
        return out.view(B, 1, -1)
    return out if row_tokens is not None else out.view(B, T, -1)


def decode_tokens(
    ids: torch.Tensor,
    embedding: list[torch.Tensor],
    layers: list[list[torch.Tensor]],
    context: StepContext,
    final_norm: torch.Tensor,
    head: list[torch.Tensor],
    steps: int,
    *,
    min_confidence: float = 0.0,
    temperature: float = 1.0,
    races: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A few decoding steps in one compiled call: `decode_step` on the token `ids` (B, T),
    then on each row's last choice, `steps` times in all. Returns the choices (B, T + steps -
    1): after each of the T tokens, then after each choice fed back (the caches take in all but
    the last choice), and the distributions drawn from, or None.

    A choice is the greedy one (the argmax of the logits, the first of equal maxima, as
    ``torch.argmax``), except with `races` (B, steps, vocab) of Exp(1) draws: the choice after
    each row's last token of a step is then drawn from the softmax of the logits at
    `temperature`, as `slmlab.infer.generate.draw` draws it given those races, and the
    distributions (B, steps, vocab) come back too, those of steps not taken left unset. With
    `min_confidence`, the steps end after one whose choices all had a probability (softmax of
    the logits) below it, and fewer columns come back. None where the kernels cannot be
    built."""
    kernels = cpu_kernels()
    if kernels is None:
        return None
    probs = None if races is None else torch.empty_like(races)
    chosen = kernels.decode_tokens(
        ids,
        embedding,
        layers,
        *context,
        ids.shape[1],
        final_norm,
        head,
        steps,
        min_confidence,
        temperature,
        _EMPTY if races is None else races,
        _EMPTY if probs is None else probs,
    )
    return chosen, probs

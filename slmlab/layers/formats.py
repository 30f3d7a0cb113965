"""Number formats for weights: integers with scales, 4-bit codebooks, 8-bit floats, packing.

A quantized tensor is small integers (or codebook indices) plus, for each *group* of weights, a
scale (and, if asymmetric, a zero point) that maps them back to real numbers. The granularity is
where the scales live: one per tensor, one per output channel (row), or one per group of
`group_size` consecutive weights of a row. Smaller groups follow the weights more closely and
cost more scales: 16 bits of scale per 128 weights is 0.125 extra bits per weight.

* ``int``, symmetric: q = round(w / s) in [−(2^(b−1) − 1), 2^(b−1) − 1], s = absmax / (2^(b−1) − 1);
  asymmetric: q = round(w / s) + z in [0, 2^b − 1], with s = (max − min) / (2^b − 1) and z the
  integer that puts min at 0 (round-to-nearest, "RTN").
* ``ternary``: {−1, 0, +1} times each group's mean |w| (BitNet b1.58), stored as 2-bit codes.
* ``nf4``: 16 values at the quantiles of a normal distribution (QLoRA), scaled by the group's
  absmax: bitsandbytes' codebook, built here from the inverse normal CDF.
* ``fp4``: bitsandbytes' 4-bit float (sign, 2-bit exponent, 1-bit mantissa), scaled by absmax.
* ``fp8_e4m3`` / ``fp8_e5m2``: torch's float8 dtypes, one scale per tensor or channel mapping the
  absmax to the format's largest finite value.

Error bound (tested): for round-to-nearest integers, every weight is off by at most half a step,
|w − ŵ| ≤ s/2 of its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FORMATS",
    "QuantizedTensor",
    "absmax_round",
    "absmax_scale",
    "codebook",
    "dequantize",
    "int_codes",
    "int_grid",
    "pack_codes",
    "pack_int4",
    "quantize",
    "unpack_codes",
    "unpack_int4",
]

FORMATS = ("int", "ternary", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2")
_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def codebook(fmt: str) -> torch.Tensor:
    """The 16 values (sorted, in [−1, 1]) of a 4-bit codebook format."""
    if fmt == "nf4":
        # QLoRA's NormalFloat: 8 positive and 7 negative quantiles of N(0, 1) plus an exact 0,
        # the outermost at probability `offset` (bitsandbytes' create_normal_map), normalised.
        offset = 0.9677083
        positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
        negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
        values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    elif fmt == "fp4":
        # sign × 2^e × (1 + m/2) for exponent e in 1..3, and a subnormal 0.0625 × m at e = 0.
        magnitudes = [0.0, 0.0625] + [2.0**e * (1 + m / 2) for e in (1, 2, 3) for m in (0, 1)]
        values = torch.tensor(
            magnitudes + [-v for v in magnitudes[1:]] + [0.0], dtype=torch.float64
        )
    else:
        raise ValueError(f"{fmt!r} is not a codebook format (nf4, fp4)")
    values = values / values.abs().max()
    return values.sort().values.float()


@dataclass
class QuantizedTensor:
    """Integer codes (unpacked, one per weight, as uint8 or a float8 dtype) with their scales."""

    codes: torch.Tensor  # (rows, cols)
    scales: torch.Tensor  # (rows, groups) float32
    zeros: torch.Tensor | None  # (rows, groups) uint8, asymmetric int only
    fmt: str
    bits: int
    group_size: int  # columns per scale

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def _check(weight: torch.Tensor, fmt: str, bits: int, group_size: int | None) -> int:
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "int" and not 2 <= bits <= 8:
        raise ValueError(f"int formats take 2 to 8 bits, got {bits}")
    if fmt == "ternary" and bits != 2:
        raise ValueError(f"ternary weights take 2 bits of storage (log2 3 = 1.58), got bits={bits}")
    if fmt in ("nf4", "fp4") and bits != 4:
        raise ValueError(f"{fmt} is a 4-bit format, got bits={bits}")
    if fmt in _FP8 and bits != 8:
        raise ValueError(f"{fmt} is an 8-bit format, got bits={bits}")
    cols = weight.shape[1]
    group = cols if group_size in (None, -1) else group_size
    if group <= 0 or cols % group:
        raise ValueError(
            f"group_size {group_size} does not divide the layer's input width {cols}: choose a "
            f"divisor of {cols} (or -1 for one group per row)"
        )
    return group


def absmax_scale(x: torch.Tensor, bits: int, *, keepdim: bool = False) -> torch.Tensor:
    """The symmetric scale of each row of `x` (its last dimension): the largest |x| maps to the
    largest `bits`-bit code, 2^(b−1) − 1. Never 0, so an all-zero row divides safely."""
    return x.abs().amax(-1, keepdim=keepdim).clamp(min=1e-12) / (2 ** (bits - 1) - 1)


def absmax_round(
    x: torch.Tensor, bits: int = 8, *, ignore: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` rounded to symmetric `bits`-bit integers with its own absmax scale:
    (codes as floats in ±(2^(b−1) − 1), scale with the row dimension kept). Values where
    `ignore` is true are left out of the scale (LLM.int8's outliers); they are clamped."""
    qmax = 2 ** (bits - 1) - 1
    scale = absmax_scale(x if ignore is None else x.masked_fill(ignore, 0.0), bits, keepdim=True)
    return (x / scale).round().clamp(-qmax, qmax), scale


def int_grid(
    grouped: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest's scale and zero point for each group (the last dimension).

    Symmetric codes are stored offset by 2^(b−1), so both kinds dequantize as s·(q − z): the
    symmetric zero point is the constant 2^(b−1), the asymmetric one puts min(w, 0) at code 0.
    """
    if symmetric:
        scales = absmax_scale(grouped, bits)
        return scales, torch.full_like(scales, 2 ** (bits - 1))
    qmax = 2**bits - 1
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    scales = ((high - low) / qmax).clamp(min=1e-12)
    return scales, (-low / scales).round().clamp(0, qmax)


def int_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """The integer codes of `w` on the grid s·(q − z): round to nearest and clamp (uint8)."""
    low = 1 if symmetric else 0  # symmetric grids are ± (2^(b−1) − 1) steps around the zero
    return ((w / scales).round() + zeros).clamp(low, 2**bits - 1).to(torch.uint8)


def quantize(
    weight: torch.Tensor,
    fmt: str = "int",
    bits: int = 4,
    *,
    group_size: int | None = 128,
    symmetric: bool = True,
    per_tensor: bool = False,
) -> QuantizedTensor:
    """Round-to-nearest quantization of a (out, in) weight, one scale per group of `group_size`
    inputs of each row (``None``/-1: per channel; `per_tensor`: one scale for the tensor)."""
    group = _check(weight, fmt, bits, group_size)
    w = weight.detach().float()
    rows, cols = w.shape
    if per_tensor:
        group = cols
    grouped = w.reshape(rows, cols // group, group)
    if per_tensor:
        grouped = w.reshape(1, 1, rows * cols)
    zeros = None
    if fmt == "int":
        scales, zero_points = int_grid(grouped, bits, symmetric)
        codes = int_codes(grouped, scales[..., None], zero_points[..., None], bits, symmetric)
        zeros = None if symmetric else zero_points.to(torch.uint8)
    elif fmt == "ternary":
        # BitNet b1.58: {−1, 0, +1} times the mean magnitude (absmean), not the maximum, so
        # that small weights become 0 and the rest ±1 (stored offset by 2, as 2-bit ints).
        scales = grouped.abs().mean(-1).clamp(min=1e-12)
        codes = ((grouped / scales[..., None]).round().clamp(-1, 1) + 2).to(torch.uint8)
    elif fmt in ("nf4", "fp4"):
        values = codebook(fmt)
        scales = grouped.abs().amax(-1).clamp(min=1e-12)
        normed = grouped / scales[..., None]
        # Nearest codebook value: search the midpoints between sorted values.
        codes = torch.bucketize(normed, (values[1:] + values[:-1]) / 2).to(torch.uint8)
    else:
        dtype = _FP8[fmt]
        scales = grouped.abs().amax(-1).clamp(min=1e-12) / torch.finfo(dtype).max
        codes = (grouped / scales[..., None]).to(dtype)
    if per_tensor:
        codes = codes.reshape(rows, cols)
        scales = scales.reshape(1, 1).expand(rows, 1).contiguous()
        zeros = zeros.reshape(1, 1).expand(rows, 1).contiguous() if zeros is not None else None
        group = cols
    return QuantizedTensor(
        codes.reshape(rows, cols), scales.reshape(rows, -1), zeros, fmt, bits, group
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real-valued weight that `q` stands for."""
    rows, cols = q.shape
    codes = q.codes.reshape(rows, cols // q.group_size, q.group_size)
    if q.fmt in ("int", "ternary"):
        offset = q.zeros.float()[..., None] if q.zeros is not None else float(2 ** (q.bits - 1))
        values = codes.float() - offset
    elif q.fmt in ("nf4", "fp4"):
        values = codebook(q.fmt)[codes.long()]
    else:
        values = codes.float()
    return (values * q.scales[..., None]).reshape(rows, cols).to(dtype)


def _word(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest run of `bits`-bit codes that fills whole bytes: (2, 1)
    for 4 bits, (4, 1) for 2, (8, 3) for 3. At most 7 bytes, so a word fits in an int64."""
    common = math.gcd(bits, 8)
    return 8 // common, bits // common


def _wide(word_bytes: int) -> torch.dtype:
    """The narrowest integer that holds a word (int32 is faster than int64 where it fits)."""
    return torch.int32 if word_bytes <= 3 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`bits`-bit codes (1 to 7) packed tightly along the last dimension: (…, n) uint8 →
    (…, n·bits/8) uint8. The codes form one little-endian bit stream, code i in bits
    [i·bits, (i+1)·bits): two 4-bit or four 2-bit codes fill a byte, the lowest index in the
    lowest bits, and eight 3-bit codes fill three bytes, two of them across a byte boundary."""
    if not 1 <= bits <= 7:
        raise ValueError(f"packing takes 1- to 7-bit codes, got {bits} bits")
    per_word, word_bytes = _word(bits)
    if codes.shape[-1] % per_word:
        raise ValueError(
            f"packing {bits}-bit codes needs a last dimension divisible by {per_word}, "
            f"got {codes.shape[-1]}"
        )
    checkable = codes.numel() and codes.device.type != "meta"  # meta: shapes only
    if codes.dtype != torch.uint8 or (checkable and int(codes.max()) >= 2**bits):
        raise ValueError(f"packing takes uint8 codes in 0..{2**bits - 1}")
    # Each word's codes into one integer, then that integer's bytes, lowest first.
    grouped = codes.reshape(*codes.shape[:-1], -1, per_word).to(_wide(word_bytes))
    word = sum(grouped[..., i] << (bits * i) for i in range(per_word))
    parts = [((word >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(word_bytes)]
    return torch.stack(parts, dim=-1).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`."""
    per_word, word_bytes = _word(bits)
    grouped = packed.reshape(*packed.shape[:-1], -1, word_bytes)
    if word_bytes == 1:  # 1, 2 or 4 bits: shift the bytes themselves, no wider integer
        word = grouped[..., 0]
    else:
        grouped = grouped.to(_wide(word_bytes))
        word = sum(grouped[..., j] << (8 * j) for j in range(word_bytes))
    mask = 2**bits - 1
    parts = [((word >> (bits * i)) & mask).to(torch.uint8) for i in range(per_word)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the even-indexed one in the low nibble (the int4 kernel's
    layout): ``pack_codes(codes, 4)``."""
    return pack_codes(codes, 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`."""
    return unpack_codes(packed, 4)

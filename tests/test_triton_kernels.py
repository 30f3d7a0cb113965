"""The Triton int4 kernel (CUDA) against dequantize-then-matmul.

On a CUDA machine the kernel runs there. Without one, Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess because Triton reads it when a kernel is defined) runs
the very same kernel on CPU tensors, so its indexing, unpacking and masking are still checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmlab import kernels

needs_triton = pytest.mark.skipif(
    not kernels.triton_available(),
    reason="Triton is not installed (pip install 'slmlab[gpu]'): the CUDA int4 kernel is not checked",
)

# (rows, out, in, group): one row and a few (decoding, split over the inputs), many rows, widths
# that do not fill a tile, groups that span whole tiles (scaled per output), and groups that do
# not (48: scaled per weight; 21: odd, so a byte's two inputs can belong to different groups).
SHAPES = [
    (1, 40, 96, 32),
    (3, 130, 256, 128),
    (20, 64, 192, 64),
    (70, 200, 512, 256),
    (5, 48, 192, 48),
    (2, 24, 42, 21),
]


def check_against_dequantize(device: str, dtype: torch.dtype, tolerance: float) -> None:
    """The kernel's output equals x @ dequantize(W).T (computed in fp64) within `tolerance`
    of the output's scale, for symmetric and asymmetric codes and every shape above, both by
    the path `int4_linear` picks and by the fused kernel forced; and `dequantize_int4` gives
    exactly `slmlab.quant.dequantize`'s weight, rounded once to fp32, fp16 or bf16."""
    from slmlab.kernels.triton_int4 import dequantize_int4, int4_linear, launch_config
    from slmlab.quant import dequantize, pack_int4, quantize

    torch.manual_seed(0)
    for symmetric in (True, False):
        for rows, out, width, group in SHAPES:
            weight = torch.randn(out, width) * 0.05
            weight[out // 2, width // 3] = 1.0  # an outlier in one group
            q = quantize(weight, "int", 4, group_size=group, symmetric=symmetric)
            x = torch.randn(rows, width)
            exact = x.double() @ dequantize(q).double().T
            packed = (
                pack_int4(q.codes).to(device),
                q.scales.to(device),
                None if q.zeros is None else q.zeros.to(device),
                group,
            )
            # (Triton's CPU interpreter rounds to bf16 by truncation; the GPU rounds to nearest.)
            dtypes = [torch.float32, torch.float16] + [torch.bfloat16] * (device == "cuda")
            for weight_dtype in dtypes:
                w = dequantize_int4(*packed, weight_dtype).cpu()
                assert torch.equal(w, dequantize(q).to(weight_dtype)), weight_dtype
            for config in (None, launch_config(rows, out, width, group)):
                y = int4_linear(x.to(device, dtype), *packed, config)
                assert y.dtype == dtype and y.shape == (rows, out)
                error = (y.double().cpu() - exact).abs().max() / exact.abs().max()
                assert error < tolerance, (symmetric, rows, out, width, group, config, float(error))


@needs_triton
def test_triton_int4_in_the_interpreter() -> None:
    root = Path(__file__).resolve().parents[1]
    script = (
        "import torch, tests.test_triton_kernels as t; "
        "t.check_against_dequantize('cpu', torch.float32, 1e-6)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # fp32 is multiplied in full precision; fp16/bf16 round x and the weights to 11 / 8 bits.
    [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)],
)
def test_triton_int4_on_cuda(dtype: torch.dtype, tolerance: float) -> None:
    check_against_dequantize("cuda", dtype, tolerance)


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_model_on_cuda_runs_the_kernel(monkeypatch) -> None:
    """A 4-bit model on the GPU gives the logits of its dequantized weights, through Triton."""
    from slmlab.kernels import triton_int4
    from slmlab.quant import QuantConfig, quantize_

    from .test_quant_methods import small_model  # widths 64 and 128: groups of 64 divide both

    model = quantize_(small_model(), QuantConfig(bits=4, group_size=64)).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), kernels.disabled():
        reference = model(ids)  # CPU, dequantize then multiply
    calls = []
    kernel = triton_int4.int4_linear
    monkeypatch.setattr(triton_int4, "int4_linear", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        logits = model.cuda()(ids.cuda()).cpu()
    assert len(calls) == 2 * 7  # q, k, v, o, gate, up, down in each block
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)

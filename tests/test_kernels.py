"""Compiled kernels against their pure-PyTorch references."""

from __future__ import annotations

import pytest
import torch

import slmlab
from slmlab import kernels
from slmlab.infer import KVCache
from slmlab.models import DecoderLM

from .hf_reference import VARIANTS, perturb_norms_and_biases

pytestmark = pytest.mark.skipif(
    kernels.cpu_kernels() is None,
    reason="CPU kernels could not be built here (no compiler or not x86-64)",
)


@pytest.mark.parametrize(
    ("rows", "n", "k"), [(1, 768, 768), (1, 300, 97), (3, 64, 1536), (4, 8192, 64)]
)
def test_gemv_matches_linear(rows: int, n: int, k: int) -> None:
    x, w = torch.randn(rows, k), torch.randn(n, k)
    torch.testing.assert_close(kernels.gemv(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
    ys = kernels.gemv_many(x, [w, w[: n // 2].contiguous()])
    torch.testing.assert_close(ys[1], x @ w[: n // 2].T, rtol=1e-5, atol=1e-4)


def test_gemv_falls_back_outside_its_domain() -> None:
    x, w = torch.randn(64, 32), torch.randn(16, 32)  # too many rows: PyTorch's matmul wins
    torch.testing.assert_close(kernels.gemv(x, w), x @ w.T)
    xb = x[:1].bfloat16()
    torch.testing.assert_close(kernels.gemv(xb, w.bfloat16()), xb @ w.bfloat16().T)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_step_matches_the_blocks(name: str) -> None:
    """Logits and cache after each decode step equal the PyTorch blocks', padded batch included."""
    config = VARIANTS[name]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    ids = torch.randint(0, config.vocab_size, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    results = []
    for use_kernels in (True, False):
        cache = KVCache(config, 3, 20)
        steps = []
        with torch.no_grad():
            ctx = kernels.disabled() if not use_kernels else torch.no_grad()
            with ctx:
                model(ids[:, :8], mask[:, :8], cache)
                for t in range(8, 12):
                    steps.append(model(ids[:, t : t + 1], mask[:, t : t + 1], cache))
        results.append((torch.cat(steps, 1), cache.keys[-1][:, :, :12], cache.values[0][:, :, :12]))
    for fast, reference in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_generation_same_tokens_with_and_without_kernels() -> None:
    model = DecoderLM(VARIANTS["qwen2-bias"]).eval()
    prompts = [[3, 4, 5, 6], [7]]
    fast = slmlab.generate(model, prompts, 24, stop_tokens=())
    with kernels.disabled():
        assert slmlab.generate(model, prompts, 24, stop_tokens=()) == fast

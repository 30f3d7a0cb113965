from __future__ import annotations

import pytest
import torch

from slmlab import env


def test_default_dtype_follows_measurement() -> None:
    expected = torch.bfloat16 if env.bf16_is_fast("cpu") else torch.float32
    assert env.default_dtype("cpu") == expected


def test_absent_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match=r"no CUDA device is available.*--device cpu"):
        env.pick_device("cuda")
    assert env.pick_device("auto").type == "cpu"


def test_report_has_versions() -> None:
    info = env.report()
    assert info["torch"] == torch.__version__ or str(info["torch"]).startswith(
        torch.__version__[:4]
    )
    assert info["cpu_fp32_gflops"] > 0

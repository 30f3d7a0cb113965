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


def test_best_seconds_is_the_shortest_call_of_a_count_or_a_window() -> None:
    import time

    durations = iter([0.03, 0.005, 0.02])
    calls = []

    def call() -> None:
        calls.append(next(durations))
        time.sleep(calls[-1])

    best = env.best_seconds(call, repeats=3)
    assert len(calls) == 3 and 0.005 <= best < 0.02
    # a call starts only while the window is open: each takes 10 ms, so 5 at most in 50 ms
    timed = []
    best = env.best_seconds(lambda: timed.append(time.sleep(0.01)), seconds=0.05)
    assert 1 <= len(timed) <= 5 and best >= 0.01
    once = []
    env.best_seconds(lambda: once.append(1), seconds=0.0)
    assert once == [1]
    # both: the count first, then more while the window is open
    both = []
    env.best_seconds(lambda: both.append(time.sleep(0.01)), repeats=3, seconds=0.0)
    assert len(both) == 3
    both.clear()
    env.best_seconds(lambda: both.append(time.sleep(0.01)), repeats=2, seconds=0.2)
    assert 3 <= len(both) <= 20  # 200 ms of calls of 10 ms or more
    five = []
    env.best_seconds(lambda: five.append(1))
    assert len(five) == 5
    with pytest.raises(ValueError, match="time one call at least"):
        env.best_seconds(call, repeats=0)

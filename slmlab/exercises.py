"""Exercises that grade themselves: ``check("08.rtn", my_rtn)``.

Each exercise asks the reader to write one piece that the library hides behind a call, and
checks it on cases the reader does not see (shapes, dtypes, edge cases, seeded random inputs)
against the library's own implementation, which the test suite in turn checks against an
independent reference (PyTorch's, transformers', a closed form). The answer is one paragraph:
how many cases passed, or the first that failed with its input, what was expected and what came
back, and a hint. The reader's code raising is an answer too, never a traceback.

    from slmlab.exercises import check, show
    show("08.rtn")            # what to write
    check("08.rtn", my_rtn)   # how it went
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .layers.formats import dequantize, quantize
from .models import ModelConfig
from .models.decoder import RMSNorm
from .models.rope import apply_rope, inverse_frequencies
from .train.config import TrainConfig
from .train.optim import lr_at


@dataclass(frozen=True)
class Case:
    """One hidden input: how the paragraph names it, and the arguments."""

    label: str
    args: tuple


@dataclass(frozen=True)
class Exercise:
    name: str
    task: str  # what to write, with its signature
    expected: Callable[..., Any]  # the library's answer for a case's arguments
    cases: Callable[[], Iterator[Case]]
    hint: str
    atol: float = 1e-5
    rtol: float = 1e-5
    # Plausible wrong answers (an off-by-one, a missing scale, a wrong axis): the test suite
    # checks that each one is rejected, so a check that passes everything cannot hide here.
    wrong: dict[str, Callable[..., Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    name: str
    passed: bool
    message: str

    def __str__(self) -> str:
        return self.message

    def _repr_markdown_(self) -> str:
        return ("✅ " if self.passed else "❌ ") + self.message


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8:
            return f"tensor({[round(v, 5) for v in value.flatten().tolist()]}, shape {tuple(value.shape)})"
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _mismatch(got: Any, want: Any, atol: float, rtol: float) -> str | None:
    """Why `got` is not `want`, or None when it is (tensors within tolerance, same shape)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor, got {type(got).__name__}"
        if got.shape != want.shape:
            return f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
        if got.dtype != want.dtype:
            return f"expected dtype {want.dtype}, got {got.dtype}"
        if not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True):
            worst = (got.double() - want.double()).abs().flatten().argmax().item()
            return (
                f"largest difference at flat index {worst}: expected "
                f"{want.flatten()[worst].item():.6g}, got {got.flatten()[worst].item():.6g}"
            )
        return None
    if isinstance(want, float):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"expected a number, got {type(got).__name__}"
        if not math.isclose(got, want, rel_tol=rtol, abs_tol=atol):
            return f"expected {want:.6g}, got {got:.6g}"
        return None
    return None if got == want else f"expected {want!r}, got {got!r}"


def check(name: str, fn: Callable[..., Any]) -> Result:
    """Run `fn` on exercise `name`'s hidden cases and answer in one paragraph (also returned)."""
    exercise = _get(name)
    cases = list(exercise.cases())
    for number, case in enumerate(cases, start=1):
        want = exercise.expected(*case.args)
        where = (
            f"{name}: {number - 1} of {len(cases)} cases passed; case {number} ({case.label}), "
            f"with input {', '.join(_describe(a) for a in case.args)},"
        )
        try:
            got = fn(*_copies(case.args))
        except Exception as err:  # the reader's code: its error is the answer, not a traceback
            message = f"{where} raised {type(err).__name__}: {err}. Hint: {exercise.hint}"
            return Result(name, False, message)
        why = _mismatch(got, want, exercise.atol, exercise.rtol)
        if why is not None:
            shown = (
                isinstance(want, torch.Tensor) and want.numel() <= 8 and why.startswith("largest")
            )
            values = f"; expected {_describe(want)}, got {_describe(got)}" if shown else ""
            message = f"{where} is wrong: {why}{values}. Hint: {exercise.hint}"
            return Result(name, False, message)
    return Result(name, True, f"{name}: all {len(cases)} cases passed.")


def show(name: str) -> str:
    """What exercise `name` asks for."""
    return f"{name}: {_get(name).task}"


def _copies(args: tuple) -> tuple:
    """The reader's function gets copies: one that writes into its input cannot spoil the
    expected answer of the next case."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; there are {sorted(EXERCISES)}")
    return EXERCISES[name]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# 03.rmsnorm ---------------------------------------------------------------------------------


def _rmsnorm_expected(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(weight.numel(), eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _rmsnorm_cases() -> Iterator[Case]:
    g = _generator(0)
    yield Case(
        "one row of 4, weight 1", (torch.tensor([[1.0, -2.0, 3.0, -4.0]]), torch.ones(4), 1e-6)
    )
    yield Case(
        "x (2, 3, 8), a random weight",
        (torch.randn(2, 3, 8, generator=g), torch.randn(8, generator=g), 1e-6),
    )
    yield Case(
        "tiny values, where eps matters",
        (1e-4 * torch.randn(3, 16, generator=g), torch.ones(16), 1e-5),
    )
    yield Case("a row of zeros", (torch.zeros(2, 8), torch.randn(8, generator=g), 1e-6))


# 03.rope ------------------------------------------------------------------------------------


def _rope_expected(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    head_dim = x.shape[-1]
    config = ModelConfig(
        vocab_size=1,
        hidden_size=head_dim,
        intermediate_size=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        rope_theta=theta,
    )
    angles = torch.outer(positions.float(), inverse_frequencies(config))
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1)
    return apply_rope(x, cos, signed_sin)


def _rope_cases() -> Iterator[Case]:
    g = _generator(1)
    yield Case(
        "position 0 changes nothing",
        (torch.randn(1, 1, 1, 8, generator=g), torch.tensor([0]), 10000.0),
    )
    yield Case(
        "(1, 2, 5, 8), positions 0..4",
        (torch.randn(1, 2, 5, 8, generator=g), torch.arange(5), 10000.0),
    )
    yield Case(
        "(2, 3, 4, 16), positions 7..10, θ 500000",
        (torch.randn(2, 3, 4, 16, generator=g), torch.arange(7, 11), 500000.0),
    )


# 08.rtn -------------------------------------------------------------------------------------


def _rtn_expected(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize(quantize(w, "int", 4, group_size=group_size, symmetric=True))


def _rtn_cases() -> Iterator[Case]:
    g = _generator(2)
    yield Case(
        "one group of 8 with its largest at 7",
        (torch.tensor([[7.0, -3.5, 1.2, 0.4, -0.49, 0.51, 2.0, -7.0]]), 8),
    )
    yield Case("(4, 64) in groups of 16", (torch.randn(4, 64, generator=g), 16))
    yield Case(
        "(8, 96) in groups of 32, one loud column",
        (torch.randn(8, 96, generator=g) * torch.linspace(0.1, 10, 96), 32),
    )
    yield Case(
        "a group of zeros", (torch.cat((torch.zeros(2, 8), torch.randn(2, 8, generator=g)), 1), 8)
    )


# 05.lr --------------------------------------------------------------------------------------


def _lr_expected(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    tiny = {
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
    }
    config = TrainConfig(model=tiny, lr=lr, min_lr=min_lr, warmup_steps=warmup, steps=steps)
    return lr_at(step, config)


def _lr_cases() -> Iterator[Case]:
    for step in (0, 1, 9, 10, 11, 50, 99, 100, 140):
        yield Case(f"step {step} of 100, warm-up 10, lr 1e-3 to 1e-4", (step, 1e-3, 1e-4, 10, 100))
    yield Case("no warm-up, step 0", (0, 3e-4, 0.0, 0, 10))


# 11.perplexity ------------------------------------------------------------------------------


def _perplexity_expected(logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    return math.exp(-(logprobs * mask).sum().item() / mask.sum().item())


def _perplexity_cases() -> Iterator[Case]:
    g = _generator(3)
    yield Case(
        "a uniform guess over 4 tokens", (torch.full((1, 5), math.log(1 / 4)), torch.ones(1, 5))
    )
    logits = torch.randn(3, 7, 50, generator=g)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0  # a shorter row, padded
    mask[2, 1:] = 0
    yield Case("3 rows of different lengths (padding masked)", (logprobs, mask))


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in (
        Exercise(
            "03.rmsnorm",
            "rms_norm(x, weight, eps) -> x / sqrt(mean(x², last dim) + eps) · weight, in x's shape.",
            _rmsnorm_expected,
            _rmsnorm_cases,
            "the mean is over the last dimension only, and eps goes inside the square root.",
            wrong={
                "eps outside the root": lambda x, w, eps: (
                    x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w
                ),
                "LayerNorm (mean removed)": lambda x, w, eps: F.layer_norm(x, w.shape, eps=eps) * w,
                "mean over the first dimension": lambda x, w, eps: (
                    x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * w
                ),
            },
        ),
        Exercise(
            "03.rope",
            "rope(x, positions, theta) for x of shape (B, H, T, D): channel i and i + D/2 turn "
            "together by position · theta^(-2i/D) (the rotate-half layout Llama uses).",
            _rope_expected,
            _rope_cases,
            "pair channel i with i + D/2 (not with i + 1), and turn by +angle: x·cos + rotate_half(x)·sin.",
            atol=1e-4,
            wrong={
                "interleaved pairs": lambda x, p, t: _rope_interleaved(x, p, t),
                "the opposite turn": lambda x, p, t: _rope_expected(x, -p, t),
                "positions from 1": lambda x, p, t: _rope_expected(x, p + 1, t),
            },
        ),
        Exercise(
            "08.rtn",
            "rtn_int4(w, group_size) -> w rounded to symmetric int4 in groups of group_size "
            "inputs per row and back: scale = max|w| of the group / 7, codes in [-7, 7].",
            _rtn_expected,
            _rtn_cases,
            "one scale per group of each row, the group's largest |w| onto code 7; round to "
            "nearest, then multiply back.",
            wrong={
                "one scale per row": lambda w, g: _rtn_expected(w, w.shape[1]),
                "scale by 8": lambda w, g: _rtn_by(w, g, 8),
                "truncated, not rounded": lambda w, g: _rtn_by(w, g, 7, torch.trunc),
            },
        ),
        Exercise(
            "05.lr",
            "lr(step, lr, min_lr, warmup, steps) -> linear warm-up to lr over steps 0..warmup−1 "
            "(step 0 already at lr/warmup), then a cosine from lr down to min_lr at the last step.",
            _lr_expected,
            _lr_cases,
            "warm-up reaches lr at step warmup−1: lr·(step+1)/warmup; the cosine's progress "
            "counts from the end of warm-up and stops at 1 past the last step.",
            atol=1e-12,
            rtol=1e-9,
            wrong={
                "warm-up from 0": lambda s, lr, m, w, n: (
                    lr * s / w if s < w else _lr_expected(s, lr, m, w, n)
                ),
                "decay to 0": lambda s, lr, m, w, n: _lr_expected(s, lr, 0.0, w, n),
                "cosine over all steps": lambda s, lr, m, w, n: (
                    _lr_expected(s, lr, m, w, n)
                    if s < w
                    else m + 0.5 * (lr - m) * (1 + math.cos(math.pi * min(1.0, s / n)))
                ),
            },
        ),
        Exercise(
            "11.perplexity",
            "perplexity(logprobs, mask) -> exp of minus the mean natural-log probability of the "
            "tokens where mask is 1, over all rows together.",
            _perplexity_expected,
            _perplexity_cases,
            "average over the real tokens of every row together (not row by row), in nats.",
            wrong={
                "padding counted": lambda lp, m: math.exp(-(lp * m).sum().item() / m.numel()),
                "mean of the rows' perplexities": lambda lp, m: (
                    sum(
                        math.exp(-(lp[i] * m[i]).sum().item() / m[i].sum().item())
                        for i in range(len(m))
                    )
                    / len(m)
                ),
                "base 2": lambda lp, m: 2 ** (-(lp * m).sum().item() / m.sum().item()),
            },
        ),
    )
}


def _rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(positions.float(), inv)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angles.cos() - odd * angles.sin()
    out[..., 1::2] = even * angles.sin() + odd * angles.cos()
    return out


def _rtn_by(w: torch.Tensor, group: int, divisor: int, rounding=torch.round) -> torch.Tensor:
    rows, cols = w.shape
    grouped = w.reshape(rows, cols // group, group)
    scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / divisor
    return (rounding(grouped / scale).clamp(-8, 7) * scale).reshape(rows, cols)

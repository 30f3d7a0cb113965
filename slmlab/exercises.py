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

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from .data.chat import IGNORE
from .data.packing import pack
from .distill.losses import divergence
from .eval import TextScore, choice_picks
from .export.k_quants import quantize_q4_k
from .infer.speculative import residual_distribution
from .layers.formats import dequantize, quantize
from .models import ModelConfig
from .models.budget import kv_cache_bytes_per_token, param_count
from .models.decoder import KVCache, RMSNorm, recent_keys
from .models.mlp import top_k_routing
from .models.rope import apply_rope, inverse_frequencies
from .models.ssm import ssd_step
from .prune.masks import top_mask, wanda_scores
from .quant.gptq import gptq_quantize
from .tokenizers.bpe import merge_pair
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
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, list) and len(repr(value)) > 80:
        return f"a list of {len(value)} items"
    return repr(value)


def _mismatch(got: Any, want: Any, atol: float, rtol: float) -> str | None:
    """Why `got` is not `want`, or None when it is (tensors within tolerance, same shape)."""
    if isinstance(want, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"expected {len(want)} results, got {_describe(got)}"
        for k, (one, wanted) in enumerate(zip(got, want, strict=True)):
            why = _mismatch(one, wanted, atol, rtol)
            if why is not None:
                return f"result {k + 1} of {len(want)}: {why}"
        return None
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
        if isinstance(got, torch.Tensor) and got.numel() == 1:  # a loss as a 0-d tensor
            got = got.item()
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


# 05.adamw -----------------------------------------------------------------------------------


def _adamw_expected(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One step of PyTorch's AdamW (what the training loop uses) from the given moments."""
    param = torch.nn.Parameter(p.clone())
    optimizer = torch.optim.AdamW(
        [param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )
    param.grad = g.clone()
    state = optimizer.state[param]
    state["step"] = torch.tensor(float(step - 1))
    state["exp_avg"], state["exp_avg_sq"] = m.clone(), v.clone()
    optimizer.step()
    return param.detach(), state["exp_avg"], state["exp_avg_sq"]


def _adamw_cases() -> Iterator[Case]:
    g = _generator(4)
    zeros = torch.zeros(3)
    yield Case(
        "the first step, moments at zero",
        (
            torch.tensor([1.0, -2.0, 0.5]),
            torch.tensor([0.1, 0.2, -0.3]),
            zeros,
            zeros,
            1,
            1e-2,
            0.9,
            0.999,
            1e-8,
            0.1,
        ),
    )
    p, grad = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    m, v = 0.1 * torch.randn(4, 5, generator=g), 0.01 * torch.rand(4, 5, generator=g)
    yield Case("step 10, moments under way", (p, grad, m, v, 10, 3e-4, 0.9, 0.95, 1e-8, 0.1))
    yield Case("no weight decay, step 3", (p, grad, m, v, 3, 1e-3, 0.8, 0.99, 1e-6, 0.0))
    tiny = torch.tensor([1e-6, -2e-6])
    yield Case(
        "tiny gradients, where eps matters",
        (
            torch.tensor([1.0, -1.0]),
            tiny,
            torch.zeros(2),
            torch.zeros(2),
            1,
            1e-3,
            0.9,
            0.999,
            1e-6,
            0.0,
        ),
    )


# 06.masked_loss -----------------------------------------------------------------------------


def _masked_loss_expected(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def _masked_loss_cases() -> Iterator[Case]:
    g = _generator(5)
    logits = torch.randn(2, 6, 11, generator=g)
    every = torch.randint(0, 11, (2, 6), generator=g)
    yield Case("every token learnt", (logits, every))
    replies = every.clone()
    replies[0, :4] = IGNORE  # the prompt of row 0
    replies[1, :2] = IGNORE
    replies[1, 5] = IGNORE  # and row 1's padding
    yield Case("only the replies learnt (the rest IGNORE = -100)", (logits, replies))


# 08.nf4 -------------------------------------------------------------------------------------


def _nf4_expected(w: torch.Tensor, block: int) -> torch.Tensor:
    return dequantize(quantize(w, "nf4", 4, group_size=block))


def _nf4_cases() -> Iterator[Case]:
    g = _generator(6)
    yield Case(
        "one block of 8", (torch.tensor([[0.9, -0.45, 0.1, 0.0, -1.8, 0.33, 0.7, -0.05]]), 8)
    )
    yield Case("(4, 128) in blocks of 64", (torch.randn(4, 128, generator=g), 64))
    yield Case("(2, 96) in blocks of 32, heavy tails", (torch.randn(2, 96, generator=g) ** 3, 32))


# 11.acc_norm --------------------------------------------------------------------------------


def _picks_expected(loglikelihoods: list[float], choices: list[str]) -> tuple[int, int]:
    picks = choice_picks(loglikelihoods, choices)
    return picks["acc"], picks["acc_norm"]


def _picks_cases() -> Iterator[Case]:
    yield Case(
        "a long choice with the best total",
        ([-9.0, -4.0, -6.5], [" a big red dog", " Tom", " the cat"]),
    )
    yield Case("the shortest wins per character", ([-3.0, -8.0], [" no", " a long answer here"]))
    yield Case(
        "a tie in total, broken per character",
        ([-5.0, -5.0, -7.0], [" apple", " fig", " cherries"]),
    )


# 02.bpe_merge -------------------------------------------------------------------------------


def _merge_cases() -> Iterator[Case]:
    yield Case("a pair that occurs twice", (list("abcab"), ("a", "b")))
    yield Case("three equal parts in a row", (list("aaa"), ("a", "a")))
    yield Case("parts already merged once", (["th", "e", " ", "th", "e", "n"], ("th", "e")))
    yield Case("a pair that never occurs", (list("hello"), ("l", "h")))
    yield Case("one part", (["x"], ("x", "x")))


# 03.gqa_attention ---------------------------------------------------------------------------


def _attention_expected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `slmlab.models.Attention` computes after its projections: causal, grouped."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
    )


def _attention_cases() -> Iterator[Case]:
    g = _generator(7)
    yield Case(
        "4 query heads, 4 key/value heads (MHA)",
        tuple(torch.randn(1, 4, 5, 8, generator=g) for _ in range(3)),
    )
    q = torch.randn(2, 6, 7, 16, generator=g)
    yield Case(
        "6 query heads sharing 2 key/value heads (GQA)",
        (q, torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)),
    )
    yield Case(
        "4 query heads, 1 key/value head (MQA)",
        (q[:, :4], torch.randn(2, 1, 7, 16, generator=g), torch.randn(2, 1, 7, 16, generator=g)),
    )


# 01.param_count, 01.kv_cache_bytes -----------------------------------------------------------

_BUDGET_CONFIGS = (
    ("Llama-shaped, tied head, GQA 8/2", ModelConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2)),
    ("untied head, MHA", ModelConfig(
        vocab_size=500, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, tie_word_embeddings=False)),
    ("MQA, head_dim 32 wider than hidden/heads", ModelConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    ("Qwen2: biases on q, k and v", ModelConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, model_type="qwen2")),
)  # fmt: skip


def _param_cases() -> Iterator[Case]:
    for label, config in _BUDGET_CONFIGS:
        yield Case(label, (config,))


def _params_with(config: ModelConfig, *, head: bool = False, kv_as_q: bool = False,
                 norms_per_block: int = 2) -> int:  # fmt: skip
    counts = param_count(config)
    total = counts.total - config.num_hidden_layers * (2 - norms_per_block) * config.hidden_size
    if head and config.tie_word_embeddings:
        total += config.vocab_size * config.hidden_size
    if kv_as_q:
        total += (
            2 * config.num_hidden_layers * config.hidden_size * (config.q_size - config.kv_size)
        )
    return total


def _kv_cases() -> Iterator[Case]:
    for (label, config), context, width in zip(
        _BUDGET_CONFIGS, (2048, 100, 4096, 1), (2, 4, 1, 2), strict=True
    ):
        yield Case(f"{label}, {context} tokens, {width}-byte values", (config, context, width))


def _kv_expected(config: ModelConfig, context: int, bytes_per_value: int) -> int:
    dtype = {1: "int8", 2: "bf16", 4: "fp32"}[bytes_per_value]
    return kv_cache_bytes_per_token(config, dtype) * context


# 03.sliding_window ---------------------------------------------------------------------------


def _window_expected(length: int, window: int) -> torch.Tensor:
    """The mask `DecoderLM` gives a sliding layer: causal, and the `window` latest keys."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal & recent_keys(0, length, window, torch.device("cpu"))


def _window_cases() -> Iterator[Case]:
    yield Case("8 tokens, a window of 3", (8, 3))
    yield Case("5 tokens, a window of 1 (each token sees itself only)", (5, 1))
    yield Case("6 tokens, a window longer than the text", (6, 10))
    yield Case("12 tokens, a window of 4", (12, 4))


def _window_by(length: int, window: int, *, causal: bool = True) -> torch.Tensor:
    i, j = torch.arange(length)[:, None], torch.arange(length)[None]
    near = (i - j).abs() < window
    return near & (j <= i) if causal else near


# 03.moe_routing --------------------------------------------------------------------------------


def _routing_cases() -> Iterator[Case]:
    g = _generator(11)
    yield Case(
        "6 tokens, 4 experts, top 2, rescaled (Mixtral)", (torch.randn(6, 4, generator=g), 2, True)
    )
    yield Case(
        "5 tokens, 8 experts, top 3, not rescaled (Qwen2-MoE)",
        (torch.randn(5, 8, generator=g), 3, False),
    )
    yield Case("3 tokens, 4 experts, top 1, rescaled", (torch.randn(3, 4, generator=g), 1, True))
    yield Case(
        "4 tokens, 3 experts, all 3 chosen, not rescaled",
        (torch.randn(4, 3, generator=g), 3, False),
    )


def _routing_over_chosen_logits(logits: torch.Tensor, k: int, normalize: bool) -> tuple:
    top, experts = logits.topk(k, dim=-1)
    return experts, top.softmax(dim=-1)


def _routing_least_probable(logits: torch.Tensor, k: int, normalize: bool) -> tuple:
    experts, weights = top_k_routing(-logits, k, False)
    weights = logits.float().softmax(-1).gather(-1, experts)
    return experts, weights / weights.sum(-1, keepdim=True) if normalize else weights


# 03.ssd_step ----------------------------------------------------------------------------------


def _ssd_step_expected(state, x, dt, A, B, C) -> tuple[torch.Tensor, torch.Tensor]:
    y, new = ssd_step(x[None], dt[None], A, B[None], C[None], state[None])
    return y[0], new[0]


def _ssd_step_cases() -> Iterator[Case]:
    g = _generator(17)
    for label, h, p, n in (("2 heads of 3 channels, a state of 4", 2, 3, 4),
                           ("1 head of 5 channels, a state of 2", 1, 5, 2),
                           ("4 heads of 2 channels, a state of 8", 4, 2, 8)):  # fmt: skip
        state = torch.randn(h, p, n, generator=g)
        x, dt = torch.randn(h, p, generator=g), torch.rand(h, generator=g) + 0.1
        A = -torch.rand(h, generator=g) * 3 - 0.1
        B, C = torch.randn(h, n, generator=g), torch.randn(h, n, generator=g)
        yield Case(label, (state, x, dt, A, B, C))
    yield Case("an empty state: the first token", (torch.zeros(2, 3, 4), *(
        t for t in (torch.randn(2, 3, generator=g), torch.full((2,), 0.5), -torch.ones(2),
                    torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)))))  # fmt: skip


def _ssd_step_squeezed(*args, **how) -> tuple[torch.Tensor, torch.Tensor]:
    y, new = _ssd_step_by(*args, **how)
    return y[..., 0], new


def _ssd_step_by(state, x, dt, A, B, C, *, decay_dt=True, write_dt=True, read_new=True):
    decay = torch.exp((dt if decay_dt else 1.0) * A)[:, None, None]
    write = (dt[:, None] if write_dt else 1.0) * x
    new = decay * state + write[..., None] * B[:, None, :]
    return (new if read_new else state) @ C[..., None], new


# 00.bits_per_char ------------------------------------------------------------------------------


def _bpc_expected(token_nats: torch.Tensor, text: str) -> float:
    bits = float(token_nats.double().sum()) / math.log(2)
    return TextScore(bits, len(token_nats), len(text), len(text.encode()), 0).bits_per_char


def _bpc_cases() -> Iterator[Case]:
    g = _generator(0)
    yield Case("three tokens of 'Once upon'", (torch.tensor([2.0, 1.5, 0.5]), "Once upon"))
    yield Case("letters outside ASCII (2 bytes each)", (
        torch.rand(5, generator=g, dtype=torch.float64) * 4, "Léo était là — à midi."))  # fmt: skip
    story = "Once upon a time, Mia found a red ball. She was happy. The end."
    yield Case("a story, 20 tokens", (torch.rand(20, generator=g, dtype=torch.float64) * 3, story))


# 04.pack --------------------------------------------------------------------------------------


def _pack_cases() -> Iterator[Case]:
    yield Case("three documents, rows of 3 + 1", ([[5, 6, 7], [8, 9], [10, 11, 12, 13]], 3, 0))
    yield Case("one long document: the partial last row is dropped", ([list(range(1, 12))], 4, 0))
    yield Case("an empty document keeps its separator", ([[1, 2], [], [3, 4, 5]], 2, 99))
    g = _generator(4)
    lengths = torch.randint(0, 12, (9,), generator=g).tolist()
    documents = [torch.randint(1, 50, (n,), generator=g).tolist() for n in lengths]
    yield Case("nine random documents, seq_len 7", (documents, 7, 0))


def _pack_by(documents, seq_len, separator, *, before=False, pad=False, width=None):
    stream = [t for doc in documents for t in ([separator, *doc] if before else [*doc, separator])]
    width = seq_len + 1 if width is None else width
    if pad and len(stream) % width:
        stream += [separator] * (width - len(stream) % width)
    rows = len(stream) // width
    return torch.tensor(stream[: rows * width], dtype=torch.long).view(rows, width)


# 07.kd_loss -----------------------------------------------------------------------------------


def _kd_expected(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    soft = divergence(student, teacher, "forward-kl", temperature=temperature)
    return float(temperature**2 * soft.mean())


def _kd_cases() -> Iterator[Case]:
    g = _generator(7)
    yield Case("4 positions, 10 tokens, T = 1", (
        torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), 1.0))  # fmt: skip
    yield Case("6 positions, 32 tokens, T = 2", (
        torch.randn(6, 32, generator=g), 3 * torch.randn(6, 32, generator=g), 2.0))  # fmt: skip
    sharp = torch.randn(3, 16, generator=g) * 8
    yield Case("a confident teacher, T = 4", (torch.randn(3, 16, generator=g), sharp, 4.0))
    same = torch.randn(2, 8, generator=g)
    yield Case("the student is the teacher: nothing to learn", (same, same.clone(), 3.0))


def _kd_by(student, teacher, temperature, *, squared=True, reverse=False, reduce="mean"):
    loss = "reverse-kl" if reverse else "forward-kl"
    soft = divergence(student, teacher, loss, temperature=temperature)
    total = soft.sum() if reduce == "sum" else soft.mean()
    return float((temperature**2 if squared else 1.0) * total)


# 08.gptq --------------------------------------------------------------------------------------


def _gptq_expected(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    cols = weight.shape[1]
    q = gptq_quantize(weight, hessian, bits=4, group_size=cols, damp=0.0, block_size=cols)
    return dequantize(q, torch.float64).to(weight.dtype)


def _gptq_cases() -> Iterator[Case]:
    g = _generator(8)

    def hessian(x: torch.Tensor) -> torch.Tensor:
        return 2 * x.T @ x

    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    yield Case(
        "(4, 8), independent inputs",
        (torch.randn(4, 8, generator=g, dtype=torch.float64), hessian(x)),
    )
    shared = torch.randn(64, 1, generator=g, dtype=torch.float64)
    x = shared + 0.3 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    yield Case("(3, 16), inputs that move together", (
        torch.randn(3, 16, generator=g, dtype=torch.float64), hessian(x)))  # fmt: skip
    diagonal = torch.diag(torch.rand(8, generator=g, dtype=torch.float64) + 0.5)
    yield Case("a diagonal Hessian: GPTQ is round to nearest", (
        torch.randn(5, 8, generator=g, dtype=torch.float64), diagonal))  # fmt: skip


def _gptq_by(weight, hessian, *, spread=True, divide=True, cholesky=True):
    w = weight.clone()
    scale = w.abs().amax(1).clamp(min=1e-12) / 7
    inverse = torch.linalg.inv(hessian)
    u = torch.linalg.cholesky(inverse, upper=True) if cholesky else inverse
    for j in range(w.shape[1]):
        q = (w[:, j] / scale).round().clamp(-7, 7) * scale
        if spread:
            error = (w[:, j] - q) / (u[j, j] if divide else 1.0)
            w[:, j + 1 :] -= error[:, None] * u[j, j + 1 :][None, :]
        w[:, j] = q
    return w


# 09.wanda -------------------------------------------------------------------------------------


def _wanda_expected(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float):
    return weight * top_mask(wanda_scores(weight, input_norms), sparsity, per="row")


def _wanda_cases() -> Iterator[Case]:
    g = _generator(9)
    yield Case("(4, 8), half removed", (
        torch.randn(4, 8, generator=g), torch.rand(8, generator=g) + 0.1, 0.5))  # fmt: skip
    loud = torch.ones(16)
    loud[3] = 50.0  # one outlier input channel, as real activations have
    yield Case("one loud input channel: its small weights matter", (
        torch.randn(6, 16, generator=g), loud, 0.5))  # fmt: skip
    yield Case("(3, 8), a quarter removed", (
        torch.randn(3, 8, generator=g), torch.rand(8, generator=g) + 0.1, 0.25))  # fmt: skip
    yield Case("sparsity 0: nothing removed", (
        torch.randn(2, 4, generator=g), torch.rand(4, generator=g), 0.0))  # fmt: skip


def _wanda_by(weight, input_norms, sparsity, *, norms=True, per="row", highest=False):
    scores = weight.abs() * (input_norms[None, :] if norms else 1.0)
    keep = top_mask(-scores if highest else scores, sparsity, per=per)
    return weight * keep


# 10b.q4_0 -------------------------------------------------------------------------------------


def _q4_0_expected(x: torch.Tensor) -> torch.Tensor:
    """What `slmlab export --quant q4_0` writes, read back: gguf's Q4_0, llama.cpp's bit for bit."""
    kind = gguf.GGMLQuantizationType.Q4_0
    blocks = gguf.quants.quantize(x.numpy().reshape(1, -1), kind)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, kind))).reshape(-1)


def _q4_0_cases() -> Iterator[Case]:
    g = _generator(10)
    yield Case("one block of 32", (torch.randn(32, generator=g),))
    scales = torch.tensor([0.01, 1.0, 30.0, 0.2]).repeat_interleave(32)
    yield Case("four blocks of very different sizes", (torch.randn(128, generator=g) * scales,))
    positive = torch.rand(32, generator=g)
    positive[5] = 2.0  # the largest magnitude is positive: d is negative
    yield Case("a block whose largest value is positive", (positive,))
    yield Case("a block of zeros, then a random one", (
        torch.cat([torch.zeros(32), torch.randn(32, generator=g)]),))  # fmt: skip


def _q4_0_by(x: torch.Tensor, *, signed=True, half=True, symmetric7=False) -> torch.Tensor:
    blocks = x.reshape(-1, 32)
    if symmetric7:
        scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7
        return ((blocks / scale).round().clamp(-7, 7) * scale).reshape(-1)
    largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = (largest if signed else largest.abs()) / -8
    inverse = torch.where(d == 0, 0.0, 1 / d)
    q = torch.floor(blocks * inverse + 8.5).clamp(0, 15)
    stored = d.half().float() if half else d
    return ((q - 8) * stored).reshape(-1)


# 10b.q4_k -------------------------------------------------------------------------------------


def _q4_k_expected(block: torch.Tensor) -> torch.Tensor:
    """A Q4_K super-block's 256 weights, as the ``gguf`` package (llama.cpp's reader) reads them."""
    kind = gguf.GGMLQuantizationType.Q4_K
    values = gguf.quants.dequantize(block.numpy().reshape(1, -1), kind)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(-1)


def _q4_k_cases() -> Iterator[Case]:
    g = _generator(12)

    def block(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(quantize_q4_k(x.numpy().reshape(1, -1))).reshape(-1)

    yield Case("a random super-block", (block(torch.randn(256, generator=g) * 0.02),))
    spread = torch.randn(256, generator=g) * torch.linspace(0.1, 3.0, 8).repeat_interleave(32)
    yield Case("sub-blocks of growing size (the high scales need all six bits)", (block(spread),))
    shifted = torch.rand(256, generator=g) - 0.9
    yield Case("mostly negative weights (large offsets)", (block(shifted),))


def _q4_k_by(block: torch.Tensor, *, high_bits=True, offset_sign=-1.0, interleaved=True):
    raw = block.to(torch.int32)
    d, dmin = (block[i : i + 2].view(torch.float16).float() for i in (0, 2))
    q = raw[4:16]
    sc = torch.cat([q[0:4] & 63, (q[8:12] & 0xF) | (((q[0:4] >> 6) << 4) if high_bits else 0)])
    m = torch.cat([q[4:8] & 63, (q[8:12] >> 4) | (((q[4:8] >> 6) << 4) if high_bits else 0)])
    codes = raw[16:].reshape(4, 32)
    if interleaved:
        nibbles = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(8, 32)
    else:  # each byte's two nibbles taken as neighbours
        nibbles = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(8, 32)
    scale, offset = (d * sc.float())[:, None], (dmin * m.float())[:, None]
    return (scale * nibbles.float() + offset_sign * offset).reshape(-1)


# 10.kv_step -----------------------------------------------------------------------------------


def _kv_step_expected(q, k, v, cache_k, cache_v, length):
    batch, heads, _, dim = q.shape
    kv_heads, max_len = cache_k.shape[1], cache_k.shape[2]
    config = ModelConfig(
        vocab_size=1, hidden_size=heads * dim, intermediate_size=1, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
    )  # fmt: skip
    cache = KVCache(config, batch, max_len)
    cache.keys[0], cache.values[0] = cache_k.clone(), cache_v.clone()
    cache.length = length
    keys, values = cache.update(0, k, v)
    out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    return out, cache.keys[0], cache.values[0]


def _kv_step_cases() -> Iterator[Case]:
    g = _generator(11)

    def step(batch, heads, kv_heads, dim, max_len, length):
        def r(*shape):
            return torch.randn(*shape, generator=g)

        cache_k, cache_v = torch.zeros(2, batch, kv_heads, max_len, dim)
        cache_k[:, :, :length], cache_v[:, :, :length] = (
            r(batch, kv_heads, length, dim),
            r(batch, kv_heads, length, dim),
        )
        q, k, v = r(batch, heads, 1, dim), r(batch, kv_heads, 1, dim), r(batch, kv_heads, 1, dim)
        return q, k, v, cache_k, cache_v, length

    yield Case("the first token (an empty cache), 2 heads", step(1, 2, 2, 4, 6, 0))
    yield Case("5 tokens cached of 8, GQA 4/2", step(1, 4, 2, 8, 8, 5))
    yield Case("a batch of 2, MQA 3/1, 3 cached of 10", step(2, 3, 1, 4, 10, 3))
    yield Case("the last free position", step(1, 2, 1, 4, 4, 3))


def _kv_step_by(q, k, v, cache_k, cache_v, length, *, write=True, at=0, read_all=False):
    if write:
        cache_k[:, :, length + at], cache_v[:, :, length + at] = k[:, :, 0], v[:, :, 0]
    end = cache_k.shape[2] if read_all else length + 1
    keys, values = cache_k[:, :, :end], cache_v[:, :, :end]
    if not write:
        keys, values = cache_k[:, :, :length], cache_v[:, :, :length]
    groups = q.shape[1] // k.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    weights = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return weights @ values, cache_k, cache_v


# 10.residual ----------------------------------------------------------------------------------


def _residual_cases() -> Iterator[Case]:
    g = _generator(13)
    p, q = torch.randn(6, generator=g).softmax(-1), torch.randn(6, generator=g).softmax(-1)
    yield Case("two distributions over 6 tokens", (p, q))
    sharp = torch.tensor([0.9, 0.05, 0.05, 0.0])
    yield Case("a sharp target, a flat draft", (sharp, torch.full((4,), 0.25)))
    yield Case("the draft gives no mass where the target does", (
        torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 0.0, 0.0])))  # fmt: skip
    yield Case("draft equal to the target (a rejection never happens)", (p, p.clone()))


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in (
        Exercise(
            "01.param_count",
            "param_count(config) -> the number of parameters of the decoder a ModelConfig "
            "describes: embedding, per block the q/k/v/o projections (and Qwen2's q/k/v "
            "biases), the three MLP projections and two norms, the final norm, and the output "
            "head unless it is tied to the embedding.",
            lambda config: param_count(config).total,
            _param_cases,
            "keys and values have num_key_value_heads × head_dim outputs, queries "
            "num_attention_heads × head_dim; a tied head adds nothing.",
            wrong={
                "the tied head counted": lambda c: _params_with(c, head=True),
                "keys and values as wide as queries": lambda c: _params_with(c, kv_as_q=True),
                "one norm per block": lambda c: _params_with(c, norms_per_block=1),
            },
        ),
        Exercise(
            "01.kv_cache_bytes",
            "kv_bytes(config, context, bytes_per_value) -> bytes the KV cache of one sequence of "
            "`context` tokens holds: a key and a value vector per token, per key/value head, per "
            "layer.",
            _kv_expected,
            _kv_cases,
            "2 (keys and values) × layers × num_key_value_heads × head_dim × context × bytes.",
            wrong={
                "keys only": lambda c, t, b: _kv_expected(c, t, b) // 2,
                "a cache per query head": lambda c, t, b: (
                    2 * c.num_hidden_layers * c.q_size * t * b
                ),
                "one layer": lambda c, t, b: _kv_expected(c, t, b) // c.num_hidden_layers,
            },
        ),
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
        Exercise(
            "05.adamw",
            "adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay) -> (p, m, v) "
            "after one AdamW step (step counts from 1): moments updated, bias-corrected, and the "
            "weight decay decoupled (p shrinks by lr·weight_decay·p).",
            _adamw_expected,
            _adamw_cases,
            "decay the weight first (p·(1 − lr·wd)), then m̂ = m/(1 − β1^step), v̂ = v/(1 − β2^step), "
            "p −= lr·m̂/(√v̂ + eps).",
            atol=1e-6,
            wrong={
                "no bias correction": lambda p, g, m, v, s, lr, b1, b2, e, wd: _adamw_by(
                    p, g, m, v, s, lr, b1, b2, e, wd, correct=False
                ),
                "L2 in the gradient (Adam, not AdamW)": lambda p, g, m, v, s, lr, b1, b2, e, wd: (
                    _adamw_expected(p, g + wd * p, m, v, s, lr, b1, b2, e, 0.0)
                ),
                "eps inside the root": lambda p, g, m, v, s, lr, b1, b2, e, wd: _adamw_by(
                    p, g, m, v, s, lr, b1, b2, e, wd, eps_inside=True
                ),
            },
        ),
        Exercise(
            "06.masked_loss",
            "masked_loss(logits, targets) -> the mean cross-entropy (nats) over the tokens whose "
            "target is not -100 (logits[b, t] already predicts targets[b, t]).",
            _masked_loss_expected,
            _masked_loss_cases,
            "leave the -100 targets out of both the sum and the count, and average over every "
            "learnt token of the batch together.",
            wrong={
                "ignored tokens counted": lambda lo, ta: (
                    F.cross_entropy(
                        lo.flatten(0, 1), ta.flatten(), ignore_index=IGNORE, reduction="sum"
                    )
                    / ta.numel()
                ),
                "mean of the rows' means": lambda lo, ta: torch.stack(
                    [F.cross_entropy(lo[i], ta[i], ignore_index=IGNORE) for i in range(len(ta))]
                ).mean(),
                "targets one step late": lambda lo, ta: F.cross_entropy(
                    lo[:, :-1].flatten(0, 1), ta[:, 1:].flatten(), ignore_index=IGNORE
                ),
            },
        ),
        Exercise(
            "08.nf4",
            "nf4_round(w, block) -> w rounded to NF4 and back: each block of `block` inputs of a "
            "row divided by its largest |w|, each value moved to the nearest of the 16 NF4 values "
            '(slmlab.layers.formats.codebook("nf4")), then multiplied back.',
            _nf4_expected,
            _nf4_cases,
            "normalise by the block's absmax, pick the nearest codebook value (not a uniform "
            "grid), multiply by the same absmax.",
            wrong={
                "a uniform 4-bit grid": lambda w, b: _rtn_expected(w, b),
                "one absmax per row": lambda w, b: _nf4_expected(w, w.shape[1]),
                "scaled by the mean |w|": lambda w, b: _nf4_by_mean(w, b),
            },
        ),
        Exercise(
            "11.acc_norm",
            "picks(loglikelihoods, choices) -> (acc, acc_norm): the index of the choice with the "
            "highest log-likelihood, and with the highest log-likelihood per character of the "
            "choice's text (lm-evaluation-harness's definitions).",
            _picks_expected,
            _picks_cases,
            "acc_norm divides each log-likelihood by len(choice) in characters (the leading space "
            "counts) and takes the largest: log-likelihoods are negative.",
            wrong={
                "per word, not per character": lambda ll, ch: (
                    _picks_expected(ll, ch)[0],
                    max(range(len(ch)), key=lambda i: ll[i] / len(ch[i].split())),
                ),
                "the smallest per character": lambda ll, ch: (
                    _picks_expected(ll, ch)[0],
                    min(range(len(ch)), key=lambda i: ll[i] / len(ch[i])),
                ),
                "multiplied by the length": lambda ll, ch: (
                    _picks_expected(ll, ch)[0],
                    max(range(len(ch)), key=lambda i: ll[i] * len(ch[i])),
                ),
            },
        ),
        Exercise(
            "02.bpe_merge",
            "merge(parts, pair) -> parts with every occurrence of the adjacent pair joined into "
            "one part, scanning left to right (of three equal parts in a row, the first two "
            "merge).",
            merge_pair,
            _merge_cases,
            "walk left to right; when parts[i], parts[i + 1] is the pair, emit the joined part "
            "and skip both, else emit parts[i].",
            wrong={
                "the first occurrence only": lambda parts, pair: _merge_first(parts, pair),
                "right to left": lambda parts, pair: _merge_from_the_right(parts, pair),
            },
        ),
        Exercise(
            "03.gqa_attention",
            "attention(q, k, v) -> causal softmax(q·kᵀ/√D)·v for q of shape (B, Hq, T, D) and "
            "k, v of shape (B, Hkv, T, D): query head h uses key/value head h // (Hq / Hkv).",
            _attention_expected,
            _attention_cases,
            "repeat each key/value head for its group of consecutive query heads "
            "(repeat_interleave, not repeat), scale by 1/√D, and mask the future.",
            atol=1e-5,
            wrong={
                "heads grouped round-robin": lambda q, k, v: _attention_by(
                    q, k, v, interleave=False
                ),
                "no causal mask": lambda q, k, v: _attention_by(q, k, v, causal=False),
                "no 1/√D": lambda q, k, v: _attention_by(q, k, v, scale=1.0),
            },
        ),
        Exercise(
            "10.residual",
            "residual(p, q) -> the distribution a rejected draft token is replaced by, for the "
            "target's next-token probabilities p and the draft's q: max(0, p − q), normalised; "
            "p itself where p and q are equal.",
            residual_distribution,
            _residual_cases,
            "clamp p − q at 0 before normalising (not |p − q|); when nothing is left (p = q) "
            "there is no rejection to replace, and p is the answer.",
            atol=1e-6,
            wrong={
                "the target itself": lambda p, q: p,
                "|p − q| normalised": lambda p, q: (
                    (p - q).abs() / (p - q).abs().sum().clamp(min=1e-12)
                ),
                "p − q, not clamped": lambda p, q: (p - q) / (p - q).sum().clamp(min=1e-12),
            },
        ),
        Exercise(
            "03.sliding_window",
            "window_mask(length, window) -> a (length, length) bool tensor, True where query i "
            "may attend to key j in a sliding layer: j ≤ i and at most window tokens, itself "
            "included.",
            _window_expected,
            _window_cases,
            "query i sees keys i − window + 1 … i: the window counts the token itself, and "
            "never a later one.",
            wrong={
                "the window plus itself": lambda t, w: _window_by(t, w + 1),
                "no causal mask": lambda t, w: _window_by(t, w, causal=False),
                "one key short": lambda t, w: _window_by(t, max(w - 1, 1)),
            },
        ),
        Exercise(
            "03.ssd_step",
            "ssd_step(state, x, dt, A, B, C) -> (y, new_state): one token of a Mamba-2 layer's "
            "recurrence, per head h: new_state[h] = exp(dt[h]·A[h])·state[h] + dt[h]·x[h] ⊗ "
            "B[h] and y[h] = new_state[h] · C[h]; state (H, P, N), x (H, P), dt and A (H,), B "
            "and C (H, N); y (H, P).",
            _ssd_step_expected,
            _ssd_step_cases,
            "the time step scales both the decay (exp(dt·A), not exp(A)) and what the token "
            "writes; the output reads the state after this token's write.",
            atol=1e-5,
            wrong={
                "decay exp(A), no time step": lambda *a: _ssd_step_squeezed(*a, decay_dt=False),
                "x written without dt": lambda *a: _ssd_step_squeezed(*a, write_dt=False),
                "the old state read": lambda *a: _ssd_step_squeezed(*a, read_new=False),
            },
        ),
        Exercise(
            "03.moe_routing",
            "route(logits, k, normalize) for router logits (N, E) -> (experts, weights), both "
            "(N, k), largest weight first: softmax over all E experts, the k most probable, "
            "their probabilities rescaled to sum to 1 if normalize.",
            lambda logits, k, normalize: top_k_routing(logits, k, normalize),
            _routing_cases,
            "softmax first, over every expert, then take the top k (torch.topk); rescale only "
            "when asked: Qwen2-MoE keeps the probabilities as they are.",
            wrong={
                "softmax over the k chosen logits": _routing_over_chosen_logits,
                "never rescaled": lambda lg, k, n: top_k_routing(lg, k, False),
                "the k least probable": _routing_least_probable,
            },
        ),
        Exercise(
            "00.bits_per_char",
            "bits_per_char(token_nats, text) -> the book's measure of a model on `text`: the "
            "losses of its tokens (natural-log, one per token, a tensor) summed, in bits, per "
            "character of the text.",
            _bpc_expected,
            _bpc_cases,
            "sum the losses, divide by ln 2 to turn nats into bits, and divide by the number of "
            "characters (len(text)), not of tokens or of bytes.",
            atol=1e-9,
            rtol=1e-9,
            wrong={
                "nats, not bits": lambda n, t: float(n.double().sum()) / len(t),
                "per token": lambda n, t: float(n.double().sum()) / math.log(2) / len(n),
                "per byte": lambda n, t: float(n.double().sum()) / math.log(2) / len(t.encode()),
            },
        ),
        Exercise(
            "04.pack",
            "pack(documents, seq_len, separator) -> a (rows, seq_len + 1) long tensor: the "
            "documents (lists of token ids) concatenated, each followed by `separator`, cut into "
            "rows of seq_len + 1 tokens; the incomplete last row is dropped.",
            pack,
            _pack_cases,
            "one stream of tokens, the separator after every document (an empty one too), then "
            "as many whole rows of seq_len + 1 as fit: a row's inputs are row[:-1], its targets "
            "row[1:].",
            wrong={
                "the separator before each document": lambda d, n, s: _pack_by(
                    d, n, s, before=True
                ),
                "rows of seq_len tokens": lambda d, n, s: _pack_by(d, n, s, width=n),
                "the last row padded, not dropped": lambda d, n, s: _pack_by(d, n, s, pad=True),
            },
        ),
        Exercise(
            "07.kd_loss",
            "kd_loss(student_logits, teacher_logits, temperature) -> Hinton's soft-target loss "
            "for logits (N, V): T² · KL(p ‖ q) averaged over the N positions, with p = "
            "softmax(teacher / T) and q = softmax(student / T), in nats.",
            _kd_expected,
            _kd_cases,
            "soften both models with the same T, take KL(teacher ‖ student) = Σ p (log p − log q) "
            "over the vocabulary, average over positions, and multiply by T² so the gradients "
            "keep their size as T grows.",
            atol=1e-6,
            rtol=1e-5,
            wrong={
                "no T²": lambda s, t, T: _kd_by(s, t, T, squared=False),
                "KL(student ‖ teacher)": lambda s, t, T: _kd_by(s, t, T, reverse=True),
                "summed over positions": lambda s, t, T: _kd_by(s, t, T, reduce="sum"),
            },
        ),
        Exercise(
            "08.gptq",
            "gptq(weight, hessian) -> the weight quantized by GPTQ and back: symmetric int4, one "
            "scale per row (the row's max|w| before any update / 7, codes in [−7, 7]). With U "
            "the upper Cholesky factor of H⁻¹, for each column j in order: q = the column "
            "rounded to the grid, e = (w_j − q) / U[j, j], the columns after j −= e ⊗ U[j, j+1:], "
            "and column j becomes q.",
            _gptq_expected,
            _gptq_cases,
            "fix the scales from the weight as given; spread each column's error onto the "
            "columns not yet quantized, divided by U[j, j], with row j of the Cholesky factor "
            "of H⁻¹ (torch.linalg.cholesky(torch.linalg.inv(H), upper=True)).",
            atol=1e-6,
            wrong={
                "round to nearest, no error spread": lambda w, h: _gptq_by(w, h, spread=False),
                "the error not divided by U[j, j]": lambda w, h: _gptq_by(w, h, divide=False),
                "rows of H⁻¹, not of its Cholesky factor": lambda w, h: _gptq_by(
                    w, h, cholesky=False
                ),
            },
        ),
        Exercise(
            "09.wanda",
            "wanda_prune(weight, input_norms, sparsity) -> the (out, in) weight with, in each "
            "row, the round(sparsity · in) weights of lowest score |W_ij| · ‖X_j‖ set to zero "
            "(input_norms holds ‖X_j‖, the norm of input j over the calibration tokens).",
            _wanda_expected,
            _wanda_cases,
            "score each weight by its size times the norm of the input it multiplies, and "
            "compare weights within a row only: every output keeps the same number.",
            wrong={
                "magnitude only": lambda w, n, s: _wanda_by(w, n, s, norms=False),
                "the whole layer ranked together": lambda w, n, s: _wanda_by(w, n, s, per="layer"),
                "the highest scores removed": lambda w, n, s: _wanda_by(w, n, s, highest=True),
            },
        ),
        Exercise(
            "10b.q4_0",
            "q4_0(x) -> x (float32, a multiple of 32 long) through llama.cpp's Q4_0 and back: "
            "per block of 32, d = the value of largest magnitude, its sign kept, / −8; codes "
            "q = min(15, floor(x · (1/d) + 8.5)) (all 8 where d is 0); the file stores d as "
            "float16, so the value read back is (q − 8) · float16(d).",
            _q4_0_expected,
            _q4_0_cases,
            "keep the sign of the largest value, so that it lands on code 0 (−8·d) and never "
            "needs the missing +8; compute codes with d in float32, dequantize with d rounded "
            "to float16, as the file stores it.",
            atol=0.0,
            rtol=1e-6,
            wrong={
                "d from max|x| (the sign dropped)": lambda x: _q4_0_by(x, signed=False),
                "d kept in float32": lambda x: _q4_0_by(x, half=False),
                "symmetric int4, max|x| / 7": lambda x: _q4_0_by(x, symmetric7=True),
            },
        ),
        Exercise(
            "10b.q4_k",
            "q4_k_weights(block) -> the 256 float32 weights of one Q4_K super-block, given as "
            "its 144 bytes (a uint8 tensor): d and dmin (float16, bytes 0-1 and 2-3), 12 bytes "
            "of scales s[0..11] (bytes 4-15), 128 bytes of 4-bit codes. Sub-block j (32 "
            "weights) is d·sc_j·q − dmin·m_j with 6-bit sc_j and m_j: for j < 4, sc_j = s[j] & "
            "63 and m_j = s[j+4] & 63; for j ≥ 4, sc_j = (s[j+4] & 15) | (s[j−4] >> 6) << 4 and "
            "m_j = (s[j+4] >> 4) | (s[j] >> 6) << 4. Byte i of the codes' 32-byte group k "
            "holds weight i of sub-block 2k in its low nibble and of sub-block 2k+1 in its high "
            "one.",
            _q4_k_expected,
            _q4_k_cases,
            "read the six bits of the last four scales from two places; the codes of a 32-byte "
            "group are two sub-blocks, one per nibble, not 64 neighbouring weights; and the "
            "offset is subtracted (m ≥ 0 holds minus the minimum).",
            atol=0.0,
            rtol=1e-6,
            wrong={
                "the last four scales' top two bits dropped": lambda b: _q4_k_by(
                    b, high_bits=False
                ),
                "each byte's nibbles as neighbouring weights": lambda b: _q4_k_by(
                    b, interleaved=False
                ),
                "the offset added": lambda b: _q4_k_by(b, offset_sign=1.0),
            },
        ),
        Exercise(
            "10.kv_step",
            "attend_step(q, k, v, cache_k, cache_v, length) -> (out, cache_k, cache_v): one "
            "decoding step. q (B, H, 1, D) is the new token's query, k and v (B, Hkv, 1, D) its "
            "key and value; cache_k and cache_v (B, Hkv, max_len, D) hold `length` earlier "
            "tokens. Write k and v at position `length`, then attend q to keys 0 … length: "
            "softmax(q·kᵀ/√D)·v, query head h reading key/value head h // (H / Hkv).",
            _kv_step_expected,
            _kv_step_cases,
            "the new token is written first and attends to itself; read only the length + 1 "
            "positions filled, never the zeros after them.",
            atol=1e-5,
            wrong={
                "attended before writing": lambda *a: _kv_step_by(*a, write=False),
                "written one position late": lambda *a: _kv_step_by(*a, at=1),
                "the whole buffer attended": lambda *a: _kv_step_by(*a, read_all=True),
            },
        ),
    )
}


def _merge_first(parts: list[str], pair: tuple[str, str]) -> list[str]:
    for i in range(len(parts) - 1):
        if (parts[i], parts[i + 1]) == pair:
            return [*parts[:i], pair[0] + pair[1], *parts[i + 2 :]]
    return list(parts)


def _merge_from_the_right(parts: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], len(parts) - 1
    while i >= 0:
        if i > 0 and (parts[i - 1], parts[i]) == pair:
            merged.append(pair[0] + pair[1])
            i -= 2
        else:
            merged.append(parts[i])
            i -= 1
    return merged[::-1]


def _attention_by(q, k, v, *, interleave=True, causal=True, scale=None):
    groups = q.shape[1] // k.shape[1]
    expand = (
        (lambda x: x.repeat_interleave(groups, 1))
        if interleave
        else (lambda x: x.repeat(1, groups, 1, 1))
    )
    k, v = expand(k), expand(v)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        t = q.shape[2]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def _adamw_by(p, g, m, v, step, lr, beta1, beta2, eps, wd, *, correct=True, eps_inside=False):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**step) if correct else m
    v_hat = v / (1 - beta2**step) if correct else v
    denominator = (v_hat + eps).sqrt() if eps_inside else v_hat.sqrt() + eps
    return p * (1 - lr * wd) - lr * m_hat / denominator, m, v


def _nf4_by_mean(w: torch.Tensor, block: int) -> torch.Tensor:
    from .layers.formats import codebook

    rows, cols = w.shape
    grouped = w.reshape(rows, cols // block, block)
    scale = grouped.abs().mean(-1, keepdim=True).clamp(min=1e-12)
    values = codebook("nf4")
    nearest = (grouped / scale).unsqueeze(-1).sub(values).abs().argmin(-1)
    return (values[nearest] * scale).reshape(rows, cols)


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

"""Calibration: run a few rows of representative text through a model and watch the inputs of
its linear layers (the Hessians GPTQ needs, the channel statistics AWQ and SmoothQuant need).

Quantizing layer by layer, each block should see the inputs that the *already quantized*
blocks before it produce, so that it can correct their error rather than an error that never
happens: `walk_blocks` runs the calibration through the blocks one at a time, carrying each
block's outputs to the next only after the caller has replaced that block's layers, so a model
of L blocks costs L block passes (plus one to carry), not a pass from the embedding per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "block_inputs",
    "blocks",
    "calibration_tokens",
    "check_enough_tokens",
    "collect_inputs",
    "require_calibration",
    "run_until",
    "sequential_hessians",
    "walk_blocks",
]


def calibration_tokens(
    tokenizer, source: str = "stories", *, rows: int = 32, seq_len: int = 256
) -> torch.Tensor:
    """(rows, seq_len) token ids of representative text, documents separated as in training.

    `source`: ``stories`` (generated with seed 3: neither the training stories, seeds 1 and 2,
    nor the evaluation suites'), ``python`` or ``python-docs`` (training splits), or the
    reader's file, folder or jsonl (`slmlab.data.load_texts`).
    """
    from ..data import corpus_texts, pack
    from ..tokenizers import END_OF_TEXT

    separator = tokenizer.token_to_id(END_OF_TEXT)
    if separator is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT!r} token to separate documents")
    # Stories are longer than 20 tokens: that many fill the rows.
    texts = corpus_texts(source, "calibration", stories=rows * seq_len // 20)
    documents, tokens = [], 0
    for text in texts:  # tokenize only as much as the rows need
        documents.append(tokenizer.encode(text).ids)
        tokens += len(documents[-1]) + 1
        if tokens >= rows * (seq_len + 1):
            break
    packed = pack(documents, seq_len - 1, separator)  # pack's rows are seq_len long here
    if packed.shape[0] < rows:
        raise ValueError(
            f"calibration source {source!r} holds {tokens} tokens, fewer than {rows} rows of "
            f"{seq_len}: give more text or fewer rows"
        )
    return packed[:rows]


def require_calibration(calibration: torch.Tensor | None, method: str, verb: str) -> torch.Tensor:
    """`calibration`, or a one-line error saying that `method` needs it, for ``verb(model,
    config, calibration=...)``."""
    if calibration is None:
        raise ValueError(
            f"{method} needs calibration data: {verb}(model, config, calibration=token_ids) "
            "with a (rows, seq_len) LongTensor of representative text"
        )
    return calibration


def check_enough_tokens(
    calibration: torch.Tensor, layers: list[tuple[str, nn.Linear]], method: str
) -> None:
    """A one-line error where `calibration` holds fewer tokens than the widest of `layers` has
    inputs: the Hessian XᵀX of such a layer is singular, and only the dampening would hold up
    what `method` computes from it."""
    _check_rows(calibration)
    name, widest = max(layers, key=lambda item: item[1].in_features)
    if calibration.numel() < widest.in_features:
        raise ValueError(
            f"calibration holds {calibration.numel()} tokens, fewer than the {widest.in_features} "
            f"inputs of {name}: {method} needs a Hessian of full rank; give more rows or longer ones"
        )


class _Stop(Exception):
    """Raised by a hook after the block of interest: nothing later needs computing."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder (``model.model.layers``), or the model as one block."""
    repeats = getattr(getattr(model, "config", None), "block_repeats", 1)
    if repeats > 1:
        raise ValueError(
            f"block_repeats is {repeats}: each block runs {repeats} times on different inputs, "
            "and calibration (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, structured pruning) "
            "walks each block once; use round to nearest or magnitude pruning"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else [model]


def _check_rows(calibration: torch.Tensor) -> None:
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(
            f"calibration must be a (rows, seq_len) LongTensor of token ids, got "
            f"{calibration.dtype} of shape {tuple(calibration.shape)}"
        )


def _watch(watch: dict[nn.Module, Callable[[torch.Tensor], None]]) -> list:
    return [m.register_forward_pre_hook(lambda _m, a, f=f: f(a[0])) for m, f in watch.items()]


@torch.no_grad()
def run_until(
    model: nn.Module,
    calibration: torch.Tensor,
    block: nn.Module,
    watch: dict[nn.Module, Callable[[torch.Tensor], None]],
    *,
    batch_size: int = 8,
) -> None:
    """Run `calibration` (rows, seq_len) through `model` up to the end of `block`, calling
    ``watch[m](x)`` with the input of every watched module `m`."""
    _check_rows(calibration)
    handles = _watch(watch)
    if block is not model:

        def stop(*_: object) -> None:
            raise _Stop

        handles.append(block.register_forward_hook(stop))
    try:
        for rows in calibration.split(batch_size):
            with contextlib.suppress(_Stop):
                model(rows)
    finally:
        for handle in handles:
            handle.remove()


class _Hessian:
    """2 XᵀX summed over every token seen, in float64, and the number of tokens; or only its
    diagonal (`diagonal`), 2 Σ x_j², which is all a method that scores inputs one at a time
    needs. Layers that read one tensor (q, k and v; gate and up) share `products`, which
    computes it once."""

    def __init__(self, width: int, products: dict[str, Any], diagonal: bool = False) -> None:
        shape = (width,) if diagonal else (width, width)
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.tokens = 0
        self.products = products
        self.diagonal = diagonal

    def add(self, x: torch.Tensor) -> None:
        if self.products.get("x") is not x:  # holding x keeps its identity unique meanwhile
            flat = x.reshape(-1, x.shape[-1]).double()
            xtx = 2 * flat.pow(2).sum(0) if self.diagonal else 2 * flat.T @ flat
            self.products.update(x=x, xtx=xtx, tokens=flat.shape[0])
        self.total += self.products["xtx"]
        self.tokens += self.products["tokens"]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


def collect_inputs(run: Callable[[dict], None], modules: list[nn.Module]) -> list[torch.Tensor]:
    """The inputs (tokens, width) each of `modules` receives in ``run(watch)``."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    run(
        {
            m: lambda x, store=store: store.append(x.reshape(-1, x.shape[-1]).float())
            for m, store in zip(modules, seen, strict=True)
        }
    )
    return [torch.cat(store) for store in seen]


def block_inputs(
    model: nn.Module, calibration: torch.Tensor, block: nn.Module, modules: list[nn.Module]
) -> list[torch.Tensor]:
    """The inputs (tokens, width) that each of `modules` receives, running up to `block`."""
    return collect_inputs(lambda watch: run_until(model, calibration, block, watch), modules)


Run = Callable[[dict[nn.Module, Callable[[torch.Tensor], None]]], None]


@torch.no_grad()
def walk_blocks(
    model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8
) -> Iterator[tuple[nn.Module, Run]]:
    """Each block of `model` in order, with ``run(watch)``: run that block alone on the inputs
    the blocks before it produce *now*, calling ``watch[m](x)`` with the input of each watched
    module. A block's outputs are carried to the next block when the caller asks for it, so
    what the caller changed in the block (its quantized layers) shapes what follows. A model
    without repeated blocks is one block, run whole."""
    _check_rows(calibration)
    stack = blocks(model)
    if stack == [model]:
        yield (
            model,
            lambda watch: run_until(model, calibration, model, watch, batch_size=batch_size),
        )
        return
    inputs: list[tuple[tuple, dict]] = []  # per batch of rows: the first block's arguments

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args, kwargs))
        raise _Stop

    handle = stack[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for rows in calibration.split(batch_size):
            with contextlib.suppress(_Stop):
                model(rows)
    finally:
        handle.remove()
    for i, block in enumerate(stack):

        def run(watch, block=block) -> None:
            handles = _watch(watch)
            try:
                for args, kwargs in inputs:
                    block(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()

        yield block, run
        if i + 1 < len(stack):  # the hidden state is the first argument; the rest is shared
            for j, (args, kwargs) in enumerate(inputs):
                out = block(*args, **kwargs)
                inputs[j] = ((out[0] if isinstance(out, tuple) else out, *args[1:]), kwargs)


def sequential_hessians(
    model: nn.Module,
    calibration: torch.Tensor,
    targets: dict[str, nn.Linear],
    *,
    diagonal: bool = False,
) -> Iterator[tuple[str, nn.Linear, torch.Tensor]]:
    """(name, layer, H = 2 XᵀX / tokens in float64) for every target, block by block; with
    `diagonal`, only H's diagonal (a vector), for a fraction of the work.

    Lazy: the Hessians of a block are collected when the caller asks for its first layer, so
    layers the caller has replaced (quantized, pruned) by then shape the inputs of later blocks.
    """
    remaining = dict(targets)

    def hessians_of(block: nn.Module, run: Run):
        inside = {id(m) for m in block.modules()}
        names = [name for name, m in remaining.items() if id(m) in inside]
        if not names:
            return
        products: dict[str, Any] = {}
        hessians = {n: _Hessian(remaining[n].in_features, products, diagonal) for n in names}
        with torch.no_grad():
            run({remaining[n]: hessians[n].add for n in names})
        products.clear()
        for name in names:
            yield name, remaining.pop(name), hessians[name].mean()

    for block, run in walk_blocks(model, calibration):
        yield from hessians_of(block, run)
    # Layers outside every block (an unskipped output head): the whole model, last.
    yield from hessians_of(model, lambda watch: run_until(model, calibration, model, watch))

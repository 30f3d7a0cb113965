"""Calibration: run a few rows of representative text through a model and watch the inputs of
its linear layers (the Hessians GPTQ needs, the channel statistics AWQ and SmoothQuant need).

Quantizing layer by layer, each block should see the inputs that the *already quantized*
blocks before it produce, so that it can correct their error rather than an error that never
happens: `sequential_hessians` runs the calibration once per block, stopping the forward pass
right after that block, while the caller replaces the layers of the blocks already done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["block_inputs", "blocks", "calibration_tokens", "run_until", "sequential_hessians"]


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


class _Stop(Exception):
    """Raised by a hook after the block of interest: nothing later needs computing."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder (``model.model.layers``), or the model as one block."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else [model]


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
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(
            f"calibration must be a (rows, seq_len) LongTensor of token ids, got "
            f"{calibration.dtype} of shape {tuple(calibration.shape)}"
        )
    handles = [
        m.register_forward_pre_hook(lambda _m, args, f=f: f(args[0])) for m, f in watch.items()
    ]
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
    """2 XᵀX summed over every token seen, in float64, and the number of tokens."""

    def __init__(self, width: int) -> None:
        self.total = torch.zeros(width, width, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.total += 2 * x.T @ x
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


def block_inputs(
    model: nn.Module, calibration: torch.Tensor, block: nn.Module, modules: list[nn.Module]
) -> list[torch.Tensor]:
    """The inputs (tokens, width) that each of `modules` receives, running up to `block`."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    run_until(
        model,
        calibration,
        block,
        {
            m: lambda x, store=store: store.append(x.reshape(-1, x.shape[-1]).float())
            for m, store in zip(modules, seen, strict=True)
        },
    )
    return [torch.cat(store) for store in seen]


def sequential_hessians(
    model: nn.Module, calibration: torch.Tensor, targets: dict[str, nn.Linear]
) -> Iterator[tuple[str, nn.Linear, torch.Tensor]]:
    """(name, layer, H = 2 XᵀX / tokens in float64) for every target, block by block.

    Lazy: the Hessians of a block are collected when the caller asks for its first layer, so
    layers the caller has replaced (quantized) by then shape the inputs of later blocks.
    """
    remaining = dict(targets)
    for block in [*blocks(model), model]:  # the model last: layers outside any block
        inside = {id(m) for m in block.modules()}
        names = [name for name, m in remaining.items() if id(m) in inside]
        if not names:
            continue
        hessians = {n: _Hessian(remaining[n].in_features) for n in names}
        run_until(model, calibration, block, {remaining[n]: hessians[n].add for n in names})
        for name in names:
            yield name, remaining.pop(name), hessians[name].mean()

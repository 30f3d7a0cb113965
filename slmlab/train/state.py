"""What a run writes and reads back: weights, the optimizer's state, and where it stopped.

A run's checkpoint (``out/last``) is an ordinary slmlab checkpoint directory plus
``optimizer.safetensors`` (the optimizer's whole state, no pickle anywhere), ``trainer.json``
(the step and the config), and ``objective.safetensors`` where the loss has weights of its own
(a distillation projection: `OBJECTIVE`). Checkpoints are always whole (gathered) state dicts,
so a run can resume on any number of processes, sharded or not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint import load_state_dict, load_tokenizer
from ..checkpoint import save as save_checkpoint
from ..layers.lora import join_lora_state, lora_modules, read_adapter
from ..models.decoder import DecoderLM
from ..tokenizers import as_hf_tokenizer

__all__ = [
    "LAST",
    "OBJECTIVE",
    "initialise_from",
    "load_weights",
    "resume_optimizer",
    "resume_weights",
    "save_run",
]

LAST = "last"  # the checkpoint directory inside a run's folder
# Where a loss with weights of its own (`slmlab.train.loop.Objective`'s ``weights``) puts them
# on the model for the run: trained and resumed with the model's, saved beside them.
OBJECTIVE = "objective"
# Whole tensors on every process, whatever the sharding: what a checkpoint stores.
_WHOLE = StateDictOptions(full_state_dict=True)


def optimizer_tensors(
    model: DecoderLM, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """The optimizer's whole state as ``{"PARAMETER::KEY": tensor}``, ready for safetensors. A
    collective under FSDP: every process calls it."""
    state = get_optimizer_state_dict(model, optimizer, options=_WHOLE)["state"]
    return {
        f"{name}::{key}": value.detach().clone().contiguous()
        for name, values in state.items()
        for key, value in values.items()
    }


def restore_optimizer(
    model: DecoderLM, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    """The inverse of `optimizer_tensors` (each process takes its shard under FSDP)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.split("::", 1)
        state.setdefault(name, {})[field] = value
    groups = get_optimizer_state_dict(model, optimizer, options=_WHOLE)["param_groups"]
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=_WHOLE
    )


def load_weights(model: DecoderLM, path: Path) -> None:
    """The weights of checkpoint `path` into `model` (which stores a tied head once); a model
    with LoRA layers takes the base weights and the checkpoint's adapter."""
    weights = load_state_dict(path)
    if hasattr(model, OBJECTIVE):
        own = load_file(path / f"{OBJECTIVE}.safetensors")
        weights.update({f"{OBJECTIVE}.{name}": value for name, value in own.items()})
    if lora_modules(model):
        _, adapter = read_adapter(path)
        weights = join_lora_state(model, weights, adapter, str(path))
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights)


def _added_tokens(source: dict[str, int], tokenizer: dict[str, int]) -> list[int] | None:
    """The ids `tokenizer` adds after `source`'s vocabulary (the chat tokens fine-tuning adds),
    or None where it is not `source`'s vocabulary plus tokens at the end."""
    if any(tokenizer.get(token) != i for token, i in source.items()):
        return None
    added = sorted(i for token, i in tokenizer.items() if token not in source)
    return added if added == list(range(len(source), len(tokenizer))) else None


@torch.no_grad()
def _init_added_rows(embedding: torch.Tensor, start: int, seed: int) -> None:
    """Rows ``start:`` of an embedding table (new tokens) drawn around the old rows' mean with
    their per-dimension spread: typical tokens, so they take no probability from the others at
    first (Hewitt, 2021), and distinct, so a frozen table still tells them apart (LoRA)."""
    old = embedding[:start]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(embedding.shape[0] - start, embedding.shape[1], generator=generator)
    embedding[start:] = old.mean(0) + noise.to(old.dtype) * old.std(0)


def initialise_from(model: DecoderLM, source: str, tokenizer, *, seed: int = 0) -> None:
    """Load into `model` the weights of checkpoint directory `source` (``slmlab.zoo`` turns a
    recipe's name into its directory before training starts). `tokenizer` must be the
    checkpoint's, or the checkpoint's with special tokens added at the end (the chat tokens):
    their embedding rows are new (`_init_added_rows`, seeded by `seed`)."""
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"init_from {source!r} is not a checkpoint directory (a zoo recipe's name is "
            "resolved by slmlab.zoo.ensure or `slmlab train`)"
        )
    theirs = load_tokenizer(path).get_vocab(with_added_tokens=True)
    ours = as_hf_tokenizer(tokenizer).get_vocab(with_added_tokens=True)
    added = _added_tokens(theirs, ours)
    if added is None:
        raise ValueError(
            f"{path}: its tokenizer is not the one this config's data builds, so the token ids "
            "would mean other things; fine-tune with the data and vocab_size of the run that "
            "made it"
        )
    weights = load_state_dict(path)
    if added:
        table = weights["model.embed_tokens.weight"]
        grown = torch.empty(len(ours), table.shape[1], dtype=table.dtype)
        grown[: len(theirs)] = table
        _init_added_rows(grown, len(theirs), seed)
        weights["model.embed_tokens.weight"] = grown
        if "lm_head.weight" in weights and not model.config.tie_word_embeddings:
            head = weights["lm_head.weight"]
            grown_head = torch.empty(len(ours), head.shape[1], dtype=head.dtype)
            grown_head[: len(theirs)] = head
            _init_added_rows(grown_head, len(theirs), seed + 1)
            weights["lm_head.weight"] = grown_head
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit this config's model: {err}") from None


def checkpoint_step(folder: Path) -> int | None:
    """The step a checkpoint folder holds, from its ``trainer.json``; None if it has none that
    reads (not a run's checkpoint, or one a kill left half-written)."""
    try:
        return int(json.loads((folder / "trainer.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover_last(out: Path) -> None:
    """Make ``out/last`` the newest complete checkpoint that a killed save left behind.

    `slmlab.checkpoint.save` writes a whole checkpoint under a temporary name, moves the old one
    aside (``.last.old``) and renames the new one into place. A kill between the two renames
    leaves no ``last``, two complete copies beside it; a kill while writing leaves a partial
    temporary. The newest copy whose ``trainer.json`` reads becomes ``last`` again, and the
    leftovers are removed (a resuming run owns its folder; every process of a torchrun makes the
    same choice, so their races are harmless).
    """
    last = out / LAST
    leftovers = [p for p in out.glob(f".{LAST}.*") if p.is_dir()]
    if not last.exists():
        steps = {p: checkpoint_step(p) for p in leftovers}
        complete = [p for p, step in steps.items() if step is not None]
        if complete:
            newest = max(complete, key=lambda p: steps[p])
            leftovers.remove(newest)
            with contextlib.suppress(OSError):  # under torchrun another process got there first
                newest.rename(last)
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)


def resume_weights(
    model: DecoderLM, out: Path, config_dict: dict, defaults: dict | None = None
) -> int:
    """Load the weights of ``out/last`` into `model` (before it is sharded); the step they
    were written at. The checkpoint must come from the same config; a field it lacks counts
    as its value in `defaults` (a field added since it was written)."""
    recover_last(out)
    state_file = out / LAST / "trainer.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: nothing to resume (train without --resume first)")
    state = json.loads(state_file.read_text())
    written = {**json.loads(json.dumps(defaults or {})), **state["config"]}
    if written != json.loads(json.dumps(config_dict)):
        raise ValueError(
            f"{state_file}: was written by a different recipe; resume needs the same config"
        )
    load_weights(model, out / LAST)
    return state["step"]


def resume_optimizer(model: DecoderLM, optimizer: torch.optim.Optimizer, out: Path) -> None:
    """The optimizer state of ``out/last`` into `optimizer` (built over the sharded model)."""
    restore_optimizer(model, optimizer, load_file(out / LAST / "optimizer.safetensors"))


def save_run(
    model: DecoderLM,
    optimizer: torch.optim.Optimizer,
    out: Path,
    tokenizer,
    trainer: dict,
    *,
    rank: int,
    chat: dict | None = None,
) -> None:
    """Write ``out/last`` atomically: weights, optimizer state and `trainer` (the step, the
    config), and `chat` (the chat template and its tokens) as ``tokenizer_config.json`` where
    the run teaches a chat format. Under FSDP gathering the shards is a collective, so every
    process calls this and the first one writes."""
    weights = get_model_state_dict(model, options=_WHOLE)
    optimizer_state = optimizer_tensors(model, optimizer)
    if rank != 0:
        return
    prefix = f"{OBJECTIVE}."
    own = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    weights = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    extra = {
        "optimizer.safetensors": save(optimizer_state),
        "trainer.json": json.dumps(trainer, indent=2).encode(),
    }
    if own:
        extra[f"{OBJECTIVE}.safetensors"] = save({k: v.contiguous() for k, v in own.items()})
    if chat:
        extra["tokenizer_config.json"] = (json.dumps(chat, indent=2) + "\n").encode()
    save_checkpoint(model, out / LAST, tokenizer=tokenizer, state_dict=weights, extra_files=extra)

"""The training loop: AdamW or Muon, warm-up and cosine decay, accumulation, clipping, resume.

One loop serves one process and many: under ``torchrun`` each process takes its share of every
global batch and the gradients are averaged, so the same recipe gives the same model (up to the
order of floating-point sums) on one machine or several. Two ways to split the work:

* ``parallel="ddp"`` (DistributedDataParallel): every process holds the whole model and
  optimizer; gradients are all-reduced. Right while the model fits on one device.
* ``parallel="fsdp"`` (PyTorch's FSDP2, ``fully_shard``): each block's parameters, gradients
  and optimizer state are split across the processes and gathered only for the block's forward and
  backward, so memory per process falls with their number. Right when the model does not fit.

Checkpoints are always whole (gathered) state dicts, so a run can resume either way.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint import load_state_dict
from ..checkpoint import save as save_checkpoint
from ..env import bf16_is_fast, pick_device
from ..models.decoder import DecoderLM
from ..tokenizers import END_OF_TEXT
from .config import TrainConfig
from .data import TrainData, build_data
from .muon import Muon

__all__ = ["TrainResult", "evaluate", "lr_at", "next_token_loss", "train"]

LAST = "last"  # the checkpoint directory inside a run's folder
METRICS = "metrics.jsonl"
PARALLEL = ("ddp", "fsdp")
# Whole tensors on every process, whatever the sharding: what a checkpoint stores.
_WHOLE = StateDictOptions(full_state_dict=True)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (
        1 + math.cos(math.pi * min(1.0, progress))
    )


@dataclass
class TrainResult:
    out: Path
    step: int
    train_loss: float
    val_loss: float | None
    tokens_per_second: float
    precision: str

    @property
    def checkpoint(self) -> Path:
        return self.out / LAST


def _optimizer(model: DecoderLM, config: TrainConfig) -> torch.optim.Optimizer:
    # Decay matrices (and the embedding); never norms or biases (nanoGPT's and Llama's choice).
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    if config.optimizer == "muon":
        # Muon for the blocks' matrices; the embedding (the tied head) stays with AdamW.
        in_blocks = {id(p) for p in model.model.layers.parameters()}
        return Muon(
            [
                {"params": [p for p in decay if id(p) in in_blocks], "muon": True},
                {"params": [p for p in decay if id(p) not in in_blocks]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=config.betas,
        )
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=config.betas,
        eps=1e-8,
        foreach=False,
    )


def _optimizer_tensors(
    model: DecoderLM, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """The optimizer's whole state as ``{"PARAMETER::KEY": tensor}``, ready for safetensors (no
    pickle anywhere). A collective under FSDP: every process calls it."""
    state = get_optimizer_state_dict(model, optimizer, options=_WHOLE)["state"]
    return {
        f"{name}::{key}": value.detach().clone().contiguous()
        for name, values in state.items()
        for key, value in values.items()
    }


def _restore_optimizer(
    model: DecoderLM, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    """The inverse of `_optimizer_tensors` (each process takes its shard under FSDP)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.split("::", 1)
        state.setdefault(name, {})[field] = value
    groups = get_optimizer_state_dict(model, optimizer, options=_WHOLE)["param_groups"]
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=_WHOLE
    )


def _initialise_from(model: DecoderLM, source: str, data: TrainData) -> None:
    """Load into `model` the weights of checkpoint directory `source` (``slmlab.zoo`` turns a
    recipe's name into its directory before training starts)."""
    from ..checkpoint import load_tokenizer

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"init_from {source!r} is not a checkpoint directory (a zoo recipe's name is "
            "resolved by slmlab.zoo.ensure or `slmlab train`)"
        )
    if load_tokenizer(path).get_vocab() != data.tokenizer.to_hf().get_vocab():
        raise ValueError(
            f"{path}: its tokenizer is not the one this config's data builds, so the token ids "
            "would mean other things; fine-tune with the data and vocab_size of the run that "
            "made it"
        )
    try:
        _load_weights(model, path)
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit this config's model: {err}") from None


def _load_weights(model: DecoderLM, path: Path) -> None:
    """The weights of checkpoint `path` into `model` (which stores a tied head once)."""
    weights = load_state_dict(path)
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights)


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision == "auto":
        return "bf16" if bf16_is_fast(device.type) else "fp32"
    return config.precision


def next_token_loss(
    model: torch.nn.Module, rows: torch.Tensor, autocast=nullcontext
) -> torch.Tensor:
    """The pre-training objective: the mean cross-entropy (nats) of each token of `rows` given
    the tokens before it."""
    with autocast():
        logits = model(rows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: DecoderLM, data: TrainData, config: TrainConfig) -> float:
    """Mean loss (nats per token) over the first `eval_batches` batches of validation rows."""
    model.eval()
    device = next(model.parameters()).device
    rows = data.val[: config.eval_batches * config.batch_size].to(device)
    total, count = 0.0, 0
    for chunk in rows.split(config.batch_size):
        total += next_token_loss(model, chunk).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def _distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) — initialising the process group when run under torchrun.
    On CUDA each process takes the GPU of its local rank and the processes talk over NCCL;
    on CPU, over gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if device.type == "cuda" and device.index is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"process {local_rank} on this machine has no GPU of its own "
                f"({torch.cuda.device_count()} visible): start at most that many processes "
                "per machine (torchrun --nproc-per-node), or train on --device cpu"
            )
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    data: TrainData | None = None,
    parallel: str = "ddp",
    device: str = "cpu",
    prepare: Callable[[DecoderLM], object] | None = None,
) -> TrainResult:
    """Train the model `config` describes; write checkpoints, metrics and a loss plot to `out`.

    `max_steps` stops early (the schedule still runs to ``config.steps``), and `resume`
    continues from ``out/last``: a run stopped at step k and resumed ends with the very
    weights of a run that was never stopped. Under ``torchrun``, `parallel` chooses how the
    processes share the work: ``"ddp"`` or ``"fsdp"`` (see the module's docstring).
    `device` is ``"cpu"`` (the default, so that a recipe gives the same numbers on every
    machine), ``"cuda"`` or ``"auto"``; under torchrun, CUDA means each process's own GPU.
    `prepare` changes the model in place once it is built (and initialised from
    ``config.init_from``), before training: how a transform of a higher layer trains through
    itself. A config with `qat` needs it; `slmlab.quant.qat.train_qat` passes it.
    """
    out = Path(out)
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    rank, world, device = _distributed(device)
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(
            f"batch_size ({config.batch_size}) must divide evenly over {world} processes × "
            f"{config.grad_accum} micro-batches"
        )
    stop = min(config.steps, max_steps if max_steps is not None else config.steps)
    data = data or build_data(config)
    torch.manual_seed(config.seed)
    model_config = config.model_config(
        data.tokenizer.vocab_size, data.tokenizer.token_id(END_OF_TEXT)
    )
    model = DecoderLM(model_config).to(device)
    if config.init_from is not None:  # fine-tuning (QAT, say): start from a trained model
        _initialise_from(model, config.init_from, data)
    if prepare is not None:
        prepare(model)
    elif config.qat is not None:
        raise ValueError(
            "this config trains through rounding (qat): run it with slmlab.quant.qat.train_qat, "
            "`slmlab train` or the zoo, which prepare the model's layers for it"
        )
    start = 0
    if resume:
        state_file = out / LAST / "trainer.json"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file}: nothing to resume (train without --resume first)"
            )
        state = json.loads(state_file.read_text())
        if state["config"] != json.loads(json.dumps(config.to_dict())):
            raise ValueError(
                f"{state_file}: was written by a different recipe; resume needs the same config"
            )
        _load_weights(model, out / LAST)
        start = state["step"]
    sharded = world > 1 and parallel == "fsdp"
    if sharded:
        from torch.distributed.fsdp import fully_shard

        # One unit per block (its weights gathered for its own forward and backward only), and
        # the root for the rest: the embedding, the final norm and the (tied) output head.
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        runner: torch.nn.Module = model
    elif world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(model)
    else:
        runner = model
    optimizer = _optimizer(model, config)  # after sharding: it holds the shards
    if resume:
        _restore_optimizer(model, optimizer, load_file(out / LAST / "optimizer.safetensors"))
    precision = _precision(config, device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if precision == "bf16"
        else nullcontext
    )
    model.train()

    metrics_path = out / METRICS
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if (
            resume and metrics_path.exists()
        ):  # drop what the stopped run logged after its checkpoint
            kept = [
                line
                for line in metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= start
            ]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    def checkpoint(step: int) -> None:
        if rank != 0 and not sharded:
            return
        # Under FSDP gathering the shards is a collective: every process takes part; the
        # first one writes.
        weights = get_model_state_dict(model, options=_WHOLE)
        optimizer_state = _optimizer_tensors(model, optimizer)
        if rank != 0:
            return
        trainer = {
            "step": step,
            "config": config.to_dict(),
            "precision": precision,
            "world_size": world,
            "parallel": parallel if world > 1 else None,
        }
        save_checkpoint(
            model,
            out / LAST,
            tokenizer=data.tokenizer,
            state_dict=weights,
            extra_files={
                "optimizer.safetensors": save(optimizer_state),
                "trainer.json": json.dumps(trainer, indent=2).encode(),
            },
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        range(start, stop),
        desc="training",
        disable=not progress or rank != 0,
        initial=start,
        total=stop,
    )
    local = config.batch_size // world
    micro = local // config.grad_accum
    tokens_per_step = config.batch_size * config.seq_len
    loss_value, val_loss, started = float("nan"), None, time.perf_counter()
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = data.batch(step, config.batch_size, config.seed)[
            rank * local : (rank + 1) * local
        ].to(device)
        loss_sum = torch.zeros((), device=device)
        for i, chunk in enumerate(rows.split(micro)):
            last = i == config.grad_accum - 1  # average gradients across processes only then
            if sharded:
                model.set_requires_gradient_sync(last)
            ddp = isinstance(runner, torch.nn.parallel.DistributedDataParallel)
            sync = runner.no_sync() if ddp and not last else nullcontext()
            with sync:
                loss = next_token_loss(runner, chunk, autocast) / config.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss is {loss_value} at step {step} (lr {lr:.2e}): lower the learning rate, "
                "raise warmup_steps, or check the data; the last good checkpoint is in "
                f"{out / LAST}"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced over shards
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {
            "step": done,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": done * tokens_per_step,
        }
        if config.eval_every and (done % config.eval_every == 0 or done == stop):
            val_loss = evaluate(model, data, config)
            record["val_loss"] = val_loss
            record["val_bits_per_char"] = val_loss / math.log(2) / data.val_chars_per_token
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < stop:
            checkpoint(done)
    elapsed = time.perf_counter() - started
    checkpoint(stop)
    if rank == 0 and stop > start:
        import matplotlib.pyplot as plt

        from .plots import plot_metrics

        figure = plot_metrics(metrics_path)
        figure.savefig(out / "loss.png", dpi=100)
        plt.close(figure)  # saved, not shown: a notebook calling train() should not grow a plot
    return TrainResult(
        out,
        stop,
        loss_value,
        val_loss,
        (stop - start) * tokens_per_step / elapsed if stop > start else 0.0,
        precision,
    )

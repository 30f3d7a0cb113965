"""The training loop: one optimizer step after another, with evaluation and checkpoints.

One loop serves one process and many: under ``torchrun`` each process takes its share of every
global batch and the gradients are averaged (`slmlab.train.distributed`), so the same recipe
gives the same model (up to the order of floating-point sums) on one machine or several. A run
stopped at step k and resumed (`slmlab.train.state`) ends with the very weights of a run that
was never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.chat import IGNORE
from ..env import bf16_is_fast
from ..io import atomic_write_text
from ..layers.lora import apply_lora_
from ..models.decoder import DecoderLM
from ..models.mlp import router_loss
from .config import PREFERENCE_OBJECTIVES, TrainConfig
from .data import Batch, TrainData, build_data
from .distributed import PARALLEL, join, mean_over_processes, share
from .optim import build_optimizer, lr_at
from .preference import pair_accuracy, preference_loss, reference_logps, reply_logps
from .state import LAST, OBJECTIVE, initialise_from, resume_optimizer, resume_weights, save_run

__all__ = [
    "Objective",
    "TrainResult",
    "attach_objective",
    "next_token_loss",
    "sum_in_chunks",
    "train",
    "train_step",
    "validation_loss",
]

METRICS = "metrics.jsonl"

# A loss that a higher layer brings to this loop (distillation's teacher term): given the model
# being trained (as `train_step` runs it: wrapped for DDP under torchrun), a micro-batch and the
# autocast context, the summed loss of its learnt tokens and how many there are. One with weights
# of its own (a projection between two models' widths) holds them as a module, `weights`.
Objective = Callable[[torch.nn.Module, Batch, Callable], tuple[torch.Tensor, int]]


def attach_objective(model: torch.nn.Module, objective: Objective | None) -> None:
    """Put an objective's own weights, if it has any, on `model` (as ``objective``), on the
    model's device: they then train under the model's optimizer, their gradients are clipped
    with the model's, and a run's checkpoint saves them apart (`state.save_run`)."""
    own = getattr(objective, "weights", None)
    if own is not None:
        model.add_module(OBJECTIVE, own.to(next(model.parameters()).device))


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


def next_token_loss(
    model: torch.nn.Module, rows: torch.Tensor | Batch, autocast=nullcontext, head_chunk: int = 0
) -> torch.Tensor:
    """The training objective: the mean cross-entropy (nats) of each learnt token of `rows`
    given the tokens before it. A tensor of rows learns every token (pre-training); a `Batch`
    with targets learns those alone, each example seeing only itself (fine-tuning), their
    logits `head_chunk` positions at a time if it is not 0 (`TrainConfig.head_chunk`)."""
    if isinstance(rows, Batch) and rows.targets is not None:
        total, count = _learnt_loss(model, rows, autocast, head_chunk)
        return total / count
    ids = rows.ids if isinstance(rows, Batch) else rows
    with autocast():
        logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


def sum_in_chunks(
    part: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``part(*pieces)`` summed over consecutive pieces of `chunk` rows of `tensors` (all of
    one length, at least one row). While gradients are recorded, each piece's intermediate
    tensors (a head's logits over its vocabulary, their softmax) are recomputed in the
    backward pass instead of kept: a loss holds one piece's at a time."""
    total = None
    for start in range(0, len(tensors[0]), chunk):
        pieces = [t[start : start + chunk] for t in tensors]
        if torch.is_grad_enabled():
            value = checkpoint(part, *pieces, use_reentrant=False)
        else:
            value = part(*pieces)
        total = value if total is None else total + value
    assert total is not None
    return total


def _learnt_loss(
    model: torch.nn.Module, rows: Batch, autocast, head_chunk: int = 0
) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of the learnt targets of `rows`, and how many there are."""
    assert rows.targets is not None
    learnt = rows.targets != IGNORE  # the head runs at these positions alone
    targets = rows.targets[learnt]
    if not head_chunk or head_chunk >= len(targets):
        with autocast():
            logits = model(rows.ids[:, :-1], segments=rows.segments, logits_at=learnt)
        return F.cross_entropy(logits.float(), targets, reduction="sum"), len(targets)
    head = getattr(model, "module", model).lm_head  # DDP wraps the model

    def part(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = head(hidden)
        return F.cross_entropy(logits.float(), target, reduction="sum")

    with autocast():
        hidden = model(rows.ids[:, :-1], segments=rows.segments, logits_at=learnt, head=False)
    return sum_in_chunks(part, hidden, targets, chunk=head_chunk), len(targets)


def train_step(
    runner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: torch.Tensor | Batch,
    config: TrainConfig,
    *,
    world: int = 1,
    autocast=nullcontext,
    objective: Objective | None = None,
) -> tuple[float, float]:
    """One optimizer step on this process's `rows`: the gradient accumulated over
    `config.grad_accum` micro-batches (averaged over the processes after the last one), clipped
    to `config.grad_clip`, applied. Returns the mean loss and the gradient's norm before
    clipping. With learnt targets (fine-tuning) the mean is over this process's learnt tokens,
    however the micro-batches divide them. An `objective` replaces the config's loss."""
    batch = rows if isinstance(rows, Batch) else Batch(rows)
    ddp = isinstance(runner, torch.nn.parallel.DistributedDataParallel)
    fsdp = hasattr(runner, "set_requires_gradient_sync")
    learnt = None if batch.targets is None else int((batch.targets != IGNORE).sum())
    if learnt == 0:
        raise ValueError("a batch with no learnt token: every example's reply is missing")
    preference = config.objective in PREFERENCE_OBJECTIVES
    if preference:
        chosen_tokens = int((batch.targets[0::2] != IGNORE).sum())  # type: ignore[index]
    loss_sum = torch.zeros((), device=batch.ids.device)
    for i, chunk in enumerate(batch.split(len(batch) // config.grad_accum)):
        last = i == config.grad_accum - 1  # average gradients across processes only then
        if fsdp:
            runner.set_requires_gradient_sync(last)
        with runner.no_sync() if ddp and not last else nullcontext():
            if objective is not None:
                total = objective(runner, chunk, autocast)[0]
                loss = total / (batch.ids[:, 1:].numel() if learnt is None else learnt)
            elif learnt is None:
                loss = next_token_loss(runner, chunk.ids, autocast) / config.grad_accum
            elif preference:
                logps, counts = reply_logps(runner, chunk, autocast)
                loss = _objective_loss(
                    config, logps, counts, chunk.reference, pairs=len(batch) // 2,
                    chosen_tokens=chosen_tokens,
                )  # fmt: skip
            else:
                loss = _learnt_loss(runner, chunk, autocast, config.head_chunk)[0] / learnt
            balance = router_loss(runner)  # experts: keep the router's load even
            (loss if balance is None else loss + balance / config.grad_accum).backward()
        loss_sum += loss.detach()
    loss_value = mean_over_processes(loss_sum, world).item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"training loss is {loss_value}")
    trainable = [p for p in runner.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced over shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm.item()


@torch.no_grad()
def validation_loss(model: DecoderLM, data: TrainData, config: TrainConfig) -> float:
    """Mean loss (nats per token; for preference tuning, per pair) over the first
    `eval_batches` batches of validation rows."""
    model.eval()
    device = next(model.parameters()).device
    rows = data.validation_rows(config.eval_batches * config.batch_size).to(device)
    if config.objective in PREFERENCE_OBJECTIVES:
        return _validation_preference(model, rows, config)[0]
    total, count = 0.0, 0
    for chunk in rows.split(config.batch_size):
        if chunk.targets is None:
            total += next_token_loss(model, chunk.ids).item() * chunk.ids[:, 1:].numel()
            count += chunk.ids[:, 1:].numel()
        else:
            chunk_total, chunk_count = _learnt_loss(model, chunk, nullcontext, config.head_chunk)
            total, count = total + chunk_total.item(), count + chunk_count
    model.train()
    return total / count


def _objective_loss(config: TrainConfig, logps, counts, reference, **totals) -> torch.Tensor:
    """`preference_loss` with the config's objective, beta and margin."""
    return preference_loss(
        config.objective, logps, counts, reference,
        beta=config.preference_beta, gamma=config.simpo_gamma, **totals,
    )  # fmt: skip


@torch.no_grad()
def _validation_preference(model, rows: Batch, config: TrainConfig) -> tuple[float, float]:
    """The preference loss of validation pairs `rows`, and the share of them the model gets
    the right way round (`pair_accuracy`)."""
    model.eval()
    parts = [reply_logps(model, chunk) for chunk in rows.split(2 * config.batch_size)]
    logps = torch.cat([p[0] for p in parts])
    counts = torch.cat([p[1] for p in parts])
    loss = _objective_loss(config, logps, counts, rows.reference)
    reference = rows.reference if config.objective == "dpo" else None
    model.train()
    return loss.item(), pair_accuracy(logps, reference)


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision == "auto":
        return "bf16" if bf16_is_fast(device.type) else "fp32"
    return config.precision


def set_precision(model: DecoderLM, precision: str, device: torch.device) -> Callable:
    """Make `model` train in `precision` (``fp32``, ``bf16`` or ``bf16-residual``; see
    `TrainConfig`): the dtype of its stream between blocks, and the autocast context its
    training passes run under, returned."""
    model.residual_dtype = torch.bfloat16 if precision == "bf16-residual" else None
    if precision in ("bf16", "bf16-residual"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def _start_metrics(path: Path, resume: bool, start: int) -> None:
    """A fresh metrics file, or, on resume, what the stopped run logged up to its checkpoint;
    rewritten aside and renamed, so a run killed here leaves the old log, not an empty one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for torn in path.parent.glob(f".{path.name}.*.tmp"):  # a killed rewrite's (we hold the lock)
        torn.unlink()
    kept = []
    if resume and path.exists():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    break  # a torn last line: the run was killed while writing it
                raise ValueError(f"{path}:{number}: not a JSON record: {line[:80]!r}") from None
            if record["step"] <= start:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """Refuse a second run on `out` while one is writing there: an advisory lock on
    ``out/.lock``, which holds the writer's pid (released when the process ends, however)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RuntimeError(
                f"{out}: another training run (pid {holder}) is writing here; wait for it to "
                "finish or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def _one_writer(train_fn):
    """`train` holding the lock of its `out` folder (every process of a torchrun writes there
    through the first one, which holds it)."""

    @functools.wraps(train_fn)
    def locked(config: TrainConfig, out: str | Path, **options) -> TrainResult:
        with _writing(Path(out)) if os.environ.get("RANK", "0") == "0" else nullcontext():
            return train_fn(config, out, **options)

    return locked


@_one_writer
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
    objective: Objective | None = None,
) -> TrainResult:
    """Train the model `config` describes; write checkpoints, metrics and a loss plot to `out`.

    `max_steps` stops early (the schedule still runs to ``config.steps``), and `resume`
    continues from ``out/last``. Under ``torchrun``, `parallel` chooses how the processes share
    the work: ``"ddp"`` or ``"fsdp"`` (`slmlab.train.distributed`). `device` is ``"cpu"`` (the
    default, so that a recipe gives the same numbers on every machine), ``"cuda"`` or
    ``"auto"``; under torchrun, CUDA means each process's own GPU. `prepare` changes the model
    in place once it is built (and initialised from ``config.init_from``), before training: how
    a transform of a higher layer trains through itself. A config with `qat` needs it;
    `slmlab.quant.qat.train_qat` passes it. `objective` is the loss to train with in place of
    the config's (see `Objective`): a config with `distill` needs it, and
    `slmlab.distill.train_distill` passes it. Validation measures the config's own loss.
    """
    out = Path(out)
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if config.distill is not None and objective is None:
        raise ValueError(
            "this config learns from a teacher (distill): run it with "
            "slmlab.distill.train_distill, `slmlab distill` or the zoo, which load the teacher"
        )
    rank, world, device = join(device)
    if (objective is not None or config.head_chunk) and world > 1 and parallel == "fsdp":
        what = "an objective" if objective is not None else "head_chunk"
        raise ValueError(
            f"{what} applies the model's output head itself, which FSDP's shards do not "
            "allow: train it with parallel='ddp'"
        )
    if config.batch_size % (world * config.grad_accum):
        raise ValueError(
            f"batch_size ({config.batch_size}) must divide evenly over {world} processes × "
            f"{config.grad_accum} micro-batches"
        )
    if max_steps is not None and max_steps < 0:  # 0: the starting weights, as a checkpoint
        raise ValueError(f"max_steps must be 0 or more steps, got {max_steps}")
    stop = min(config.steps, max_steps if max_steps is not None else config.steps)
    data = data or build_data(config)
    torch.manual_seed(config.seed)
    model_config = config.model_config(data.vocab_size, data.end_token_id())
    model = DecoderLM(model_config).to(device)
    model.activation_checkpointing = config.activation_checkpointing
    if config.init_from is not None:  # fine-tuning (QAT, say): start from a trained model
        initialise_from(model, config.init_from, data.tokenizer, seed=config.seed)
    if config.objective == "dpo" and data.train_reference is None:
        reference_logps(model, data, progress=progress and rank == 0)  # the starting model's
    lora = config.lora_config()
    if lora is not None:  # only the low-rank updates train (after the base's weights are in)
        apply_lora_(model, lora)
    if prepare is not None:
        prepare(model)
    elif config.qat is not None:
        raise ValueError(
            "this config trains through rounding (qat): run it with slmlab.quant.qat.train_qat, "
            "`slmlab train` or the zoo, which prepare the model's layers for it"
        )
    if config.quantize_base is not None and prepare is None:
        raise ValueError(
            "this config rounds the base it adapts (quantize_base, QLoRA): run it with "
            "slmlab.finetune.finetune or `slmlab finetune`, which round the layers"
        )
    attach_objective(model, objective)
    defaults = TrainConfig(model=config.model).to_dict()
    start = resume_weights(model, out, config.to_dict(), defaults) if resume else 0
    if start > stop:
        raise ValueError(
            f"{out / LAST / 'trainer.json'}: the checkpoint is at step {start}, past the "
            f"{stop} steps asked for: resume with --max-steps above {start}, or without it"
        )
    runner = share(model, world, parallel)
    optimizer = build_optimizer(model, config)  # after sharding: it holds the shards
    if resume:
        resume_optimizer(model, optimizer, out)
    precision = _precision(config, device)
    autocast = set_precision(model, precision, device)
    model.train()
    metrics_path = out / METRICS
    if rank == 0:
        _start_metrics(metrics_path, resume, start)

    def checkpoint(step: int) -> None:
        if rank == 0 or (world > 1 and parallel == "fsdp"):  # gathering shards is a collective
            trainer = {
                "step": step,
                "config": config.to_dict(),
                "precision": precision,
                "world_size": world,
                "parallel": parallel if world > 1 else None,
            }
            save_run(
                model, optimizer, out, data.tokenizer, trainer, rank=rank, chat=data.chat_settings
            )

    from tqdm.auto import tqdm

    bar = tqdm(
        range(start, stop),
        desc="training",
        disable=not progress or rank != 0,
        initial=start,
        total=stop,
    )
    tokens_per_step = config.batch_size * (2 if data.pairs else 1) * config.seq_len
    loss_value, val_loss, started = float("nan"), None, time.perf_counter()
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        rows = data.batch(step, config.batch_size, config.seed)
        local = len(rows) // world  # preference data: a pair's two rows, so an even share
        rows = rows[rank * local : (rank + 1) * local]
        try:
            loss_value, grad_norm = train_step(
                runner, optimizer, rows.to(device), config,
                world=world, autocast=autocast, objective=objective,
            )  # fmt: skip
        except FloatingPointError as err:
            raise FloatingPointError(
                f"{err} at step {step} (lr {lr:.2e}): lower the learning rate, raise "
                f"warmup_steps, or check the data; the last good checkpoint is in {out / LAST}"
            ) from None
        done = step + 1
        record = {
            "step": done,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": done * tokens_per_step,
        }
        if config.eval_every and (done % config.eval_every == 0 or done == stop):
            if data.pairs:
                rows = data.validation_rows(config.eval_batches * config.batch_size)
                val_loss, accuracy = _validation_preference(model, rows.to(device), config)
                record.update(val_loss=val_loss, val_pair_accuracy=accuracy)
            else:
                val_loss = validation_loss(model, data, config)
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

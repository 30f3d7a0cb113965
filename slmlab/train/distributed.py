"""More than one process: ``torchrun`` starts them, this module joins them and splits the work.

* ``parallel="ddp"`` (DistributedDataParallel): every process holds the whole model and
  optimizer; gradients are all-reduced. Right while the model fits on one device.
* ``parallel="fsdp"`` (PyTorch's FSDP2, ``fully_shard``): each block's parameters, gradients
  and optimizer state are split across the processes and gathered only for the block's forward
  and backward, so memory per process falls with their number. Right when the model does not fit.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..env import pick_device
from ..models.decoder import DecoderLM

__all__ = ["PARALLEL", "join", "share"]

PARALLEL = ("ddp", "fsdp")


def join(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device), initialising the process group when run under torchrun.
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


def share(model: DecoderLM, world: int, parallel: str) -> torch.nn.Module:
    """What the loop runs: `model` itself in one process, wrapped in DDP, or sharded in place
    by FSDP (one unit per block, and the root for the embedding, final norm and head)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if world == 1:
        return model
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def mean_over_processes(value: torch.Tensor, world: int) -> torch.Tensor:
    """`value` averaged over every process (in place; `value` itself in one process)."""
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value

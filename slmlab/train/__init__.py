"""Pre-training (chapter 05) and supervised fine-tuning (chapter 06): the recipe, the data
pipeline, the optimizer and the loop; more than one process (`distributed`) and what a run saves
(`state`) in modules of their own."""

from .config import TrainConfig
from .data import Batch, TrainData, build_data
from .loop import (
    TrainResult,
    attach_objective,
    next_token_loss,
    set_precision,
    sum_in_chunks,
    train,
    train_step,
    validation_loss,
)
from .optim import build_optimizer, lr_at
from .plots import plot_metrics, read_metrics

__all__ = [
    "Batch",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "attach_objective",
    "build_data",
    "build_optimizer",
    "lr_at",
    "next_token_loss",
    "plot_metrics",
    "read_metrics",
    "set_precision",
    "sum_in_chunks",
    "train",
    "train_step",
    "validation_loss",
]

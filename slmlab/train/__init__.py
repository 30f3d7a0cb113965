"""Pre-training (chapter 05): the recipe, the data pipeline and the loop."""

from .config import TrainConfig
from .data import TrainData, build_data
from .loop import TrainResult, evaluate, lr_at, next_token_loss, train
from .plots import plot_metrics, read_metrics

__all__ = [
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "build_data",
    "evaluate",
    "lr_at",
    "next_token_loss",
    "plot_metrics",
    "read_metrics",
    "train",
]

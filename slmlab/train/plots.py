"""Plots of a run's metrics (the JSONL log the loop writes)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(
    ("module://", "inline")
) else None
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_metrics", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(path: str | Path, floor_bits_per_char: float | None = None):  # -> Figure
    """Training and validation loss against tokens seen; with the entropy floor if given."""
    rows = read_metrics(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [r["tokens"] for r in rows],
        [r["loss"] for r in rows],
        label="train loss (nats/token)",
        alpha=0.6,
    )
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot(
            [r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss"
        )
    if floor_bits_per_char is not None and val:
        ax2 = ax.twinx()
        ax2.plot(
            [r["tokens"] for r in val],
            [r["val_bits_per_char"] for r in val],
            "s--",
            color="C2",
            label="validation bits/char",
        )
        ax2.axhline(floor_bits_per_char, color="C3", ls=":", label="entropy floor")
        ax2.set_ylabel("bits per character")
        ax2.legend(loc="upper center")
    ax.set(xlabel="tokens seen", ylabel="loss", yscale="log")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig

"""Preference tuning (chapter 06): learning from a better and a worse reply to the same prompt.

Each objective turns two numbers per reply into a loss: its log-probability under the model
being trained (the sum over the reply's tokens, `reply_logps`) and, for DPO, under the model it
started from (the reference, computed once before the first step: `reference_logps`).

* **DPO** (Rafailov et al., 2023): ``-log σ(β [(c - c_ref) - (r - r_ref)])``. The implicit
  reward of a reply is β times how much more likely the model makes it than the reference
  did; the loss asks that the chosen reply's reward beat the rejected one's. The reference
  keeps the model near where it started.
* **SimPO** (Meng et al., 2024): ``-log σ(β (c/|c| - r/|r|) - γ)``. No reference: the reward
  is the mean log-probability per token, and the chosen reply must win by a margin γ.
* **ORPO** (Hong et al., 2024): ``-c/|c| - β log σ(log odds(c) - log odds(r))`` with
  ``odds(p) = p / (1 - p)`` of the mean per-token probability. No reference and no SFT first:
  the first term is SFT on the chosen reply (averaged over the batch's chosen tokens, as TRL
  does), the second pushes the rejected reply's odds below.

Rows come in pairs, the chosen reply in row 2k and the rejected one in row 2k + 1
(`slmlab.data.chat.pair_rows`). The losses agree with TRL's (`tests/test_preference.py`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..data.chat import IGNORE
from .data import Batch, TrainData

__all__ = ["pair_accuracy", "preference_loss", "reference_logps", "reply_logps", "token_logps"]


def token_logps(
    model: torch.nn.Module, rows: Batch, autocast=nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability (nats) of each learnt token of `rows` given those before it (0
    elsewhere), and the mask of learnt tokens: both (B, L), like the targets (the model
    computes nothing after a row's last learnt token)."""
    assert rows.targets is not None, "rows with learnt targets"
    learnt = rows.targets != IGNORE  # the output head runs at these positions alone
    with autocast():
        logits = model(rows.ids[:, :-1], logits_at=learnt)
    logps = torch.zeros(rows.targets.shape, dtype=torch.float32, device=logits.device)
    logps[learnt] = -F.cross_entropy(logits.float(), rows.targets[learnt], reduction="none")
    return logps, learnt


def reply_logps(
    model: torch.nn.Module, rows: Batch, autocast=nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability (nats) of its learnt tokens given those before them,
    and how many learnt tokens it has."""
    logps, learnt = token_logps(model, rows, autocast)
    return logps.sum(-1), learnt.sum(-1)


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, data: TrainData, batch_size: int = 32, *, progress: bool = True
) -> None:
    """Fill `data`'s ``train_reference`` and ``val_reference``: `model`'s `reply_logps` of every
    row, computed once, so that DPO needs no second model in memory while it trains."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for split, ids, targets in (
        ("train", data.train, data.train_targets),
        ("val", data.val, data.val_targets),
    ):
        assert targets is not None
        sums = []
        for start in tqdm(
            range(0, len(ids), batch_size), desc=f"reference ({split})", disable=not progress
        ):
            rows = Batch(ids[start : start + batch_size], targets[start : start + batch_size])
            sums.append(reply_logps(model, rows.to(device))[0].cpu())
        setattr(data, f"{split}_reference", torch.cat(sums))
    model.train(was_training)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler, 2012). A reply the model is
    already certain of (x rounds to 0: infinite odds) counts as probability 1 - eps of its
    dtype, so the loss and its gradient stay finite; the odds then teach it nothing more."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(
    objective: str,
    logps: torch.Tensor,
    counts: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    beta: float,
    gamma: float = 0.5,
    pairs: int | None = None,
    chosen_tokens: int | None = None,
) -> torch.Tensor:
    """The `objective`'s (``dpo``, ``simpo``, ``orpo``) loss of these rows (chosen, rejected,
    chosen, ...: `logps` and `counts` as `reply_logps` gives them; `reference` the same for the
    starting model, which DPO needs): its mean over the pairs. Given `pairs` (and for ORPO
    `chosen_tokens`), the totals of a whole batch of which these rows are a part, it is this
    part's share of the batch's loss, so that the shares of micro-batches add up to it."""
    chosen, rejected = logps[0::2], logps[1::2]
    pairs = pairs or len(chosen)
    if objective == "dpo":
        if reference is None:
            raise ValueError("dpo needs the reference model's log-probabilities of the replies")
        margin = (chosen - reference[0::2]) - (rejected - reference[1::2])
        return -F.logsigmoid(beta * margin).sum() / pairs
    chosen_mean = chosen / counts[0::2]
    rejected_mean = rejected / counts[1::2]
    if objective == "simpo":
        return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma).sum() / pairs
    if objective == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (
            _log1mexp(chosen_mean) - _log1mexp(rejected_mean)
        )
        nll = -chosen.sum() / (chosen_tokens or int(counts[0::2].sum()))
        return nll - beta * F.logsigmoid(log_odds).sum() / pairs
    raise ValueError(f"objective must be dpo, simpo or orpo, got {objective!r}")


def pair_accuracy(logps: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """The share of pairs whose chosen reply the model prefers: its log-probability (relative
    to the reference's, where given) is the higher of the two."""
    score = logps if reference is None else logps - reference
    return float((score[0::2] > score[1::2]).float().mean())

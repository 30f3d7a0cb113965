"""Architectures at equal budget (chapter 03b): stories-1m and six changes of its block or stack.

    python -m benchmarks.architectures [--models stories-1m,...] [--quick]

Each zoo model (trained into the cache where it is not there; ``--quick`` takes the quick
variants, for a look at the plumbing only) is stories-1m's recipe, the same stories, steps and
rows, with one architectural change: a sliding window of 16 tokens in every layer, a mixture
of 8 experts of which 2 run per token, three of its four layers Mamba-2, latent attention
(DeepSeek's), 8 layers of width 96 in place of 4 of 128, or each block run twice on its
weights (MobileLLM's sharing). Each is measured by
`slmlab.experiments.architectures.compare_architectures`: parameters (all and active), FLOPs
per token at a context of 256, the cache one sequence holds at 256 tokens, bits per character
on 200 held-out stories against the grammar's exact entropy floor, ``stories_who`` (the
friend's name, copied from the opening: 200 items, 4 choices), and batch-1 decoding speed with
the blocks in PyTorch for every model (the compiled step exists for Llama's block alone).

Also measured: the cache at long contexts (``cache_bytes_at``), allocated for one sequence, for
the Llama block and the hybrid, and the seconds per training step of each recipe's model on
the recipe's batch (the best of 3, side by side in this process). Results go to
benchmarks/results/architectures.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write
from slmlab import zoo
from slmlab.data import entropy, stories
from slmlab.experiments.architectures import compare_architectures
from slmlab.models import DecoderLM, KVCache

MODELS = (
    "stories-1m",
    "stories-1m-window",
    "stories-1m-moe",
    "stories-1m-hybrid",
    "stories-1m-latent",
    "stories-1m-deep",
    "stories-1m-shared",
)
CONTEXTS = (256, 1024, 4096, 16384)


def step_seconds(name: str, quick: bool) -> float:
    """Seconds of one training step (forward and backward, no optimizer) of `name`'s model on
    its recipe's batch, the best of 3 after a warm-up."""
    recipe = zoo.recipe(name, quick=quick)
    config = recipe.model_config(vocab_size=672)
    torch.manual_seed(0)
    model = DecoderLM(config)
    ids = torch.randint(0, 672, (recipe.batch_size, recipe.seq_len))
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        model(ids).logsumexp(-1).mean().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="the quick variants (plumbing only)")
    args = parser.parse_args()
    names = args.models.split(",")
    checkpoints = {name: zoo.ensure(name, quick=args.quick) for name in names}
    rows = compare_architectures(
        checkpoints, texts=list(stories(200, seed=2)), floor=entropy().bits_per_char
    )
    for row in rows:
        row["step_seconds"] = step_seconds(row["model"], args.quick)
        config = zoo.recipe(row["model"], quick=args.quick).model_config(vocab_size=672)
        row["cache_bytes_at"] = {n: KVCache(config, 1, n).nbytes() for n in CONTEXTS}
    path = write("architectures", {"quick": args.quick, "models": rows})
    print(path)
    for row in rows:
        print(
            f"{row['model']:<20} {row['parameters'] / 1e6:5.2f}M ({row['active_parameters'] / 1e6:4.2f}M active) "
            f"{row['above_floor']:+6.1%} above the floor  who {row['stories_who']:.2f}  "
            f"{row['decode_tokens_per_s']:6.0f} tok/s  {row['step_seconds']:.2f} s/step"
        )


if __name__ == "__main__":
    main()

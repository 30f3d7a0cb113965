"""Training throughput and quality: the stories-8m recipe, and nanoGPT's Shakespeare CPU run.

    python -m benchmarks.train_speed [--recipe stories-8m] [--skip-shakespeare]

Results go to benchmarks/results/train_speed.json (another recipe: train_speed_RECIPE.json).

Reports training tokens/s, model FLOPs utilisation (training FLOPs per token from the budget
functions, × tokens/s, ÷ the fp32 matmul peak measured in the same run), and the validation
bits per character of whole held-out stories against the corpus's exact entropy floor.
When ../shared/data/tinyshakespeare.txt is present it also trains nanoGPT's
`shakespeare_char` CPU configuration and reports the validation loss (nanoGPT: about 1.88).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write
from slmlab import data, zoo
from slmlab.checkpoint import load, load_tokenizer
from slmlab.env import matmul_gflops
from slmlab.eval import score_texts
from slmlab.models import budget
from slmlab.tokenizers import END_OF_TEXT
from slmlab.train import TrainConfig, train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def training_flops_per_token(config: TrainConfig, vocab_size: int) -> float:
    """Forward FLOPs at the mean context (half the sequence), times 3 for forward + backward."""
    return 3 * budget.flops_per_token(config.model_config(vocab_size), config.seq_len // 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="stories-8m")
    parser.add_argument("--skip-shakespeare", action="store_true")
    args = parser.parse_args()
    peak = max(matmul_gflops(torch.float32, n=1024, seconds=0.5) for _ in range(3))
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    result: dict = {"peak_fp32_gflops": peak}

    config = zoo.recipe(args.recipe, quick=False)
    cached = zoo.path(args.recipe, quick=False)
    with tempfile.TemporaryDirectory() as scratch:
        # Train into the zoo's cache when the model is not there yet (later chapters and
        # benchmarks then use this very run); a cached model is trained again elsewhere.
        folder = scratch if (cached / "last" / "trainer.json").is_file() else cached
        run = train(config, folder)
        ckpt = run.checkpoint
        tokenizer, model = load_tokenizer(ckpt), load(ckpt)
        flops = training_flops_per_token(config, model.config.vocab_size)
        held_out = list(data.stories(300, seed=2))
        score = score_texts(
            model, tokenizer, held_out, separator=tokenizer.token_to_id(END_OF_TEXT)
        )
    floor = data.entropy().bits_per_char
    result[args.recipe] = {
        "params": model.num_parameters(),
        "steps": config.steps,
        "tokens": config.steps * config.batch_size * config.seq_len,
        "tokens_per_second": run.tokens_per_second,
        "training_flops_per_token": flops,
        "mfu": run.tokens_per_second * flops / (peak * 1e9),
        "val_bits_per_char": score.bits_per_char,
        "entropy_floor_bits_per_char": floor,
        "above_floor": score.bits_per_char / floor - 1,
        "precision": run.precision,
    }
    print(args.recipe, result[args.recipe])

    if not args.skip_shakespeare and SHAKESPEARE.is_file():
        # nanoGPT config/train_shakespeare_char.py with its CPU overrides (README): characters,
        # 4 layers, 4 heads, width 128, block 64, batch 12, 2000 iterations, lr 1e-3, no dropout.
        # Llama blocks instead of GPT-2's: SwiGLU at 8/3 the width keeps the MLP's parameters.
        nano = TrainConfig(
            model=dict(
                hidden_size=128,
                intermediate_size=352,
                num_hidden_layers=4,
                num_attention_heads=4,
                tie_word_embeddings=True,
            ),
            data=str(SHAKESPEARE),
            vocab_size=257,
            seq_len=64,
            batch_size=12,
            steps=2000,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=100,
            betas=(0.9, 0.99),
            weight_decay=0.1,
            eval_every=250,
            eval_batches=200,
            seed=1337,
        )
        with tempfile.TemporaryDirectory() as folder:
            run = train(nano, folder)
        result["shakespeare_char"] = {
            "val_loss_nats_per_char": run.val_loss,
            "nanogpt_reported": 1.88,
            "tokens_per_second": run.tokens_per_second,
            "steps": nano.steps,
        }
        print("shakespeare_char", result["shakespeare_char"])
    elif not args.skip_shakespeare:
        print(f"skipped shakespeare_char: {SHAKESPEARE} not found")
    # The default recipe's figures are the issue's; another recipe gets a file of its own.
    default = args.recipe == parser.get_default("recipe")
    path = write("train_speed" if default else f"train_speed_{args.recipe}", result)
    print(
        f"wrote {path}; above floor {result[args.recipe]['above_floor']:+.1%}, "
        f"MFU {result[args.recipe]['mfu']:.1%}, {math.floor(run.tokens_per_second)} tok/s (last run)"
    )


if __name__ == "__main__":
    main()

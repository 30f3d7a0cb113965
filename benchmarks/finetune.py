"""Fine-tuning (chapter 06): what SFT and LoRA teach stories-8m, and what a LoRA step costs.

    python -m benchmarks.finetune [--skip-quality] [--steps 20]

Results go to benchmarks/results/finetune.json.

* Quality: exact match and hallucination rate on 200 held-out story questions (test split),
  for stories-8m before fine-tuning (its weights with the chat tokens added, step 0), the zoo's
  stories-8m-sft (every weight) and stories-8m-lora (rank 16), each trained if not cached.
  Goal (the fine-tuning issue): SFT ≥ 0.9 exact match.
* Speed and memory: one LoRA training step (rank 16 on every block's linear layers, AdamW,
  16 rows of 256 tokens, replies-only loss) of slmlab against PEFT on transformers' Llama, the
  same weights, rows and settings, each side in a fresh process for its own peak RSS; the
  baseline is PEFT's, measured in the same run. Goal: ≥ 1.5× faster, at most the same memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write
from slmlab import checkpoint, zoo
from slmlab.data.story_qa import qa_examples, score_answers
from slmlab.eval.story_qa import answer_questions
from slmlab.finetune import finetune
from slmlab.layers.lora import LoraConfig, apply_lora_

RANK, ROWS = 16, 16


def _quality(work: Path) -> dict:
    base = zoo.ensure("stories-8m")
    start = finetune(base, work / "step0", max_steps=0, progress=False).checkpoint
    runs = {
        "stories-8m (step 0)": start,
        "stories-8m-sft": zoo.ensure("stories-8m-sft"),
        "stories-8m-lora": zoo.ensure("stories-8m-lora"),
    }
    tokenizer = checkpoint.load_tokenizer(start)
    test = qa_examples(200, "test", keep=lambda e: len(tokenizer.encode(e.prompt()).ids) < 224)
    out = {}
    for name, path in runs.items():
        model = checkpoint.load(path)
        settings = checkpoint.load_chat_settings(path)
        replies = answer_questions(model, checkpoint.load_tokenizer(path), settings, test)
        out[name] = score_answers(test, replies)
        print(f"{name:22} exact match {out[name]['exact_match']:.3f}  "
              f"hallucination {out[name]['hallucination']:.3f}")  # fmt: skip
    return out


def _rows(work: Path):
    """The LoRA recipe's first batch, and the base (with chat tokens) saved for transformers."""
    from slmlab.train import build_data

    config = zoo.resolve(zoo.recipe("stories-8m-lora"))
    data = build_data(config)
    start = finetune(zoo.ensure("stories-8m"), work / "step0", max_steps=0, progress=False)
    batch = data.batch(0, ROWS, 0)
    torch.save({"ids": batch.ids, "targets": batch.targets}, work / "rows.pt")
    return start.checkpoint


def _side(side: str, base: Path, rows: Path, steps: int) -> None:
    """One side's step time and peak RSS, printed as JSON (run in its own process)."""
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    batch = torch.load(rows)
    ids, targets = batch["ids"], batch["targets"]
    if side == "slmlab":
        from slmlab.train import next_token_loss
        from slmlab.train.data import Batch

        model = checkpoint.load(base)
        apply_lora_(model, LoraConfig(r=RANK, alpha=2 * RANK))
        model.train()
        rows_batch = Batch(ids, targets)

        def loss() -> torch.Tensor:
            return next_token_loss(model, rows_batch)
    else:
        import peft
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        settings = peft.LoraConfig(
            r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )  # fmt: skip
        model = peft.get_peft_model(hf, settings)
        model.train()
        labels = torch.cat([targets, torch.full_like(targets[:, :1], -100)], 1)
        labels = torch.roll(labels, 1, 1)  # transformers shifts labels itself

        def loss() -> torch.Tensor:
            return model(input_ids=ids[:, :-1], labels=labels[:, :-1]).loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)

    def step() -> float:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    first = step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({
        "first_loss": first,
        "step_seconds": times[len(times) // 2],
        "trainable": sum(p.numel() for p in params),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed LoRA steps a side")
    parser.add_argument("--side", choices=["slmlab", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _side(args.side, args.base, args.rows, args.steps)
        return
    work = Path(tempfile.mkdtemp(prefix="slmlab-finetune-"))
    result: dict = {}
    if not args.skip_quality:
        result["story_qa"] = _quality(work)
    base = _rows(work)
    sides = {}
    for side in ("peft", "slmlab"):
        command = [sys.executable, "-m", "benchmarks.finetune", "--side", side, "--base",
                   str(base), "--rows", str(work / "rows.pt"), "--steps", str(args.steps)]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])
        print(side, sides[side])
    result["lora_step"] = {
        "rank": RANK,
        "rows": ROWS,
        "seq_len": 256,
        "baseline": "peft",
        **sides,
        "speedup": sides["peft"]["step_seconds"] / sides["slmlab"]["step_seconds"],
        "memory_ratio": sides["slmlab"]["peak_rss_mib"] / sides["peft"]["peak_rss_mib"],
        "goal": {"speedup": 1.5, "memory_ratio": 1.0},
    }
    print(write("finetune", result))


if __name__ == "__main__":
    main()

"""What speculative decoding buys at batch 1 on this CPU, against the target model alone.

    python -m benchmarks.speculative [--tokens 160] [--rounds 3]

stories-8m as the target, drafted by stories-1m (trained on the same stories, alone) and by
stories-1m-kd (chapter 07's student, distilled from stories-8m), greedy and sampled (T = 1),
k drafts a round or up to 7 ending after one the drafter is unsure of (`draft_confidence`),
and by prompt lookup; SmolLM2-135M-Instruct asked to copy-edit a paragraph (an answer that
repeats its input), drafted by prompt lookup. Each row's time is the best of `--rounds` over
four prompts, the rows timed in turn so that a slow moment of the machine hits every row
alike; speed-ups are against `slmlab.generate` with the target alone in the same round, at
equal output (greedy: the same tokens, checked). With each row: the share of drafted tokens
kept, new tokens per call of the target, and the speed-up the closed form predicts from the
per-token acceptance those imply and the costs measured here: a draft step's (c) and a
check of k + 1 tokens (v), both relative to one step of the target.
Goal: at least 1.8x for stories-8m drafted by a 1M-parameter story model.
Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import write
from slmlab import checkpoint, zoo
from slmlab.checkpoint import load_chat_settings
from slmlab.devices import last_level_cache_bytes
from slmlab.eval import continuation_ms
from slmlab.infer import expected_speedup, generate, render_chat, speculative_generate

# A draft model's round ends after a token it gave less than this (`draft_confidence`).
CONFIDENCE = 0.5

STORY_OPENINGS = [
    "Once upon a time, Lily went to the park.",
    "Long ago, a boy named Tom lived in a small town.",
    "One day, Mia found a red ball under a bed.",
    "It was a sunny day. Ben had a dog and a blue kite.",
]

EDIT_TEXTS = [
    "The small model runs on a laptop. It reads every wieght once for each token it writes, "
    "so the speed of memory sets its pace. A draft can guess the next few tokens and the "
    "model checks them all in one pass.",
    "Python lists keep their items in order. You can add an item with append, remove one "
    "with pop, and sort the list in place with sort. A tuple is like a list that can not "
    "change after it is made.",
    "The garden was quiet in the morning. Birds sang in the tall trees and the grass was "
    "wet with dew. An old cat slept on the warm stones by the door.",
    "To bake bread, mix flour, water, salt and yeast. Let the dough rise for an hour, shape "
    "it, and let it rise again. Bake it in a hot oven untill the crust is brown.",
]


def step_costs(model, draft, k: int) -> dict:
    """Milliseconds of one target step, one draft step, and one target call on k + 1 tokens,
    each continuing a 16-token cache."""
    return {
        "target_step_ms": continuation_ms(model, 1, repeats=200),
        "draft_step_ms": continuation_ms(draft, 1, repeats=200) if draft is not None else 0.0,
        f"check_{k + 1}_tokens_ms": continuation_ms(model, k + 1, repeats=200),
    }


def acceptance_from_yield(tokens_per_call: float, k: int) -> float:
    """The per-token acceptance a that makes (1 - a^(k+1)) / (1 - a) tokens per call."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_speedup(mid, k, 0.0) < tokens_per_call:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result: dict = {"last_level_cache_mb": last_level_cache_bytes() / 2**20, "targets": {}}

    target = zoo.load("stories-8m", quick=False).eval()
    tokenizer = checkpoint.load_tokenizer(zoo.ensure("stories-8m", quick=False))
    drafts = {name: zoo.load(name, quick=False).eval() for name in ("stories-1m", "stories-1m-kd")}
    prompts = [tokenizer.encode(text).ids for text in STORY_OPENINGS]
    rows = [
        ("stories-1m", 3, 0.0),
        ("stories-1m-kd", 3, 0.0),
        ("stories-1m-kd", 5, 0.0),
        ("stories-1m-kd", "adaptive", 0.0),
        ("stories-1m-kd", 7, 0.0, CONFIDENCE),
        ("stories-1m-kd", 3, 1.0),
        ("stories-1m-kd", 5, 1.0),
        ("stories-1m-kd", 7, 1.0, CONFIDENCE),
        ("prompt-lookup", 3, 0.0),
    ]
    result["targets"]["stories-8m"] = run_rows(
        target, drafts, prompts, rows, args.tokens, args.rounds
    )

    path = zoo.ensure("smollm2-135m-instruct")
    smol = checkpoint.load(path).eval()
    smol_tokenizer = checkpoint.load_tokenizer(path)
    settings = load_chat_settings(path)
    special = {k: v for k, v in settings.items() if k.endswith("_token")}
    edit_prompts = [
        smol_tokenizer.encode(
            render_chat(
                settings["chat_template"],
                [{"role": "user", "content": f"Fix the spelling in this text:\n\n{text}"}],
                add_generation_prompt=True,
                **special,
            )
        ).ids
        for text in EDIT_TEXTS
    ]
    result["targets"]["smollm2-135m-instruct (copy-editing)"] = run_rows(
        smol,
        {},
        edit_prompts,
        [("prompt-lookup", 3, 0.0), ("prompt-lookup", 7, 0.0)],
        min(args.tokens, 96),
        args.rounds,
    )
    story_rows = result["targets"]["stories-8m"]["rows"]
    best_1m = max(r["speedup"] for r in story_rows if r["draft"].startswith("stories-1m"))
    result["goal: stories-8m with a 1M draft >= 1.8x"] = best_1m >= 1.8
    print(write("speculative", result))


def run_rows(target, drafts: dict, prompts: list[list[int]], rows, tokens: int, rounds: int):
    """Time the target alone and each (draft, k, temperature) row over `prompts`, in turn."""
    eos = target.config.eos_token_id

    def alone(temperature: float) -> tuple[float, list]:
        start = time.perf_counter()
        out = [
            generate(target, [p], tokens, temperature=temperature, seed=i, stop_tokens=eos)[0]
            for i, p in enumerate(prompts)
        ]
        return time.perf_counter() - start, out

    def speculative(draft, k, temperature: float, confidence=None) -> tuple[float, list]:
        start = time.perf_counter()
        out = [
            speculative_generate(
                target,
                p,
                tokens,
                draft=drafts.get(draft, draft),
                draft_tokens=k,
                temperature=temperature,
                seed=i,
                stop_tokens=eos,
                draft_confidence=confidence,
            )
            for i, p in enumerate(prompts)
        ]
        return time.perf_counter() - start, out

    temperatures = sorted({row[2] for row in rows})
    best_alone = dict.fromkeys(temperatures, float("inf"))
    best = [float("inf")] * len(rows)
    outputs: list = [None] * len(rows)
    reference: dict = {}
    alone(0.0)  # warm-up
    for _ in range(rounds):
        for t in temperatures:
            elapsed, reference[t] = alone(t)
            best_alone[t] = min(best_alone[t], elapsed)
        for i, row in enumerate(rows):
            elapsed, outputs[i] = speculative(*row)
            best[i] = min(best[i], elapsed)
    results = []
    for i, (draft, k, t, *confidence) in enumerate(rows):
        out = outputs[i]
        new = sum(len(r.ids) - len(p) for r, p in zip(out, prompts, strict=True))
        alone_new = sum(len(ids) - len(p) for ids, p in zip(reference[t], prompts, strict=True))
        drafted, accepted = sum(r.drafted for r in out), sum(r.accepted for r in out)
        calls = sum(r.target_calls for r in out)
        row = {
            "draft": draft,
            "draft_tokens": k,
            "draft_confidence": confidence[0] if confidence else None,
            "temperature": t,
            "same_tokens_as_alone": [r.ids for r in out] == reference[t] if t == 0 else None,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_call": (accepted + calls) / calls,
            "tokens_per_s": new / best[i],
            "alone_tokens_per_s": alone_new / best_alone[t],
        }
        row["speedup"] = row["tokens_per_s"] / row["alone_tokens_per_s"]
        if isinstance(k, int) and not confidence:  # a round of k drafts: the closed form
            costs = step_costs(target, drafts.get(draft), k)
            c = costs["draft_step_ms"] / costs["target_step_ms"]
            v = costs[f"check_{k + 1}_tokens_ms"] / costs["target_step_ms"]
            a = acceptance_from_yield(row["tokens_per_call"], k)
            row.update(costs)
            row["per_token_acceptance"] = a
            row["predicted_speedup"] = expected_speedup(a, k, c, check_cost=v)
        results.append(row)
        print(
            f"  {draft:<14} k={k!s:<8} {'c=' + str(confidence[0]) if confidence else '':<5} T={t}  "
            f"kept {row['acceptance_rate']:.2f}  "
            f"{row['tokens_per_call']:.2f} tok/call  {row['tokens_per_s']:6.1f} tok/s  "
            f"{row['speedup']:.2f}x (predicted {row.get('predicted_speedup', float('nan')):.2f}x)"
        )
    return {"rows": results}


if __name__ == "__main__":
    main()

"""Pruning on the real model: every unstructured method at 50% and 2:4, the structured cuts, and
low-rank factorisation (SVD, ASVD, SVD-LLM keeping 80% and 60% of each layer's parameters).

    python -m benchmarks.prune_quality [--parts unstructured,structured,low-rank] [--rows 16] [--chars 60000]

Calibration: `--rows` rows of 256 tokens of Python's help texts (``python-docs``). Scored on two
held-out texts: the help texts' validation split (the calibration's domain) and, where
``../shared/data`` is present, the opening `--chars` characters of every held-out Gutenberg book
(another domain: the calibration never saw prose). Goals (per pattern, 50% and 2:4): Wanda's
perplexity increase at most half of magnitude's, SparseGPT's at most Wanda's.
Writes benchmarks/results/prune_quality.json (a run of some `--parts` replaces those parts of it) and .png.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import RESULTS, gutenberg_openings, write
from slmlab import data, zoo
from slmlab.experiments.compare import compare
from slmlab.experiments.pruning import (
    low_rank_transforms,
    plot_sweep,
    sparsity_sweep,
    structure_transforms,
)
from slmlab.lowrank import LowRankConfig
from slmlab.prune import StructureConfig

PARTS = ("unstructured", "structured", "low-rank")


def unstructured(checkpoint, texts, measure) -> dict:
    rows = sparsity_sweep(
        checkpoint,
        methods=("magnitude", "wanda", "sparsegpt"),
        sparsities=(0.5,),
        patterns=("2:4",),
        texts=texts,
        **measure,
    )
    dense = rows[0]["perplexity"]
    goals = {}
    for pattern in (None, "2:4"):
        increase = {
            r["method"]: r["perplexity"] - dense
            for r in rows
            if r["pattern"] == pattern and r["method"] != "dense"
        }
        label = pattern or "50%"
        goals[f"{label}: wanda increase <= 0.5 x magnitude's"] = (
            increase["wanda"] <= 0.5 * increase["magnitude"]
        )
        goals[f"{label}: sparsegpt increase <= wanda's"] = (
            increase["sparsegpt"] <= increase["wanda"]
        )
    for r in rows:
        print(
            f"  {r['method']:<10} {r['sparsity']:>4.0%} {r['pattern'] or '':<4} "
            f"ppl {r['perplexity']:10.2f}  {r['seconds']:5.1f} s"
        )
    for goal, met in goals.items():
        print(f"  {'met' if met else 'NOT met'}: {goal}")
    return {"unstructured": rows, "goals": goals}


def structured(checkpoint, texts, measure) -> dict:
    configs = {
        "6 blocks, block influence": StructureConfig(layers=6),
        "6 blocks, angular distance": StructureConfig(layers=6, layer_metric="angular"),
        "MLP 50%, activation": StructureConfig(mlp=0.5),
        "MLP 50%, Taylor": StructureConfig(mlp=0.5, importance="taylor"),
        "2 of 3 kv groups, activation": StructureConfig(kv_groups=2),
        "2 of 3 kv groups, Taylor": StructureConfig(kv_groups=2, importance="taylor"),
    }
    rows = compare(
        checkpoint,
        {"dense": None} | structure_transforms(configs),
        texts=texts,
        tasks=(),
        decode_tokens=0,
        disk=False,
        **measure,
    )
    for r in rows:
        print(f"  {r['method']:<30} {r['parameters'] / 1e6:6.1f}M  ppl {r['perplexity']:8.2f}")
    return {"structured": rows}


def low_rank(checkpoint, texts, measure) -> dict:
    configs = {
        f"{method} {share:.0%}": LowRankConfig(method, ratio=share)
        for share in (0.8, 0.6)
        for method in ("svd", "asvd", "svd-llm")
    }
    rows = compare(
        checkpoint,
        {"dense": None} | low_rank_transforms(configs),
        texts=texts,
        tasks=(),
        decode_tokens=0,
        disk=False,
        **measure,
    )
    for r in rows:
        print(f"  {r['method']:<30} {r['parameters'] / 1e6:6.1f}M  ppl {r['perplexity']:12.4g}")
    return {"low_rank": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)}")
    parser.add_argument("--rows", type=int, default=16, help="calibration rows of 256 tokens")
    parser.add_argument("--chars", type=int, default=60000, help="Gutenberg characters scored")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: no part {unknown}; the parts are {list(PARTS)}")
    checkpoint = zoo.ensure(args.model, quick=False)
    measure = {"calibration": "python-docs", "calibration_rows": args.rows, "progress": True}
    sets = {"python-docs": list(data.corpus_texts("python-docs", "validation"))}
    prose = gutenberg_openings(args.chars)
    if prose is not None:
        sets["gutenberg"] = prose
    previous = RESULTS / "prune_quality.json"
    result: dict = {"texts": {}}
    if set(parts) != set(PARTS) and previous.is_file():  # the other parts stay as they were
        result = {k: v for k, v in json.loads(previous.read_text()).items() if k in ("texts",)}
    result["calibration"] = f"python-docs, {args.rows} rows x 256 tokens"
    run = {"unstructured": unstructured, "structured": structured, "low-rank": low_rank}
    for name, texts in sets.items():
        print(f"\n{name}: {sum(map(len, texts)):,} characters")
        entry = result["texts"].setdefault(name, {})
        entry["characters"] = sum(map(len, texts))
        for part in parts:
            entry.update(run[part](checkpoint, texts, measure))
        if name == "python-docs" and "unstructured" in parts:
            fig = plot_sweep(entry["unstructured"], title=f"{args.model}, 50% and 2:4")
            fig.savefig(RESULTS / "prune_quality.png", dpi=120)
    print(write("prune_quality", result))


if __name__ == "__main__":
    main()

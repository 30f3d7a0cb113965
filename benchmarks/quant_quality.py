"""Every quantization method on the zoo's 8M story model: chapter 08's table, measured.

    python -m benchmarks.quant_quality [--model stories-8m] [--group-size 96] [--limit N]

Bits per parameter, size on disk, bits per character and perplexity on 200 held-out stories,
the story suites' accuracy, and batch-1 decoding speed, for each method of
`slmlab.experiments.quantization.standard_methods`. Goals: GPTQ at 4 bits loses at most half of the
perplexity that round-to-nearest loses; the 4-bit checkpoint (embedding in int8) is at most
0.15× the fp32 one. The group size is the largest multiple of 32 up to 128 that divides every
layer's width (96 for the 8M model, whose widths are 288 and 768).
Writes benchmarks/results/quant_quality.json and .png.
"""

from __future__ import annotations

import argparse

from benchmarks.common import RESULTS, write
from slmlab import data, zoo
from slmlab.experiments.quantization import compare_methods, plot_methods, standard_methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories-8m")
    parser.add_argument("--group-size", type=int, default=96)
    parser.add_argument("--limit", type=int, default=None, help="suite items per task")
    parser.add_argument("--texts", type=int, default=200, help="held-out stories scored")
    parser.add_argument(
        "--only", default=None, help="comma-separated method labels (default: every method)"
    )
    args = parser.parse_args()
    checkpoint = zoo.ensure(args.model, quick=False)
    texts = list(data.stories(args.texts, seed=2))
    methods = standard_methods(args.group_size)
    g = args.group_size
    goal_rows = ["fp32", f"int4 RTN g{g}", f"int4 GPTQ g{g}", f"int4 GPTQ g{g} + int8 embedding"]
    if args.only:
        chosen = args.only.split(",")
        unknown = [name for name in chosen if name not in methods]
        if unknown:
            parser.error(f"--only: no method {unknown}; the methods are {list(methods)}")
        missing = [name for name in goal_rows if name not in chosen]
        if missing:
            parser.error(f"--only must include the rows the goals compare: {missing}")
        methods = {name: methods[name] for name in chosen}
    rows = compare_methods(checkpoint, methods, texts=texts, limit=args.limit)
    by_name = {row["method"]: row for row in rows}
    base = by_name["fp32"]["perplexity"]
    rtn_loss = by_name[f"int4 RTN g{g}"]["perplexity"] - base
    gptq_loss = by_name[f"int4 GPTQ g{g}"]["perplexity"] - base
    size_ratio = (
        by_name[f"int4 GPTQ g{g} + int8 embedding"]["disk_bytes"] / by_name["fp32"]["disk_bytes"]
    )
    for row in rows:
        print(
            f"{row['method']:<34} {row['bits_per_parameter']:5.2f} b/param "
            f"{row['disk_bytes'] / 2**20:6.2f} MiB  {row['bits_per_char']:.4f} bits/char  "
            f"ppl {row['perplexity']:.4f}  who {row['stories_who']:.3f}  "
            f"{row['decode_tokens_per_s']:.0f} tok/s"
        )
    summary = {
        "gptq_perplexity_loss_over_rtn": gptq_loss / rtn_loss if rtn_loss > 0 else None,
        "int4_checkpoint_over_fp32": size_ratio,
        "goals": "GPTQ loss <= 0.5 x RTN loss; 4-bit checkpoint <= 0.15 x fp32",
    }
    print(summary)
    plot_methods(rows).savefig(RESULTS / "quant_quality.png", dpi=120, bbox_inches="tight")
    print(write("quant_quality", {"model": args.model, "group_size": g, "rows": rows, **summary}))


if __name__ == "__main__":
    main()

"""What a short training run wins back after pruning, on the real model.

    python -m benchmarks.prune_recovery [--steps 48] [--every 12] [--variants cut-distill,...]

SmolLM2-135M-Instruct, pruned two ways, then trained for `--steps` steps of 4 x 128 tokens of
the Python documentation's help texts (`slmlab.experiments.pruning.recovery_curve`):

* ``cut-distill``: 6 of 30 blocks removed (block influence), distilled from the unpruned model
  (forward KL mixed with the data's cross-entropy, chapter 07);
* ``cut-finetune``: the same cut, fine-tuned on the text alone;
* ``two-four-distill``: Wanda 2:4, packed so that only the kept weights train, distilled.

Perplexity on the held-out help texts (the chapter's) at step 0 and every `--every` steps, and
the share of the gap to the dense model that training closed; with ``../shared/data``, also on
`--chars` characters of held-out Gutenberg books: text of another kind than the training text,
where fine-tuning may forget what the teacher still knows. CPU, fp32, seeded.
Writes benchmarks/results/prune_recovery.json (and merges: a run of some variants keeps the rest).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, gutenberg_openings, write
from slmlab import checkpoint, data, zoo
from slmlab.experiments.compare import compare
from slmlab.experiments.pruning import recovery_curve
from slmlab.prune import PruneConfig, StructureConfig, pack_2to4_, prune_, prune_structure_
from slmlab.quant import calibration_tokens

VARIANTS = ("cut-distill", "cut-finetune", "two-four-distill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=12)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--chars", type=int, default=30_000)
    args = parser.parse_args()
    path = zoo.ensure("smollm2-135m-instruct", quick=False)
    dense, tokenizer = checkpoint.load(path), checkpoint.load_tokenizer(path)
    calibration = calibration_tokens(tokenizer, "python-docs", rows=8, seq_len=256)
    texts = {"help texts": list(data.corpus_texts("python-docs", "validation"))}
    prose = gutenberg_openings(args.chars)
    if prose is not None:
        texts["gutenberg"] = prose
    dense_ppl = {
        name: compare(path, {"dense": None}, texts=held_out, tasks=(), decode_tokens=0,
                      disk=False, progress=False, calibration="python-docs",
                      calibration_rows=1)[0]["perplexity"]
        for name, held_out in texts.items()
    }  # fmt: skip
    previous = RESULTS / "prune_recovery.json"
    result = json.loads(previous.read_text()) if previous.exists() else {}
    result = {k: v for k, v in result.items() if k not in ("benchmark", "machine")}
    result |= {"dense_perplexity": dense_ppl, "steps": args.steps, "tokens_per_step": 4 * 128}
    result.setdefault("variants", {})
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: {name!r} is not one of {', '.join(VARIANTS)}")
        model = copy.deepcopy(dense)
        prepare = None
        if name.startswith("cut"):
            prune_structure_(model, StructureConfig(layers=6), calibration=calibration)
        else:
            prune_(model, PruneConfig("wanda", pattern="2:4"), calibration=calibration)
            prepare = pack_2to4_
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            rows = recovery_curve(
                model,
                tokenizer,
                Path(folder),
                texts=texts,
                teacher=path if name.endswith("distill") else None,
                steps=args.steps,
                every=args.every,
                prepare=prepare,
            )
        gap_closed = {
            text: (rows[0][text] - rows[-1][text]) / (rows[0][text] - dense_ppl[text])
            for text in texts
        }
        result["variants"][name] = {
            "rows": rows,
            "gap_closed": gap_closed,
            "seconds": time.perf_counter() - start,
        }
        for text in texts:
            print(f"{name:<18} {text:<11} " + "  ".join(f"{r['step']}: {r[text]:.2f}" for r in rows)
                  + f"  (dense {dense_ppl[text]:.2f}; {gap_closed[text]:.0%} of the gap closed)")  # fmt: skip
    print(write("prune_recovery", result))


if __name__ == "__main__":
    main()

"""Real benchmarks, scored three ways that must agree: slmlab, and lm-evaluation-harness on
slmlab's model and on its own Hugging Face (`hf`) model.

    python -m benchmarks.real_tasks [--models stories-8m,smollm2-135m-instruct] [--limit 200]

Reads HellaSwag, ARC-Easy, ARC-Challenge, PIQA and LAMBADA from ../shared/data/eval (see its
README), writes an lm-evaluation-harness task YAML for each (the harness's usual prompts:
"Question: ...\\nAnswer:" for ARC and PIQA, the passage without its last word for LAMBADA),
and scores each zoo model with `slmlab.eval.evaluate`, with `lm_eval.simple_evaluate` on the
registered ``slmlab`` model, and with `lm_eval.simple_evaluate` on the harness's ``hf`` model
loading the same checkpoint directory through transformers (``--no-hf`` skips that one). It
reports all three with chance level and, for SmolLM2-135M-Instruct, the figures Hugging Face
published. `--limit` scores the first N items of each set (0 for all). Items with a choice
longer than the model's whole context are left out for that model (lm-evaluation-harness
refuses them too) and counted in the JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import write
from slmlab import load_tokenizer, zoo
from slmlab.eval import Scorer, evaluate, load_task

EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"

MC = "output_type: multiple_choice\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
TASKS = {
    "hellaswag": ("hellaswag_val.jsonl", MC + "doc_to_text: ctx\ndoc_to_choice: endings\ndoc_to_target: label\n"),
    "arc_easy": ("arc_easy.jsonl", MC + "doc_to_text: \"{{query}}\\nAnswer:\"\ndoc_to_choice: choices\ndoc_to_target: gold\n"),
    "arc_challenge": ("arc_challenge.jsonl", MC + "doc_to_text: \"{{query}}\\nAnswer:\"\ndoc_to_choice: choices\ndoc_to_target: gold\n"),
    "piqa": ("piqa.jsonl", MC + "doc_to_text: \"{{query}}Answer:\"\ndoc_to_choice: choices\ndoc_to_target: gold\n"),
    "lambada_openai": (
        "lambada_openai.jsonl",
        "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: \"{{' ' + continuation}}\"\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    ),
}  # fmt: skip


# The SmolLM2-135M-Instruct model card's "Instruction model" table (zero-shot, scored with
# lighteval's prompts and normalisations, on the full sets; ARC is the mean of Easy and Challenge):
# https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct. The zoo's weights are the Q4_1 GGUF.
PUBLISHED = {"smollm2-135m-instruct": {"hellaswag": 0.409, "arc_average": 0.373, "piqa": 0.663}}


def write_tasks(folder: Path, limit: int, scorer: Scorer) -> tuple[dict, dict]:
    """The task YAMLs over the first `limit` items whose answers fit the model's context; each
    task's chance accuracy and the number of items left out."""
    chance, dropped = {}, {}
    for name, (file, body) in TASKS.items():
        lines = (EVAL / file).read_text(encoding="utf-8").splitlines()
        lines = lines[:limit] if limit else lines
        kept = [line for line in lines if _fits(json.loads(line), scorer)]
        dropped[name] = len(lines) - len(kept)
        lines = kept
        data = folder / file
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data))}\ntest_split: test\n{body}"
        )
        rows = [json.loads(line) for line in lines]
        sizes = [len(r.get("choices") or r.get("endings") or []) for r in rows]
        chance[name] = sum(1 / n for n in sizes) / len(sizes) if all(sizes) else 0.0
    return chance, dropped


def _fits(row: dict, scorer: Scorer) -> bool:
    answers = row.get("choices") or row.get("endings") or [row["continuation"]]
    return all(len(scorer.encode(" " + a)) <= scorer.max_length for a in answers)


def harness_metrics(results: dict, task: str, names) -> dict:
    """One task's metrics out of `lm_eval.simple_evaluate(...)["results"]`."""
    theirs = {k.split(",")[0]: v for k, v in results[task].items() if k.endswith(",none")}
    return {m: theirs[m] for m in names}


def agree(ours: dict, theirs: dict) -> bool:
    """Accuracies equal; a perplexity to 1e-5 (the tools batch the same requests differently)."""
    return all(
        theirs[m] == v if m.startswith("acc") else abs(theirs[m] / v - 1) < 1e-5
        for m, v in ours.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories-8m,smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=200, help="items per set (0: all)")
    parser.add_argument("--no-hf", action="store_true", help="skip lm-eval's own hf model")
    args = parser.parse_args()
    if not EVAL.is_dir():
        raise SystemExit(f"{EVAL} is not there: this benchmark needs the shared eval files")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from slmlab.eval.harness import SlmlabLM

    result: dict = {"limit": args.limit, "models": {}}
    for name in args.models.split(","):
        path = zoo.ensure(name)
        scorer = Scorer(zoo.load(name), load_tokenizer(path), batch_size=32)
        with tempfile.TemporaryDirectory() as folder:
            chance, dropped = write_tasks(Path(folder), args.limit, scorer)
            manager = TaskManager(include_path=folder, include_defaults=False)
            seconds = {}
            t0 = time.perf_counter()
            ours = {t: evaluate(scorer, load_task(Path(folder) / f"{t}.yaml")) for t in TASKS}
            seconds["slmlab"] = time.perf_counter() - t0
            routes = {"lm_eval": {"model": SlmlabLM(scorer=scorer)}}
            if not args.no_hf:
                # The same checkpoint directory through transformers, in fp32 like slmlab's.
                hf_args = f"pretrained={path},dtype=float32,device=cpu"
                routes["lm_eval_hf"] = {"model": "hf", "model_args": hf_args, "batch_size": 32}
            harness = {}
            for route, model in routes.items():
                t0 = time.perf_counter()
                harness[route] = lm_eval.simple_evaluate(
                    **model, tasks=list(TASKS), task_manager=manager, bootstrap_iters=0
                )["results"]
                seconds[route] = time.perf_counter() - t0
            rows = {}
            for task, scored in ours.items():
                row = {"slmlab": scored.metrics}
                for route, results in harness.items():
                    row[route] = harness_metrics(results, task, scored.metrics)
                    row[f"agree_{route}"] = agree(scored.metrics, row[route])
                rows[task] = {
                    **row,
                    "chance": chance[task],
                    "samples": scored.samples,
                    "left_out": dropped[task],
                    "truncated_requests": scored.truncated,
                }
                print(name, task, json.dumps(rows[task]))
            result["models"][name] = {
                "tasks": rows,
                "seconds": seconds,
                "published": PUBLISHED.get(name, {}),
            }
    print(write("real_tasks", result))


if __name__ == "__main__":
    main()

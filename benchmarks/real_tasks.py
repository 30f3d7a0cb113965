"""Real benchmarks, scored through slmlab and through lm-evaluation-harness: the two must agree.

    python -m benchmarks.real_tasks [--models stories-1m,stories-8m] [--limit 1000]

Reads HellaSwag, ARC-Easy, ARC-Challenge, PIQA and LAMBADA from ../shared/data/eval (see its
README), writes an lm-evaluation-harness task YAML for each (the harness's usual prompts:
"Question: ...\\nAnswer:" for ARC and PIQA, the passage without its last word for LAMBADA),
scores each zoo model with `slmlab.eval.evaluate` and with `lm_eval.simple_evaluate` on the
registered ``slmlab`` model, and reports both with chance level. `--limit` scores the first N
items of each set (0 for all). Items with a choice longer than the model's whole context are
left out for that model (lm-evaluation-harness refuses them too) and counted in the JSON.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories-1m,stories-8m")
    parser.add_argument("--limit", type=int, default=1000, help="items per set (0: all)")
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
            t0 = time.perf_counter()
            ours = {t: evaluate(scorer, load_task(Path(folder) / f"{t}.yaml")) for t in TASKS}
            seconds = time.perf_counter() - t0
            harness = lm_eval.simple_evaluate(
                model=SlmlabLM(scorer=scorer),
                tasks=list(TASKS),
                task_manager=manager,
                bootstrap_iters=0,
            )["results"]
            rows = {}
            for task, scored in ours.items():
                theirs = {
                    k.split(",")[0]: v for k, v in harness[task].items() if k.endswith(",none")
                }
                rows[task] = {
                    "slmlab": scored.metrics,
                    "lm_eval": {m: theirs[m] for m in scored.metrics},
                    # Accuracies must be equal; a perplexity may differ in the last digits
                    # (the two tools batch the same requests differently).
                    "agree": all(
                        theirs[m] == v if m.startswith("acc") else abs(theirs[m] / v - 1) < 1e-5
                        for m, v in scored.metrics.items()
                    ),
                    "chance": chance[task],
                    "samples": scored.samples,
                    "left_out": dropped[task],
                    "truncated_requests": scored.truncated,
                }
                print(name, task, json.dumps(rows[task]))
            result["models"][name] = {"tasks": rows, "slmlab_seconds": seconds}
    print(write("real_tasks", result))


if __name__ == "__main__":
    main()

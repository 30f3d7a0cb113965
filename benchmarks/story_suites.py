"""The story suites on word and superword tokens: where a prompt's cut falls inside a token, and
what token healing changes.

    python -m benchmarks.story_suites [--models stories-8m,stories-8m-superwords] [--limit N]

For each zoo model (trained into the cache when it is not there):

* ``stories_who``, ``stories_where``, ``stories_what`` by lm-evaluation-harness's rules (acc);
* ``stories_who_gen`` generated as lm-evaluation-harness does, and with token healing
  (`slmlab.infer.TokenHealer`), exact match;
* ``stories_where`` once more with every choice scored inside a whole sentence, the text
  ``context + " " + choice + "."`` tokenized as one: no cut falls inside a token there, so this
  tells a tokenization artefact from a model that does not know the answer.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import write
from slmlab import load_tokenizer, zoo
from slmlab.eval import Scorer, evaluate, load_task, story_items

SUITES = ("stories_who", "stories_where", "stories_what")


def whole_sentence_accuracy(scorer: Scorer, name: str, limit: int) -> float:
    """Accuracy when each choice is scored as part of the whole text, ended by a full stop."""
    items = story_items(name, size=limit)
    right = 0
    for item in items:
        texts = [f"{item['context']} {choice}." for choice in item["choices"]]
        scores = scorer.loglikelihood_rolling(texts)
        right += max(range(len(texts)), key=scores.__getitem__) == item["gold"]
    return right / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories-8m,stories-8m-superwords")
    parser.add_argument("--limit", type=int, default=200, help="items per suite (200: all)")
    args = parser.parse_args()
    results = {}
    for name in args.models.split(","):
        path = zoo.ensure(name)
        model = zoo.load(name)
        plain = Scorer(model, load_tokenizer(path))
        healed = Scorer(model, load_tokenizer(path), token_healing=True)
        start = time.perf_counter()
        row = {
            suite: evaluate(plain, load_task(suite), limit=args.limit).metrics["acc"]
            for suite in SUITES
        }
        who_gen = load_task("stories_who_gen")
        row["stories_who_gen"] = evaluate(plain, who_gen, limit=args.limit).metrics["exact_match"]
        row["stories_who_gen healed"] = evaluate(healed, who_gen, limit=args.limit).metrics[
            "exact_match"
        ]
        row["stories_where whole sentence"] = whole_sentence_accuracy(
            plain, "stories_where", args.limit
        )
        row["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = row
        print(name, row, flush=True)
    write("story_suites", {"limit": args.limit, "chance": 0.25, "models": results})


if __name__ == "__main__":
    main()

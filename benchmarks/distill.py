"""Distillation (chapter 07): how much of stories-8m a 1M student learns, by each loss.

    python -m benchmarks.distill [--parts losses,seeds,methods,scarce,cost] [--steps 600]
                                 [--methods NAME,...]

A run of some parts keeps the other parts' results from the last run that measured them, and
``--methods`` re-measures the named rows of ``methods`` alone, keeping the others' (and the
students from scratch) from the last run.
Results go to benchmarks/results/distill.json.

* ``losses``: the stories-1m student (its zoo recipe: 600 steps of 16 rows of 256 tokens,
  AdamW) on the teacher's tokens, trained from scratch and distilled from stories-8m with each
  loss; all see the same rows in the same order. Each is scored on 200 held-out stories
  (bits per character, against the grammar's exact entropy floor) and on the three story
  suites (lm-evaluation-harness's accuracy, 200 items each). ``gap_closed`` is the share of
  the distance from the scratch student to the teacher (bits per character) that distillation
  covered. Goal (the distillation issue): the best distilled student closes ≥ 30%.
* ``seeds``: the student from scratch and distilled with forward KL, each with `SEEDS` seeds
  (its initial weights and the order of its rows; the two runs of a seed see the same rows):
  one run of a 1M student at 600 steps is a draw from a wide spread, so the gap closed is
  measured between the means, and per seed.
* ``methods``: two students, stories-1m's architecture and a "0.3M" one (width 64: 0.23M
  parameters), each from scratch, distilled with forward KL from the live teacher, from the
  teacher's top-16 cache (`slmlab.distill.cache`, made once for both), with the last blocks'
  attention relations beside forward KL (MiniLMv2, weight 0.1), the last blocks' hidden states
  through a learnt projection beside forward KL (TinyBERT's, weight 0.1), and on-policy (half
  the rows continued by the student and graded by the teacher, generalised JSD: GKD). Scored
  as ``losses``, with the gap closed where the teacher is ahead.
* ``scarce``: the same students with 10% of the stories (2,000): from scratch, distilled on
  the logits of those stories, trained on those stories together with `GENERATED` stories
  the teacher wrote (sequence-level KD), and together with `CHECKED` stories it wrote that
  the grammar derives (the rest thrown away, as synthetic data is filtered by a checker); and,
  as the yardstick of the checked texts, with as many more real stories instead. Goal: the
  teacher's texts beat scratch.
* ``cost``: seconds per training step of plain cross-entropy and of each loss, the teacher's
  forward pass included, timed side by side in this process (the best of `COST_STEPS`); then
  forward KL read from the teacher's top-16 cache, the on-policy step with its generation, and
  forward KL with the relations or the hidden states beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, write
from slmlab import checkpoint, zoo
from slmlab.data import corpus_texts, stories
from slmlab.data.story_grammar import entropy, is_story
from slmlab.distill import (
    LOSSES,
    DistillConfig,
    Distiller,
    TeacherCache,
    cache_teacher,
    teacher_texts,
    train_distill,
)
from slmlab.eval import Scorer, evaluate, load_task, score_texts
from slmlab.tokenizers import END_OF_TEXT
from slmlab.train import attach_objective, build_data, train, train_step
from slmlab.train.optim import build_optimizer

PARTS = ("losses", "seeds", "methods", "scarce", "cost")
TEACHER, STUDENT = "stories-8m", "stories-1m"
# Each loss at its usual settings: the teacher and the data weighted half each, temperature 1
# (and forward KL once more from the teacher alone).
RUNS = {
    "forward-kl": {"loss": "forward-kl"},
    "forward-kl, teacher alone": {"loss": "forward-kl", "alpha": 1.0},
    "reverse-kl": {"loss": "reverse-kl"},
    "jsd": {"loss": "jsd"},
    "tv": {"loss": "tv"},
}
# A student of width 64 (0.23M parameters, 43k of them the embedding of 672 tokens).
SMALL_STUDENT = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
TOP_K = 16
METHODS = {
    "forward-kl": {"loss": "forward-kl"},
    f"forward-kl, cached top-{TOP_K}": {"loss": "forward-kl", "top_k": TOP_K},
    "forward-kl + relations 0.1": {"loss": "forward-kl", "relations": 0.1},
    "forward-kl + features 0.1": {"loss": "forward-kl", "features": 0.1},
    "jsd, on-policy 0.5": {"loss": "jsd", "on_policy": 0.5},
}
SCARCE_STORIES, GENERATED, CHECKED = 2000, 4000, 2000
SEEDS = (0, 1, 2, 3, 4)
# The least lead of the teacher over the scratch student that counts as a gap to close: two
# runs of one 1M recipe differ by several percent (chapter 07).
GAP = 0.05
SUITES = ("stories_who", "stories_where", "stories_what")
HELD_OUT, SUITE_ITEMS, COST_STEPS = 200, 200, 5


def _score(run: Path, tokenizer, floor: float) -> dict:
    model = checkpoint.load(run)
    held_out = list(stories(HELD_OUT, seed=2))
    bits = score_texts(
        model, tokenizer, held_out, separator=tokenizer.token_to_id(END_OF_TEXT)
    ).bits_per_char
    scorer = Scorer(model, tokenizer)
    suites = {
        suite: evaluate(scorer, load_task(suite), limit=SUITE_ITEMS).metrics["acc"]
        for suite in SUITES
    }
    return {"bits_per_char": bits, "above_floor": bits / floor - 1, **suites}


def _losses(work: Path, teacher: Path, tokenizer, floor: float, steps: int) -> dict:
    config = zoo.recipe(STUDENT, quick=False).replace(steps=steps)
    data = build_data(config, tokenizer=tokenizer)
    rows = {"teacher": _score(teacher, tokenizer, floor)}
    started = time.perf_counter()
    rows["scratch"] = _score(
        train(config, work / "scratch", data=data).checkpoint, tokenizer, floor
    )
    rows["scratch"]["minutes"] = (time.perf_counter() - started) / 60
    for name, settings in RUNS.items():
        started = time.perf_counter()
        student = config.replace(distill={"teacher": str(teacher), **settings})
        result = train_distill(student, work / name, data=data)
        rows[name] = {
            **_score(result.checkpoint, tokenizer, floor),
            "minutes": (time.perf_counter() - started) / 60,
        }
        print(name, rows[name], flush=True)
    return {"student": STUDENT, "steps": steps, "settings": RUNS, "rows": rows,
            **gaps_closed(rows), "goal_gap_closed": 0.3}  # fmt: skip


def _seeds(work: Path, teacher: Path, tokenizer, floor: float, steps: int) -> dict:
    teacher_bits = _score(teacher, tokenizer, floor)["bits_per_char"]
    runs: dict[str, list[dict]] = {"scratch": [], "forward-kl": []}
    for seed in SEEDS:
        config = zoo.recipe(STUDENT, quick=False).replace(steps=steps, seed=seed)
        data = build_data(config, tokenizer=tokenizer)
        scratch = train(config, work / f"seed-{seed}-scratch", data=data)
        runs["scratch"].append(_score(scratch.checkpoint, tokenizer, floor))
        distilled = config.replace(distill={"teacher": str(teacher), **RUNS["forward-kl"]})
        result = train_distill(distilled, work / f"seed-{seed}-forward-kl", data=data)
        runs["forward-kl"].append(_score(result.checkpoint, tokenizer, floor))
        print("seed", seed, {name: rows[-1] for name, rows in runs.items()}, flush=True)
    return {"seeds": list(SEEDS), "steps": steps, **seed_summary(runs, teacher_bits)}


def seed_summary(runs: dict[str, list[dict]], teacher_bits: float) -> dict:
    """Means and spreads of each method's runs over the seeds, the gap closed between the
    means, and per seed where the teacher is ahead of that seed's scratch run by `GAP`."""
    bits = {name: [row["bits_per_char"] for row in rows] for name, rows in runs.items()}
    mean = {name: statistics.mean(values) for name, values in bits.items()}
    by_seed = [
        (s - d) / (s - teacher_bits) if s - teacher_bits >= GAP * s else None
        for s, d in zip(bits["scratch"], bits["forward-kl"], strict=True)
    ]
    return {
        "teacher_bits_per_char": teacher_bits, "runs": runs, "mean_bits_per_char": mean,
        "stdev_bits_per_char": {name: statistics.stdev(values) for name, values in bits.items()},
        "gap_closed_of_means": (mean["scratch"] - mean["forward-kl"]) / (mean["scratch"] - teacher_bits),
        "gap_closed_by_seed": by_seed, "goal_gap_closed": 0.3,
    }  # fmt: skip


def _methods(
    work: Path, teacher: Path, tokenizer, floor: float, steps: int, only: list[str], kept: dict
) -> dict:
    base = zoo.recipe(STUDENT, quick=False).replace(steps=steps)
    data = build_data(base, tokenizer=tokenizer)
    cache = work / f"teacher-top{TOP_K}.safetensors"
    measured = only or list(METHODS)
    if only and kept["steps"] != steps:
        raise SystemExit(f"--methods: the kept rows trained {kept['steps']} steps, not {steps}")
    made = kept.get("cache")
    if any("top_k" in METHODS[name] for name in measured):
        started = time.perf_counter()
        cache_teacher(checkpoint.load(teacher), data.train, cache, k=TOP_K, name=TEACHER)
        made = {"minutes": (time.perf_counter() - started) / 60,
                "bytes": cache.stat().st_size, "rows": len(data.train), "k": TOP_K}  # fmt: skip
    teacher_row = _score(teacher, tokenizer, floor)
    students = {}
    for student, model in (("stories-1m", base.model), ("0.3M", SMALL_STUDENT)):
        config = base.replace(model=model)
        rows = {"teacher": teacher_row}
        if only:  # the students from scratch and the other methods as last measured
            before = kept["students"][student]
            rows.update({k: v for k, v in before["rows"].items() if k != "teacher"})
            parameters = before["parameters"]
        else:
            started = time.perf_counter()
            scratch = train(config, work / f"{student}-scratch", data=data)
            rows["scratch"] = _score(scratch.checkpoint, tokenizer, floor)
            rows["scratch"]["minutes"] = (time.perf_counter() - started) / 60
            parameters = checkpoint.load(scratch.checkpoint).num_parameters()
        for name in measured:
            settings = METHODS[name]
            if "top_k" in settings:
                settings = {**settings, "cache": str(cache)}
            started = time.perf_counter()
            distilled = config.replace(distill={"teacher": str(teacher), **settings})
            result = train_distill(distilled, work / f"{student}-{name}", data=data)
            rows[name] = {
                **_score(result.checkpoint, tokenizer, floor),
                "minutes": (time.perf_counter() - started) / 60,
            }
            print(student, name, rows[name], flush=True)
        rows = {"teacher": rows["teacher"], "scratch": rows["scratch"],
                **{name: rows[name] for name in METHODS if name in rows}}  # fmt: skip
        students[student] = {"model": model, "parameters": parameters, "rows": rows,
                             **gaps_closed(rows, {n: METHODS[n] for n in METHODS if n in rows})}  # fmt: skip
    return {"steps": steps, "settings": METHODS, "cache": made, "students": students}


def gaps_closed(rows: dict, runs: dict = RUNS) -> dict:
    """Each distilled student's share of the distance from the student trained from scratch to
    the teacher (bits per character), where the teacher is better than that student by at
    least `GAP`; where it is not, the gap is within what runs vary by, and the shares are
    left out."""
    scratch, top = rows["scratch"]["bits_per_char"], rows["teacher"]["bits_per_char"]
    gap = scratch - top
    if gap < GAP * scratch:
        for name in runs:
            rows[name].pop("gap_closed", None)
        return {"teacher_ahead_of_scratch": gap / scratch, "best_gap_closed": None}
    for name in runs:
        rows[name]["gap_closed"] = (scratch - rows[name]["bits_per_char"]) / gap
    best = max(rows[name]["gap_closed"] for name in runs)
    return {"teacher_ahead_of_scratch": gap / scratch, "best_gap_closed": best}


def _scarce(work: Path, teacher: Path, tokenizer, floor: float, steps: int) -> dict:
    config = zoo.recipe(STUDENT, quick=False).replace(steps=steps, data_size=SCARCE_STORIES)
    data = build_data(config, tokenizer=tokenizer)
    rows = {}
    rows["scratch"] = _score(train(config, work / "scarce-scratch", data=data).checkpoint,
                             tokenizer, floor)  # fmt: skip
    logits = config.replace(distill={"teacher": str(teacher), **RUNS["forward-kl"]})
    rows["logits"] = _score(
        train_distill(logits, work / "scarce-logits", data=data).checkpoint, tokenizer, floor
    )
    model = checkpoint.load(teacher)
    written, minutes = _timed(lambda: teacher_texts(model, tokenizer, GENERATED, batch_size=128))
    sampled = 0

    def derived(text: str) -> bool:
        nonlocal sampled
        sampled += 1
        return is_story(text)

    # Seeded apart from the unchecked texts' batches, so the two sets are drawn independently.
    checked, checked_minutes = _timed(
        lambda: teacher_texts(model, tokenizer, CHECKED, batch_size=128, seed=1000, keep=derived)
    )
    for name, extra in (("teacher's texts", written), ("teacher's checked texts", checked)):
        corpus = work / f"{name.replace(' ', '-')}.jsonl"
        texts = [*corpus_texts("stories", "train", stories=SCARCE_STORIES), *extra]
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        sequences = config.replace(data=str(corpus), data_size=len(texts))
        seq_data = build_data(sequences, tokenizer=tokenizer)
        run = train(sequences, work / f"scarce-{name.replace(' ', '-')}", data=seq_data)
        rows[name] = _score(run.checkpoint, tokenizer, floor)
    rows["teacher's texts"]["generating_minutes"] = minutes
    rows["teacher's checked texts"]["generating_minutes"] = checked_minutes
    rows["teacher's checked texts"]["kept_of_sampled"] = [CHECKED, sampled]
    # What as many real stories would have given instead: the checked texts' yardstick.
    more = config.replace(data_size=SCARCE_STORIES + CHECKED)
    rows["real stories instead"] = _score(
        train(more, work / "scarce-more-real", data=build_data(more, tokenizer=tokenizer)).checkpoint,
        tokenizer, floor,
    )  # fmt: skip
    for name, row in rows.items():
        print(name, row, flush=True)
    return {"stories": SCARCE_STORIES, "generated": GENERATED, "checked": CHECKED,
            "steps": steps, "rows": rows}  # fmt: skip


def _timed(make):
    """`make()` and the minutes it took."""
    started = time.perf_counter()
    made = make()
    return made, (time.perf_counter() - started) / 60


def _cost(work: Path, teacher: Path, tokenizer) -> dict:
    config = zoo.recipe(STUDENT, quick=False)
    data = build_data(config.replace(data_size=2000), tokenizer=tokenizer)
    teacher_model = checkpoint.load(teacher)
    from slmlab.models import DecoderLM

    def seconds(objective) -> float:
        torch.manual_seed(0)
        model = DecoderLM(config.model_config(data.vocab_size, data.end_token_id()))
        attach_objective(model, objective)  # as `train` does: a projection trains too
        optimizer = build_optimizer(model, config)
        best = float("inf")
        for step in range(COST_STEPS + 1):
            rows = data.batch(step, config.batch_size, config.seed)
            started = time.perf_counter()
            train_step(model, optimizer, rows, config, objective=objective)
            if step:  # the first step warms up
                best = min(best, time.perf_counter() - started)
        return best

    plain = seconds(None)
    costs = {"cross-entropy": {"seconds": plain, "ratio": 1.0}}
    for loss in LOSSES:
        settings = DistillConfig(teacher=str(teacher), loss=loss)
        took = seconds(Distiller(teacher_model, settings))
        costs[loss] = {"seconds": took, "ratio": took / plain}
    cache = cache_teacher(teacher_model, data.train, work / "cost-cache.safetensors", k=TOP_K)
    settings = DistillConfig(teacher=str(teacher), cache=str(cache), top_k=TOP_K)
    took = seconds(Distiller(None, settings, cache=TeacherCache(cache)))
    costs[f"forward-kl, cached top-{TOP_K}"] = {"seconds": took, "ratio": took / plain}
    settings = DistillConfig(teacher=str(teacher), loss="jsd", on_policy=0.5)
    took = seconds(Distiller(teacher_model, settings))
    costs["jsd, on-policy 0.5"] = {"seconds": took, "ratio": took / plain}
    settings = DistillConfig(teacher=str(teacher), relations=0.1)
    took = seconds(Distiller(teacher_model, settings))
    costs["forward-kl + relations"] = {"seconds": took, "ratio": took / plain}
    settings = DistillConfig(teacher=str(teacher), features=0.1)
    width = config.model_config(data.vocab_size, data.end_token_id()).hidden_size
    took = seconds(Distiller(teacher_model, settings, student_width=width))
    costs["forward-kl + features"] = {"seconds": took, "ratio": took / plain}
    return {"rows": config.batch_size, "seq_len": config.seq_len, "baseline": "cross-entropy",
            "steps": costs}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=600, help="training steps a student")
    parser.add_argument(
        "--methods", default="", help=f"re-measure only these rows of methods: {','.join(METHODS)}"
    )
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r}; choose from {','.join(PARTS)}")
    only = [m for m in args.methods.split(",") if m]
    if sorted(set(only) - set(METHODS)):
        parser.error(f"--methods: unknown {sorted(set(only) - set(METHODS))[0]!r}; "
                     f"choose from {','.join(METHODS)}")  # fmt: skip
    teacher = zoo.ensure(TEACHER)
    tokenizer = checkpoint.load_tokenizer(teacher)
    floor = entropy().bits_per_char
    work = Path(tempfile.mkdtemp(prefix="slmlab-distill-"))
    kept = RESULTS / "distill.json"
    result: dict = json.loads(kept.read_text()) if kept.exists() else {}
    result = {k: v for k, v in result.items() if k not in ("benchmark", "machine")}
    if only and "methods" not in result:
        parser.error("--methods re-measures rows of an earlier run's methods: run it whole first")
    result.update(teacher=TEACHER, floor_bits_per_char=floor)
    if "losses" in parts:
        result["losses"] = _losses(work, teacher, tokenizer, floor, args.steps)
    if "seeds" in parts:
        result["seeds"] = _seeds(work, teacher, tokenizer, floor, args.steps)
    if "methods" in parts:
        earlier = result.get("methods", {})
        result["methods"] = _methods(work, teacher, tokenizer, floor, args.steps, only, earlier)
    if "scarce" in parts:
        result["scarce"] = _scarce(work, teacher, tokenizer, floor, args.steps)
    if "cost" in parts:
        result["cost"] = _cost(work, teacher, tokenizer)
    print(write("distill", result))


if __name__ == "__main__":
    main()

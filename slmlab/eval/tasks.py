"""Tasks are lm-evaluation-harness task files: the same YAML scores a model here and there.

The subset read here is what a task over a local file needs::

    task: my_task
    dataset_path: json                  # local json/jsonl files only
    dataset_kwargs:
      data_files: {test: /path/to/items.jsonl}   # relative paths: from the current directory
    test_split: test                    # or validation_split
    output_type: multiple_choice        # or loglikelihood, loglikelihood_rolling, generate_until
    doc_to_text: "{{question}}"          # a field name, or a Jinja template over the fields
    doc_to_choice: choices               # multiple_choice: a list field, or a template of a list
    doc_to_target: gold                  # an index into the choices, or the answer's text
    target_delimiter: " "               # between the context and each choice (the default)
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32}    # generate_until
    metric_list: [{metric: acc}, {metric: acc_norm}]

Metrics follow lm-evaluation-harness's definitions: ``acc`` picks the choice with the highest
log-likelihood; ``acc_norm`` the highest log-likelihood per *character* of the choice;
``exact_match`` compares the generated text and the target after the metric's own options
(``regexes_to_ignore``, ``ignore_case``, ``ignore_punctuation``, ``ignore_numbers``);
``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte`` pool log-likelihoods over all
documents. Keys that would change the prompt in ways not implemented here (few-shot examples,
descriptions, filters, custom Python functions) are refused by name, never ignored.
"""

from __future__ import annotations

import ast
import json
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.corpora import DataError, read_jsonl
from .perplexity import count_words
from .scorer import Scorer

__all__ = [
    "Task",
    "TaskError",
    "TaskResult",
    "choice_picks",
    "evaluate",
    "exact_match",
    "load_task",
    "perplexity_task",
]

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "generate_until": ["exact_match"],
}
# Keys that change nothing here (bookkeeping, or what only other splits use).
IGNORED = {
    "tag", "task_alias", "group", "metadata", "dataset_name", "training_split", "fewshot_split",
    "fewshot_delimiter", "should_decontaminate", "doc_to_decontamination_query", "repeats",
}  # fmt: skip
SUPPORTED = {
    "task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "output_type",
    "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "generation_kwargs",
    "metric_list", "num_fewshot",
}  # fmt: skip


class TaskError(ValueError):
    """A task file or one of its items is malformed; the message names the file, line and field."""


def _template_env():
    import jinja2

    from ..templates import Sandbox

    # lm-evaluation-harness's template environment (missing fields are errors, not ""), in a
    # bounded sandbox: a task file is shared like data, and must not run code when scored.
    return Sandbox(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        filters={"regex_replace": lambda s, pattern, repl: re.sub(pattern, repl, s)},
    )


@dataclass
class Task:
    """One task: its documents and how each becomes a request."""

    name: str
    output_type: str
    docs: list[dict[str, Any]]
    doc_to_text: str | None = None
    doc_to_choice: str | list[str] | None = None
    doc_to_target: str | int | None = None
    target_delimiter: str = " "
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> options
    locations: list[str] = field(default_factory=list)  # "file:line" of each document

    def __post_init__(self) -> None:
        self._env = _template_env()
        self._fields = {key for doc in self.docs for key in doc}
        if not self.locations:
            self.locations = [f"<{self.name}>:{i + 1}" for i in range(len(self.docs))]

    def _where(self, i: int, what: str) -> str:
        return f"{self.locations[i]}: {what}"

    def _resolve(self, i: int, spec: Any, what: str) -> Any:
        doc = self.docs[i]
        if not isinstance(spec, str):
            return spec
        if spec in self._fields:
            if spec not in doc:
                raise TaskError(self._where(i, f"{what}: the item has no field {spec!r}"))
            return doc[spec]
        try:
            return self._env.render(spec, doc)
        except Exception as error:  # jinja2's UndefinedError, TemplateSyntaxError, ...
            raise TaskError(self._where(i, f"{what}: template {spec!r} failed: {error}")) from None

    def text(self, i: int) -> str:
        text = self._resolve(i, self.doc_to_text, "doc_to_text")
        if not isinstance(text, str):
            raise TaskError(self._where(i, f"doc_to_text must give text, got {text!r}"))
        return text

    def choices(self, i: int) -> list[str]:
        choices = self._resolve(i, self.doc_to_choice, "doc_to_choice")
        if isinstance(choices, str):  # a template renders a list as its Python literal
            try:
                choices = ast.literal_eval(choices)
            except (SyntaxError, ValueError):
                raise TaskError(
                    self._where(i, f"doc_to_choice must give a list, got {choices!r}")
                ) from None
        if isinstance(choices, dict):
            choices = list(choices.values())
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise TaskError(
                self._where(i, f"doc_to_choice must give a list of text, got {choices!r}")
            )
        if not choices:
            raise TaskError(self._where(i, "doc_to_choice: the list of choices is empty"))
        return choices

    def target(self, i: int) -> int | str:
        target = self._resolve(i, self.doc_to_target, "doc_to_target")
        from_template = (
            isinstance(self.doc_to_target, str) and self.doc_to_target not in self._fields
        )
        if from_template and isinstance(target, str) and target.isdigit() and self.doc_to_choice:
            target = int(target)
        if self.output_type == "multiple_choice":
            choices = self.choices(i)
            if isinstance(target, str):
                if target not in choices:
                    raise TaskError(self._where(i, f"doc_to_target {target!r} is not a choice"))
                return choices.index(target)
            if not isinstance(target, int) or isinstance(target, bool):
                raise TaskError(self._where(i, f"doc_to_target must be an index, got {target!r}"))
            if not 0 <= target < len(choices):
                raise TaskError(
                    self._where(
                        i, f"doc_to_target {target} is out of range for {len(choices)} choices"
                    )
                )
            return target
        if isinstance(target, int) and self.doc_to_choice is not None:
            return self.choices(i)[target]
        if not isinstance(target, str):
            raise TaskError(self._where(i, f"doc_to_target must give text, got {target!r}"))
        return target

    def check(self) -> None:
        """Resolve every document once, so that a malformed item fails before any scoring."""
        for i in range(len(self.docs)):
            if self.output_type != "loglikelihood_rolling":
                self.text(i)
            self.target(i)


def _data_files(spec: Any, yaml_path: Path) -> dict[str, list[Path]]:
    if isinstance(spec, (str, list)):  # as in `datasets`: a bare file list is the "train" split
        spec = {"train": spec}
    if not isinstance(spec, dict):
        raise TaskError(f"{yaml_path}: dataset_kwargs.data_files must be a path, list or mapping")
    return {
        split: [Path(p) for p in ([files] if isinstance(files, str) else files)]
        for split, files in spec.items()
    }


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    if not path.is_file():
        raise TaskError(
            f"{path}: no such data file (relative paths are read from the current directory, "
            "as lm-evaluation-harness reads them)"
        )
    if path.suffix == ".json":  # one JSON array, or JSON lines under a .json name
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            rows = json.loads(text)
            return rows, list(range(1, len(rows) + 1))
    docs, lines = [], []
    try:
        rows = list(read_jsonl(path))
    except DataError as error:
        raise TaskError(str(error)) from None
    for number, row in rows:
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{number}: each line must be a JSON object")
        docs.append(row)
        lines.append(number)
    return docs, lines


def perplexity_task(source: str) -> Task:
    """``ppl:SOURCE``: word/byte perplexity and bits per byte of a built-in corpus's validation
    split (`slmlab.data.NAMED_CORPORA`) or of the reader's text (a file, folder or jsonl, as
    `slmlab.data.load_texts` reads them)."""
    from ..data import corpus_texts

    texts = [t for t in corpus_texts(source, "validation", stories=200) if t]
    if not texts:
        raise TaskError(f"ppl:{source}: no text to score")
    return Task(
        name=f"ppl:{source}",
        output_type="loglikelihood_rolling",
        docs=[{"text": t} for t in texts],
        doc_to_target="text",
        metrics={m: {} for m in DEFAULT_METRICS["loglikelihood_rolling"]},
    )


def load_task(spec: str | Path) -> Task:
    """A task from an lm-evaluation-harness YAML file, a built-in task by name
    (`slmlab.eval.story_tasks.STORY_TASKS`, written to disk on first use), or ``ppl:SOURCE``
    (`perplexity_task`)."""
    import yaml

    from .story_tasks import STORY_TASKS, story_task_file

    if str(spec).startswith("ppl:"):
        return perplexity_task(str(spec)[4:])
    path = story_task_file(str(spec)) if str(spec) in STORY_TASKS else Path(spec)
    if not path.is_file():
        raise TaskError(
            f"{spec}: no such task file, and not a built-in task ({', '.join(STORY_TASKS)})"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TaskError(
            f"{path}: not a readable YAML file ({' '.join(str(err).split())})"
        ) from None
    if not isinstance(config, dict):
        raise TaskError(f"{path}: a task file is a YAML mapping")
    try:
        return _task(config, path)
    except (TypeError, AttributeError) as err:
        # A field of the wrong kind (a list where a name belongs) no check above caught.
        raise TaskError(f"{path}: a field has the wrong type ({err})") from None


def _task(config: dict[str, Any], path: Path) -> Task:
    unknown = set(config) - SUPPORTED - IGNORED
    if unknown:
        raise TaskError(
            f"{path}: not supported here: {', '.join(sorted(unknown))} (slmlab reads the subset "
            "of lm-evaluation-harness task files for local data; run lm-eval itself for these)"
        )
    if config.get("num_fewshot") not in (None, 0):
        raise TaskError(f"{path}: num_fewshot must be 0 (few-shot prompts are not built here)")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"{path}: output_type {output_type!r} is not one of {OUTPUT_TYPES}")
    if config.get("dataset_path") != "json":
        raise TaskError(
            f"{path}: dataset_path must be 'json' with dataset_kwargs.data_files naming local "
            f"files (got {config.get('dataset_path')!r}); hub data sets: use lm-eval itself"
        )
    files = _data_files((config.get("dataset_kwargs") or {}).get("data_files"), path)
    split = config.get("test_split") or config.get("validation_split")
    if split not in files:
        raise TaskError(
            f"{path}: split {split!r} (test_split or validation_split) is not in data_files "
            f"({', '.join(files)})"
        )
    docs, locations = [], []
    for file in files[split]:
        rows, numbers = _read_jsonl(file)
        docs += rows
        locations += [f"{file}:{n}" for n in numbers]
    for key in ("doc_to_text", "doc_to_target") + (
        ("doc_to_choice",) if output_type == "multiple_choice" else ()
    ):
        if key not in config and not (
            key == "doc_to_text" and output_type == "loglikelihood_rolling"
        ):
            raise TaskError(f"{path}: {key} is missing (needed for output_type {output_type})")
    metrics: dict[str, dict[str, Any]] = {}
    for entry in config.get("metric_list") or [{"metric": m} for m in DEFAULT_METRICS[output_type]]:
        if not isinstance(entry, dict) or "metric" not in entry:
            raise TaskError(f"{path}: every metric_list entry needs a 'metric' key, got {entry!r}")
        name = entry["metric"]
        if name not in _METRICS[output_type]:
            raise TaskError(
                f"{path}: metric {name!r} is not available for {output_type} "
                f"(choose from {', '.join(_METRICS[output_type])})"
            )
        metrics[name] = {
            k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")
        }
    task = Task(
        name=config.get("task") or path.stem,
        output_type=output_type,
        docs=docs,
        doc_to_text=config.get("doc_to_text"),
        doc_to_choice=config.get("doc_to_choice"),
        doc_to_target=config.get("doc_to_target"),
        target_delimiter=config.get("target_delimiter", " "),
        generation_kwargs=config.get("generation_kwargs") or {"until": ["\n\n"]},
        metrics=metrics,
        locations=locations,
    )
    return task


_METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes", "exact_match"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}


def choice_picks(loglikelihoods: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """Which choice each multiple-choice metric picks, as lm-evaluation-harness defines them:
    ``acc`` the highest log-likelihood, ``acc_norm`` the highest per character of the choice,
    ``acc_bytes`` per byte of its UTF-8 text."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    return {
        "acc": int(np.argmax(lls)),
        "acc_norm": int(np.argmax(lls / np.array([float(len(c)) for c in choices]))),
        "acc_bytes": int(np.argmax(lls / np.array([float(len(c.encode())) for c in choices]))),
    }


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    regexes_to_ignore: Sequence[str] | None = None,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> list[float]:
    """1.0 where a prediction equals its reference after the stated normalisation, else 0.0
    (lm-evaluation-harness's ``exact_match``: the regexes are removed first, in order)."""
    out = []
    for prediction, reference in zip(predictions, references, strict=True):
        pair = [prediction, reference]
        for pattern in regexes_to_ignore or ():
            pair = [re.sub(pattern, "", s) for s in pair]
        if ignore_case:
            pair = [s.lower() for s in pair]
        if ignore_punctuation:
            pair = [s.translate(str.maketrans("", "", string.punctuation)) for s in pair]
        if ignore_numbers:
            pair = [s.translate(str.maketrans("", "", string.digits)) for s in pair]
        out.append(float(pair[0] == pair[1]))
    return out


@dataclass
class TaskResult:
    """A task's metrics (with the standard error of the mean where the metric is a mean)."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    samples: int
    truncated: int  # requests cut from the left to fit the model's context
    per_doc: dict[str, list[float]] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metrics": self.metrics,
            "stderr": self.stderr,
            "samples": self.samples,
            "truncated": self.truncated,
        }


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, float(np.std(values, ddof=1)) / math.sqrt(n)


def evaluate(
    scorer: Scorer, task: Task, *, limit: int | None = None, progress: bool = True
) -> TaskResult:
    """Score `task` (its first `limit` documents) with lm-evaluation-harness's metrics."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be 1 or more documents (None: all), got {limit!r}")
    task.check()
    indices = range(len(task.docs) if limit is None else min(limit, len(task.docs)))
    truncated_before = scorer.truncated
    per_doc: dict[str, list[float]] = {name: [] for name in task.metrics}
    pooled: dict[str, float] = {}
    if task.output_type == "multiple_choice":
        requests, spans = [], []
        for i in indices:
            choices = task.choices(i)
            spans.append((len(requests), choices))
            requests += [(task.text(i), task.target_delimiter + c) for c in choices]
        results = scorer.loglikelihood(requests, progress=progress)
        for i, (first, choices) in zip(indices, spans, strict=True):
            lls = np.array([ll for ll, _ in results[first : first + len(choices)]])
            greedy = [g for _, g in results[first : first + len(choices)]]
            gold = task.target(i)
            picks = choice_picks(lls, choices)
            for name in task.metrics:
                value = float(greedy[gold]) if name == "exact_match" else float(picks[name] == gold)
                per_doc[name].append(value)
    elif task.output_type == "loglikelihood":
        results = scorer.loglikelihood(
            [(task.text(i), task.target(i)) for i in indices], progress=progress
        )
        if "perplexity" in task.metrics:
            per_doc["perplexity"] = [ll for ll, _ in results]
            pooled["perplexity"] = math.exp(-sum(per_doc["perplexity"]) / len(results))
        if "acc" in task.metrics:
            per_doc["acc"] = [float(greedy) for _, greedy in results]
    elif task.output_type == "loglikelihood_rolling":
        texts = [task.target(i) for i in indices]
        lls = scorer.loglikelihood_rolling(texts, progress=progress)
        total = -sum(lls)
        words = sum(count_words(t) for t in texts)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        for name, value in {
            "word_perplexity": math.exp(total / words),
            "byte_perplexity": math.exp(total / nbytes),
            "bits_per_byte": total / nbytes / math.log(2),
        }.items():
            if name in task.metrics:
                pooled[name] = value
                per_doc[name] = lls
    else:  # generate_until
        generated = scorer.generate_until(
            [(task.text(i), task.generation_kwargs) for i in indices], progress=progress
        )
        references = [str(task.target(i)) for i in indices]
        per_doc["exact_match"] = exact_match(
            generated, references, **task.metrics.get("exact_match", {})
        )
    metrics, stderr = {}, {}
    for name, values in per_doc.items():
        if name in pooled:
            metrics[name] = pooled[name]
        else:
            metrics[name], stderr[name] = _mean_and_stderr(values)
    return TaskResult(
        task.name, metrics, stderr, len(indices), scorer.truncated - truncated_before, per_doc
    )

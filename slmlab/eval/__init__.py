"""Evaluation (chapter 11): perplexity, tasks in lm-evaluation-harness's format, offline story
suites with known answers, story questions put to a chat model (chapter 06), and what a model
costs to run.

``slmlab.eval.harness`` (imported on its own: it needs ``lm-eval``) registers slmlab models
with lm-evaluation-harness as ``--model slmlab``.
"""

from .efficiency import (
    continuation_ms,
    disk_bytes,
    measure_efficiency,
    model_bytes,
    peak_rss_bytes,
)
from .perplexity import TextScore, count_words, score_texts, streaming_token_bits, token_bits
from .repetition import repeated_ngram_share
from .scorer import Scorer
from .story_qa import answer_questions, story_qa_scores, word_similarity
from .story_tasks import STORY_TASKS, SUITE_SIZE, story_items, story_task_file
from .tasks import (
    Task,
    TaskError,
    TaskResult,
    choice_picks,
    evaluate,
    exact_match,
    load_task,
    perplexity_task,
)

__all__ = [
    "STORY_TASKS",
    "SUITE_SIZE",
    "Scorer",
    "Task",
    "TaskError",
    "TaskResult",
    "TextScore",
    "answer_questions",
    "choice_picks",
    "continuation_ms",
    "count_words",
    "disk_bytes",
    "evaluate",
    "exact_match",
    "load_task",
    "measure_efficiency",
    "model_bytes",
    "peak_rss_bytes",
    "perplexity_task",
    "repeated_ngram_share",
    "score_texts",
    "story_items",
    "story_qa_scores",
    "story_task_file",
    "streaming_token_bits",
    "token_bits",
    "word_similarity",
]

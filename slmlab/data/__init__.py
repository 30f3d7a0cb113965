"""Data (chapter 04): a story corpus with a known entropy, real text every Python has, the
reader's own files, and packing into training sequences; questions about the stories and
conversations as training data (chapter 06, `story_qa` and `chat`)."""

from .corpora import (
    NAMED_CORPORA,
    STORY_SEEDS,
    DataError,
    corpus_texts,
    load_texts,
    python_docs,
    python_source,
    split_of,
)
from .ngram import CharNGram
from .packing import pack, shuffled
from .story_grammar import (
    StoryStats,
    count_derivations,
    entropy,
    is_story,
    sample_stories,
    stories,
)

__all__ = [
    "NAMED_CORPORA",
    "STORY_SEEDS",
    "CharNGram",
    "DataError",
    "StoryStats",
    "corpus_texts",
    "count_derivations",
    "entropy",
    "is_story",
    "load_texts",
    "pack",
    "python_docs",
    "python_source",
    "sample_stories",
    "shuffled",
    "split_of",
    "stories",
]

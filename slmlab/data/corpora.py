"""Text every reader has: the Python standard library, and the reader's own files.

The standard library's source and its documentation topics ship with every Python, so they are
real text (and real code) that needs no download. Files go to the validation split by a hash of
their name, so the split is the same on every machine and never mixes parts of one file.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "NAMED_CORPORA",
    "STORY_SEEDS",
    "DataError",
    "corpus_texts",
    "load_texts",
    "python_docs",
    "python_source",
    "split_of",
]

NAMED_CORPORA = {
    "stories": "the generated story grammar (chapter 04)",
    "python": "the source of Python's standard library",
    "python-docs": "the documentation topics that help() shows",
}
# The story grammar has no files to split: each use draws its own stories with its own seed,
# so training, validation and calibration never share a story.
STORY_SEEDS = {"train": 1, "validation": 2, "calibration": 3}


class DataError(ValueError):
    """A data source that cannot be read; the message names the file, the line and the field."""


def split_of(name: str, validation_percent: int = 5) -> str:
    """'train' or 'validation' for an item named `name`, by a stable hash of the name."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 100
    return "validation" if bucket < validation_percent else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")


def python_source(split: str = "train") -> list[str]:
    """The source of the standard library's modules (``*.py``, tests and vendored code left out)."""
    _check_split(split)
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "ensurepip")
    files = sorted(
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)
    )
    texts = []
    for path in files:
        name = path.relative_to(root).as_posix()
        if split_of(name) == split:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def python_docs(split: str = "train") -> list[str]:
    """The documentation topics that ``help()`` shows (``pydoc_data``), one text per topic."""
    _check_split(split)
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if split_of(name) == split]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a jsonl file; a line that is not
    JSON is a `DataError` naming the file and line."""
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def load_texts(
    source: str | Path,
    *,
    field: str = "text",
    pattern: str = "*.txt",
    split: str = "train",
    data_files: str | list[str] | None = None,
) -> Iterator[str]:
    """Documents from the reader's own data, one string each.

    `source` is a text file (one document), a folder (every file matching `pattern`, sorted),
    a ``.jsonl`` file (the `field` of each line), a ``.parquet`` file (the `field` column), or
    ``hf:NAME`` for a Hugging Face data set (the `field` of each row of `split`, through the
    ``datasets`` package: a hub name needs a network connection; ``hf:json`` or ``hf:parquet``
    with `data_files` reads local files through the very same code path).
    """
    text = str(source)
    if text.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise DataError(
                "hf: sources need the 'datasets' package: pip install datasets"
            ) from None
        for row in datasets.load_dataset(text[3:], split=split, data_files=data_files):
            yield _field(row, field, text, None)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob(pattern) if p.is_file())
        if not files:
            raise DataError(f"{path}: no files match {pattern!r}")
        for file in files:
            yield file.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        for number, row in read_jsonl(path):
            yield _field(row, field, str(path), number)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path}: no column {field!r} (columns: {table.column_names})")
        yield from (str(v) for v in table.column(field).to_pylist())
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _field(row: object, field: str, where: str, line: int | None) -> str:
    at = f"{where}:{line}" if line is not None else where
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{at}: no field {field!r} (found {keys}); pass field=... to choose one")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{at}: field {field!r} is {type(value).__name__}, not text")
    return value


def corpus_texts(source: str | Path, split: str = "train", *, stories: int = 200) -> Iterable[str]:
    """The texts of a named corpus (`NAMED_CORPORA`) or of the reader's data (`load_texts`).

    `split` is ``train``, ``validation`` or ``calibration``. The story grammar draws `stories`
    stories with the split's seed (`STORY_SEEDS`); Python's source and documentation are split
    by file name (`split_of`), and calibrate on their training split; the reader's data is
    given whole, whatever the split (the caller holds some of it out). Stories are generated
    lazily: a caller may stop early.
    """
    if split not in STORY_SEEDS:
        raise ValueError(f"split must be one of {sorted(STORY_SEEDS)}, got {split!r}")
    if source == "stories":
        from .story_grammar import stories as draw

        return draw(stories, seed=STORY_SEEDS[split])
    files = "validation" if split == "validation" else "train"
    if source == "python":
        return python_source(files)
    if source == "python-docs":
        return python_docs(files)
    return load_texts(source)

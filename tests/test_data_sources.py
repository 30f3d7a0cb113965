"""Real text, the reader's files (plain, folders, jsonl, parquet, through `datasets`), packing."""

from __future__ import annotations

import json

import pytest
import torch

from slmlab.data import DataError, load_texts, pack, python_docs, python_source, shuffled, split_of


def test_stdlib_splits_are_disjoint_deterministic_and_real() -> None:
    train, val = python_source("train"), python_source("validation")
    assert len(train) > 100 and len(val) > 5
    assert not set(train) & set(val)
    assert python_source("validation") == val
    assert any("def " in t for t in val)
    docs = python_docs()
    assert docs and all(isinstance(t, str) and t for t in docs)
    assert split_of("json/decoder.py") == split_of("json/decoder.py")


def test_bad_split_name() -> None:
    with pytest.raises(ValueError, match="split must be"):
        python_source("test")


def test_text_file_and_folder(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second")
    (tmp_path / "skip.md").write_text("not matched")
    assert list(load_texts(tmp_path)) == ["first", "second"]
    assert list(load_texts(tmp_path / "a.txt")) == ["first"]
    assert list(load_texts(tmp_path, pattern="*.md")) == ["not matched"]


def test_jsonl_with_errors_that_name_file_line_and_field(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    texts = load_texts(path)
    assert next(texts) == "one"
    with pytest.raises(DataError, match=r"docs\.jsonl:3: no field 'text' \(found \['body'\]\)"):
        next(texts)
    with pytest.raises(DataError, match=r"docs\.jsonl:1: no field 'body'"):
        list(load_texts(path, field="body"))
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: not valid JSON"):
        list(load_texts(path))


def test_parquet_and_the_datasets_path_read_the_same_rows(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    rows = ["alpha beta", "gamma", "delta epsilon zeta"]
    pq.write_table(pa.table({"text": rows, "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(load_texts(tmp_path / "d.parquet")) == rows
    with pytest.raises(DataError, match="no column 'body'"):
        list(load_texts(tmp_path / "d.parquet", field="body"))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    via_datasets = list(load_texts("hf:json", data_files=str(jsonl)))
    assert (
        via_datasets
        == rows
        == list(load_texts("hf:parquet", data_files=str(tmp_path / "d.parquet")))
    )


def test_missing_source() -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        list(load_texts("/nonexistent/corpus"))


def test_pack_keeps_every_token_in_order_with_separators() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows = pack(docs, seq_len=3, separator=0)
    assert rows.shape == (3, 4)
    assert rows.flatten().tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    with pytest.raises(ValueError, match="do not fill one sequence"):
        pack([[1]], seq_len=10, separator=0)


def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    a, b, c = shuffled(100, seed=1), shuffled(100, seed=1), shuffled(100, seed=1, epoch=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(100))


def test_one_resolver_for_named_corpora_and_the_readers_files(tmp_path) -> None:
    from slmlab.data import NAMED_CORPORA, STORY_SEEDS, corpus_texts, stories

    for split, seed in STORY_SEEDS.items():
        assert list(corpus_texts("stories", split, stories=5)) == list(stories(5, seed=seed))
    # Training, validation and calibration never share a story.
    drawn = [set(corpus_texts("stories", s, stories=300)) for s in STORY_SEEDS]
    assert not (drawn[0] & drawn[1]) and not (drawn[0] & drawn[2]) and not (drawn[1] & drawn[2])
    assert corpus_texts("python", "validation") == python_source("validation")
    assert corpus_texts("python-docs", "calibration") == python_docs("train")
    (tmp_path / "mine.txt").write_text("my text")
    assert list(corpus_texts(tmp_path / "mine.txt", "validation")) == ["my text"]
    assert set(NAMED_CORPORA) == {"stories", "python", "python-docs"}
    with pytest.raises(ValueError, match="split must be one of"):
        corpus_texts("stories", "test")

"""Bad files, generated: whatever a config.json, a shard index, a safetensors header, a task
file, a training TOML or a GGUF header holds, reading it either works or raises slmlab's own
error (a ValueError) naming the file, never another exception, and never hangs.

Hypothesis draws the mutations from a seed fixed per test (``derandomize``), so a failure is
the same failure on every machine and in CI.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slmlab
from slmlab.models import DecoderLM, ModelConfig

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TINY = ModelConfig(
    vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1,
)  # fmt: skip

# JSON values of every kind, the awkward ones included: huge and negative numbers, non-finite
# floats, strings where numbers belong, containers where scalars belong.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, -1, 1, 3, 10**9, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return slmlab.save(DecoderLM(TINY), tmp_path_factory.mktemp("fuzz") / "ckpt")


def _copy(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(checkpoint, path)
    return path


def _loads_or_names(path: Path, named: str) -> None:
    try:
        slmlab.load(path)
    except ValueError as err:
        assert named in str(err), f"{type(err).__name__} names no file: {err}"
        assert "\n" not in str(err).strip(), f"not one line: {err}"


def _json(value) -> str:
    return json.dumps(value, allow_nan=True)


@FUZZ
@given(field=st.sampled_from(sorted(TINY.to_dict())), value=VALUES)
def test_a_config_field_holding_anything(checkpoint, tmp_path, field, value) -> None:
    path = _copy(checkpoint, tmp_path, "field")
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(_json(config))
    _loads_or_names(path, str(path))  # config.json, or the weights it no longer fits


@FUZZ
@given(document=VALUES)
def test_a_config_that_is_not_a_table(checkpoint, tmp_path, document) -> None:
    path = _copy(checkpoint, tmp_path, "document")
    (path / "config.json").write_text(_json(document))
    _loads_or_names(path, "config.json")


@FUZZ
@given(index=VALUES | st.fixed_dictionaries({"weight_map": VALUES}))
def test_a_shard_index_holding_anything(checkpoint, tmp_path, index) -> None:
    path = _copy(checkpoint, tmp_path, "index")
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(_json(index))
    _loads_or_names(path, str(path))


@FUZZ
@given(header=VALUES, size=st.integers(min_value=0, max_value=2**64 - 1) | st.none())
def test_a_safetensors_header_holding_anything(checkpoint, tmp_path, header, size) -> None:
    path = _copy(checkpoint, tmp_path, "header")
    data = (path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    body = _json(header).encode()
    prefix = struct.pack("<Q", len(body) if size is None else size)
    (path / "model.safetensors").write_bytes(prefix + body + data[8 + length :])
    _loads_or_names(path, "model.safetensors")


@FUZZ
@given(field=st.sampled_from(["steps", "lr", "batch_size", "seq_len", "warmup_steps", "seed",
                              "grad_clip", "weight_decay", "init_from", "qat", "model"]),
       value=VALUES)  # fmt: skip
def test_a_training_config_field_holding_anything(tmp_path, field, value) -> None:
    from slmlab.train.config import TrainConfig

    table = {"steps": 10, "model": {"hidden_size": 16, "intermediate_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2}}  # fmt: skip
    table[field] = value
    path = tmp_path / "train.json"
    path.write_text(_json(table))
    try:
        TrainConfig.from_file(path)
    except ValueError as err:
        assert "train.json" in str(err), f"{type(err).__name__} names no file: {err}"


@FUZZ
@given(field=st.sampled_from(["task", "dataset_path", "test_split", "output_type",
                              "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list"]),
       value=VALUES)  # fmt: skip
def test_a_task_file_field_holding_anything(tmp_path, field, value) -> None:
    import yaml

    from slmlab.eval.tasks import load_task

    (tmp_path / "docs.jsonl").write_text('{"q": "2+2", "a": "4"}\n')
    task = {
        "task": "sums", "dataset_path": "json", "dataset_kwargs": {"data_files": str(tmp_path / "docs.jsonl")},
        "test_split": "train", "output_type": "generate_until", "doc_to_text": "{{q}}=",
        "doc_to_target": "{{a}}",
    }  # fmt: skip
    task[field] = value
    path = tmp_path / "sums.yaml"
    path.write_text(yaml.safe_dump(task, allow_unicode=True))
    try:
        load_task(path)
    except ValueError as err:
        assert "sums.yaml" in str(err), f"{type(err).__name__} names no file: {err}"


@pytest.fixture(scope="module")
def gguf_bytes(story_tokenizer, tmp_path_factory) -> bytes:
    from slmlab.export import to_gguf

    torch.manual_seed(0)
    config = TINY.replace(vocab_size=story_tokenizer.get_vocab_size())
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return to_gguf(DecoderLM(config), out, tokenizer=story_tokenizer).read_bytes()


@FUZZ
@given(position=st.integers(min_value=0, max_value=4095), byte=st.integers(0, 255),
       cut=st.integers(min_value=0, max_value=8192) | st.none())  # fmt: skip
def test_a_gguf_header_with_a_byte_changed_or_cut(
    gguf_bytes, tmp_path, position, byte, cut
) -> None:
    from slmlab.gguf_file import read_gguf

    data = bytearray(gguf_bytes)
    data[position % len(data)] = byte
    if cut is not None:
        data = data[:cut]
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(data))
    try:
        read_gguf(path)
    except ValueError as err:
        assert "mutated.gguf" in str(err), f"{type(err).__name__} names no file: {err}"

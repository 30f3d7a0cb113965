"""Checkpoints: round trips, atomic writes, and errors that name the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import slmlab
from slmlab.checkpoint import CheckpointError
from slmlab.models import DecoderLM

from .hf_reference import VARIANTS


@pytest.fixture
def ckpt(tmp_path):
    model = DecoderLM(VARIANTS["llama-gqa-untied"]).eval()
    return model, slmlab.save(model, tmp_path / "ckpt")


def test_round_trip_is_exact(ckpt) -> None:
    model, path = ckpt
    loaded = slmlab.load(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path) -> None:
    model = DecoderLM(VARIANTS["llama-mha-tied-theta"])
    path = slmlab.save(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded = slmlab.load(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_save_replaces_atomically_and_leaves_no_temporaries(ckpt) -> None:
    model, path = ckpt
    slmlab.save(model, path)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoint_gets_the_permissions_of_an_ordinary_directory(tmp_path, umask) -> None:
    import os
    import stat

    from slmlab.io import atomic_write_text

    old = os.umask(umask)
    try:
        path = slmlab.save(DecoderLM(VARIANTS["llama-gqa-untied"]), tmp_path / "ckpt")
        atomic_write_text(tmp_path / "note.txt", "x")
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(path) == mode(tmp_path / "plain") == 0o777 & ~umask
    for file in [*path.iterdir(), tmp_path / "note.txt"]:
        assert mode(file) == mode(tmp_path / "plain.txt") == 0o666 & ~umask, file.name


def test_tokenizer_round_trip(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat"] * 10, trainers.BpeTrainer(vocab_size=300))
    path = slmlab.save(DecoderLM(VARIANTS["llama-gqa-untied"]), tmp_path / "c", tokenizer=tok)
    loaded = slmlab.load_tokenizer(path)
    assert loaded.encode("the cat").ids == tok.encode("the cat").ids


def corrupt(path, **changes):
    tensors = load_file(path / "model.safetensors")
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(ckpt) -> None:
    _, path = ckpt
    corrupt(path, **{"model.layers.1.mlp.up_proj.weight": None})
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'",
    ):
        slmlab.load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_named(ckpt, bad) -> None:
    _, path = ckpt
    weight = load_file(path / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    weight[2, 3] = bad
    corrupt(path, **{"model.layers.0.self_attn.q_proj.weight": weight})
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' holds 1 NaN",
    ):
        slmlab.load(path)


def test_wrong_shape_is_named(ckpt) -> None:
    _, path = ckpt
    corrupt(path, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(
        CheckpointError,
        match=r"'model\.norm\.weight' is torch\.float32 of shape \(3,\), config\.json implies "
        r"torch\.float32 of shape \(64,\)",
    ):
        slmlab.load(path)


def test_a_config_asking_for_more_layers_than_the_weights_hold_is_refused_at_once(ckpt) -> None:
    """Before any module is built: 200,000 layers took minutes to build and then failed."""
    _, path = ckpt
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 200_000
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"config\.json says num_hidden_layers = 200000, but the weights hold 2 \(numbered "
        r"0 to 1\); correct num_hidden_layers in config\.json",
    ):
        slmlab.load(path)


def test_unexpected_tensor_is_named(ckpt) -> None:
    _, path = ckpt
    corrupt(path, **{"model.layers.9.extra": torch.ones(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        slmlab.load(path)


def test_truncated_file_is_named(ckpt) -> None:
    _, path = ckpt
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        slmlab.load(path)


def test_unknown_architecture_is_named(ckpt) -> None:
    _, path = ckpt
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(
        CheckpointError, match=r"config\.json: unknown architecture model_type='gpt_neox'"
    ):
        slmlab.load(path)


def test_pickle_weights_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(VARIANTS["llama-gqa-untied"].to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors only"):
        slmlab.load(tmp_path)


def test_not_a_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        slmlab.load(tmp_path / "nope")

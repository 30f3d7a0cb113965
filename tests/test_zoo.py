"""The zoo: recipes train once, are cached by fingerprint, and load as models."""

from __future__ import annotations

import pytest

from slmlab import zoo
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
    assert [line.split()[0] for line in lines] == list(zoo.RECIPES)
    assert [line.endswith("(cached)") for line in lines] == [n == "stories-1m" for n in zoo.RECIPES]
    recipes = zip(lines, zoo.RECIPES.items(), strict=True)
    columns = {line.index(config.data, len(name)) for line, (name, config) in recipes}
    assert len(columns) == 1  # the data column lines up under the longest name


def test_unknown_recipe_names_the_zoo() -> None:
    with pytest.raises(KeyError, match="stories-1m"):
        zoo.recipe("gpt-5")

"""The console script: errors are one line after the usage, results can be JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import slmlab
from slmlab.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmlab", *args], capture_output=True, text=True)


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"slmlab {slmlab.__version__}"


@pytest.mark.parametrize("args", [("frobnicate",), ("budget", "SmolLM2-135M", "--bogus"), ()])
def test_bad_usage_exits_nonzero_with_usage_and_one_line(args: tuple[str, ...]) -> None:
    out = run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("usage: slmlab")
    assert lines[-1].startswith("slmlab") and "error:" in lines[-1]


def test_budget_json(tmp_path, capsys) -> None:
    path = tmp_path / "out" / "budget.json"
    assert main(["budget", "Qwen2.5-0.5B", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["params"]["total"] == 494_032_768
    assert "Qwen2.5-0.5B" in capsys.readouterr().out


def test_budget_unknown_model_names_the_choices() -> None:
    out = run("budget", "NoSuchModel-9B")
    assert out.returncode != 0 and "SmolLM2-135M" in out.stderr

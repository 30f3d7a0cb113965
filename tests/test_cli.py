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


def test_generate_from_a_checkpoint(tmp_path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from slmlab.models import DecoderLM, ModelConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["once upon a time there was a cat"] * 20,
        trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    config = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    model = DecoderLM(config).eval()
    path = slmlab.save(model, tmp_path / "ckpt", tokenizer=tok)
    out = run("generate", str(path), "--prompt", "once upon", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    prompt = tok.encode("once upon").ids
    expected = slmlab.generate(model, prompt, 5)[0]
    assert out.stdout.rstrip("\n") == tok.decode(expected)

    stop = tok.decode(expected[len(prompt) + 1 : len(prompt) + 3])
    out = run(
        "generate",
        str(path),
        "--prompt",
        "once upon",
        "--max-new-tokens",
        "5",
        "--stop",
        stop,
        "--repetition-penalty",
        "1.3",
        "--min-p",
        "0.1",
    )
    assert out.returncode == 0, out.stderr
    expected = slmlab.generate(
        model, prompt, 5, stop_strings=[stop], tokenizer=tok, repetition_penalty=1.3, min_p=0.1
    )[0]
    assert out.stdout.rstrip("\n") == tok.decode(expected)

    from slmlab.infer import TokenHealer

    out = run(
        "generate", str(path), "--prompt", "once up", "--max-new-tokens", "5", "--token-healing"
    )
    assert out.returncode == 0, out.stderr
    healer = TokenHealer(tok)
    assert healer.heal(tok.encode("once up").ids)[1] == b" up"  # " upon" is one token
    _, text = healer.generate(model, tok.encode("once up").ids, 5)
    assert out.stdout.rstrip("\n") == "once up" + text.decode()


def test_generate_on_a_broken_checkpoint_is_one_line(tmp_path) -> None:
    out = run("generate", str(tmp_path), "--prompt", "x")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"slmlab generate: error: {tmp_path}: no config.json"
    ]


def test_bad_requests_are_refused_before_any_work(tmp_path) -> None:
    """No model is loaded (nor a zoo recipe trained) for a request that cannot be carried out."""
    missing = str(tmp_path / "no-such-checkpoint")
    cases = {
        ("eval", missing, "--tasks", " , "): "--tasks names no task",
        ("eval", missing, "--tasks", "stories_who,stories_who"): "names task 'stories_who' twice",
    }
    for args, message in cases.items():
        out = run(*args)
        assert out.returncode == 1 and message in out.stderr.strip().splitlines()[-1], out.stderr
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = run("quantize", str(ckpt), "--out", str(ckpt / "."))
    assert out.returncode == 1
    assert "is the checkpoint being quantized" in out.stderr.strip().splitlines()[-1]


def test_an_unwritable_output_is_one_line_and_slmlab_debug_shows_the_traceback(
    tmp_path, capsys, monkeypatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["budget", "SmolLM2-135M", "--json", str(blocker / "budget.json")]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("slmlab budget: error: ") and "a-file" in lines[0]
    )
    monkeypatch.setenv("SLMLAB_DEBUG", "1")
    with pytest.raises(OSError):
        main(args)


def test_a_typo_in_a_quantization_table_is_named(tmp_path, capsys) -> None:
    from slmlab.quant import QuantConfig

    with pytest.raises(
        ValueError, match=r"qat\.bitz is not a QuantConfig field; known: \[.*'bits'"
    ):
        QuantConfig.from_table({"bitz": 4}, "qat")
    assert QuantConfig.from_table({"bits": 2}, "qat") == QuantConfig(bits=2)


def test_the_bad_input_sweep_ends_every_run_in_one_line(capsys) -> None:
    """tools/bad_inputs.py: fifty wrong inputs through the command line (lying config.json
    files, out-of-range flags, a template reaching for os, outputs that cannot be written), each
    ending in one error line: no traceback, no hang, nothing accepted in silence."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bad_inputs

    assert bad_inputs.main(["--show", "traceback"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip().endswith("0 traceback, 0 hang, 0 silent of 50 runs")

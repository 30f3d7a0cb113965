"""Feed the command line bad input, as an outside tester would, and count how each run ended.

    python tools/bad_inputs.py [--show clean|traceback|hang|silent]

Every input here is wrong (an out-of-range number, a file that lies, an output that cannot be
written), so each run should end in a one-line error naming the file, field or flag. A run ends
*clean* (exit status 1 or 2, at most the usage and one error line), in a *traceback* (any other
exception), *hangs* (past 60 s), or is *silent* (exit status 0: a wrong input accepted). The
model is a random two-layer decoder over a small trained tokenizer, so the sweep needs no zoo.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _checkpoint(folder: Path) -> Path:
    from slmlab.checkpoint import save
    from slmlab.models import DecoderLM, ModelConfig
    from slmlab.tokenizers import train_bpe

    tokenizer = train_bpe(["Once upon a time there was a cat. The end."] * 50, 300).to_hf()
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    return save(DecoderLM(config), folder / "tiny", tokenizer)


def _variants(folder: Path, good: Path) -> list[tuple[str, list[str]]]:
    """(what is wrong, argv) pairs."""
    import shutil

    def broken(name: str, change) -> str:
        path = folder / name
        shutil.copytree(good, path)
        change(path)
        return str(path)

    def config_is(value) -> callable:
        return lambda p: (p / "config.json").write_text(json.dumps(value))

    def config_field(key, value) -> callable:
        def change(p: Path) -> None:
            config = json.loads((p / "config.json").read_text())
            config[key] = value
            (p / "config.json").write_text(json.dumps(config))

        return change

    checkpoints = {
        "config.json a list": broken("list", config_is([1, 2])),
        "config.json null": broken("null", config_is(None)),
        "config.json not UTF-8": broken("bytes", lambda p: (p / "config.json").write_bytes(b"\xff\xfe{")),
        "200,000 layers": broken("deep", config_field("num_hidden_layers", 200_000)),
        "rope_theta Infinity": broken("theta", config_field("rope_theta", float("inf"))),
        "tie_word_embeddings 'false'": broken("tie", config_field("tie_word_embeddings", "false")),
        "vocab_size -1": broken("vocab", config_field("vocab_size", -1)),
        "weights truncated": broken("cut", lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:100])),
        "no tokenizer.json": broken("notok", lambda p: (p / "tokenizer.json").unlink()),
        "shard index leaving the folder": broken("index", lambda p: (
            (p / "model.safetensors").rename(p / "w.safetensors"),
            (p / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"lm_head.weight": "../../etc/passwd"}})))),
    }  # fmt: skip
    runs = [
        (f"generate: {why}", ["generate", path, "--prompt", "Once"])
        for why, path in checkpoints.items()
    ]
    g = str(good)
    text = folder / "text.txt"
    text.write_text("Once upon a time there was a cat. The end.\n" * 20)
    ppl = f"ppl:{text}"
    flags = [
        ("--max-new-tokens", ["-1", "100000000000"]),
        ("--temperature", ["nan", "-1", "inf"]),
        ("--top-k", ["0", "-3"]),
        ("--top-p", ["0", "1.5", "nan"]),
        ("--min-p", ["2", "-0.1"]),
        ("--repetition-penalty", ["0", "-1", "inf"]),
    ]
    for flag, values in flags:
        runs += [
            (f"generate {flag} {v}", ["generate", g, "--prompt", "Once", flag, v]) for v in values
        ]
    runs += [
        ("generate: an empty prompt", ["generate", g, "--prompt", ""]),
        ("generate: no such checkpoint", ["generate", str(folder / "absent"), "--prompt", "x"]),
        ("budget --context -1", ["budget", "SmolLM2-135M", "--context", "-1"]),
        ("budget: unknown model", ["budget", "GPT-9"]),
        ("budget --json into a file", ["budget", "SmolLM2-135M", "--json", str(Path(g) / "config.json" / "x.json")]),
        ("eval --tasks ''", ["eval", g, "--tasks", ""]),
        ("eval --tasks missing.yaml", ["eval", g, "--tasks", str(folder / "missing.yaml")]),
        ("eval --batch-size 0", ["eval", g, "--tasks", ppl, "--batch-size", "0"]),
        ("eval --batch-size -1", ["eval", g, "--tasks", ppl, "--batch-size", "-1"]),
        ("eval --limit -1", ["eval", g, "--tasks", ppl, "--limit", "-1"]),
        ("eval --limit 0", ["eval", g, "--tasks", ppl, "--limit", "0"]),
        ("train --config missing", ["train", "--config", str(folder / "none.toml"), "--out", str(folder / "r")]),
        ("train --max-steps -1", ["train", "--recipe", "stories-1m", "--out", str(folder / "r2"), "--max-steps", "-1"]),
        ("quantize --bits 99", ["quantize", g, "--bits", "99", "--out", str(folder / "q1")]),
        ("quantize --group-size 7", ["quantize", g, "--group-size", "7", "--out", str(folder / "q2")]),
        ("quantize --out its source", ["quantize", g, "--out", g]),
        ("prune --sparsity 1.5", ["prune", g, "--method", "magnitude", "--sparsity", "1.5", "--out", str(folder / "p1")]),
        ("prune --sparsity nan", ["prune", g, "--method", "magnitude", "--sparsity", "nan", "--out", str(folder / "p2")]),
        ("prune --pattern 2:1", ["prune", g, "--method", "magnitude", "--pattern", "2:1", "--out", str(folder / "p3")]),
        ("export --quant q3_k", ["export", g, "--to", "gguf", "--quant", "q3_k", "--out", str(folder / "e.gguf")]),
        ("convert: not a GGUF", ["convert", str(Path(g) / "config.json"), "--out", str(folder / "c")]),
        ("zoo train: unknown recipe", ["zoo", "train", "gpt-9"]),
        ("course release: unknown chapter", ["course", "release", "--out", str(folder / "k"), "--chapters", "99"]),
    ]  # fmt: skip
    (folder / "docs.jsonl").write_text('{"q": "2+2", "a": "4"}\n')
    task = {
        "task": "escape", "dataset_path": "json", "test_split": "train",
        "dataset_kwargs": {"data_files": {"train": str(folder / "docs.jsonl")}},
        "output_type": "generate_until", "doc_to_target": "{{a}}",
        "doc_to_text": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    }  # fmt: skip
    (folder / "escape.yaml").write_text(json.dumps(task))  # JSON is YAML
    runs.append(
        ("eval: a template reaching for os", ["eval", g, "--tasks", str(folder / "escape.yaml")])
    )
    runs.append(("eval: a task file that is a list", ["eval", g, "--tasks", str(text)]))
    return runs


class _Hang(Exception):
    pass


def _run(argv: list[str]) -> tuple[str, str]:
    from slmlab.cli import main

    def alarm(*_):
        raise _Hang

    signal.signal(signal.SIGALRM, alarm)
    err, out = io.StringIO(), io.StringIO()
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except _Hang:
        return "hang", ""
    except BaseException as error:  # what escapes is what is counted
        return "traceback", f"{type(error).__name__}: {error}"
    finally:
        signal.alarm(0)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    if code == 0:
        return "silent", out.getvalue()[-200:]
    if code in (1, 2) and len(errors) == 1 and len(lines) <= 3:
        return "clean", errors[0]
    return "traceback", "\n".join(lines[-3:])


def main(argv: list[str]) -> int:
    show = argv[1] if argv[:1] == ["--show"] and len(argv) == 2 else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = _variants(folder, _checkpoint(folder))
        outcomes = Counter()
        for why, args in runs:
            kind, detail = _run(args)
            outcomes[kind] += 1
            if show == kind:
                print(f"{why}: {detail}")
    print(", ".join(f"{outcomes[k]} {k}" for k in ("clean", "traceback", "hang", "silent")),
          f"of {len(runs)} runs")  # fmt: skip
    return 0 if outcomes["clean"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Batch-1 decoding on every runtime slmlab exports to, same weights, beside the roofline.

    python -m benchmarks.targets [--models tiny-3M stories-8m base-76M smollm2-135m-instruct]
                                 [--new-tokens 128] [--llama-cpp-python PYTHON]

For each model: slmlab itself (fp32, and int4 with groups of 32 and the head rounded too,
Q4_0's layout, saved as slmlab's quantized checkpoint and loaded as one, so that its process
never holds the fp32 weights, as llama.cpp's never does), ONNX Runtime (fp32, and int8 by its
dynamic quantization), ExecuTorch with XNNPACK (fp32), and llama.cpp (F32, Q8_0, Q4_0 and
Q4_K files written by `slmlab.export.to_gguf`; Q4_K's matrices whose rows are not whole
256-weight super-blocks in Q5_0, as llama-quantize writes them, which the roofline's 4.5 bits
a weight do not count) where an interpreter with llama-cpp-python is given. Each
runs in a process of its own, so that its peak memory (the process's maximum resident set,
Python and the runtime included) is its own. Decode tokens/s is the time of 128 greedy tokens
after a 16-token prompt less that of one; prefill tokens/s, a 128-token prompt's first token.
Beside each row, the roofline's prediction (`slmlab.devices.roofline`) for this machine:
bandwidth by cache level, fp32 matmul and the 4-bit product's rates, measured before every
row and the median of each taken (on a shared machine they move between minutes; each
row keeps the memory bandwidth measured before it),
at the bits a weight the row's own file takes: its weights' bytes over their number, so that
Q4_K's fallback blocks and an fp32 table kept beside int8 products are counted as read, plus
each runtime's fixed cost a token for each block (dispatch, norms, attention), which no
ceiling holds, and its share of its ceiling (its products stream weights slower than a plain
sum reads them): the line, time a token against the roofline's, through the runtime's rows of
`CALIBRATION`, a model of 3M parameters whose weights take microseconds to read, so that its
time is nearly all fixed cost, and of `SHARE_CALIBRATION`, the 76M model read from memory
(`slmlab.devices.fixed_cost_and_share`). Prefill is predicted by the same line through the
same two rows, the prompt's pass against the compute ceiling: its time a block beyond the
products (norms, activations, attention over 128 positions) and the share of the fp32
ceiling its products reach. The two calibration models' rows are not counted in
`within_goal`; SmolLM2 and stories-8m are predicted from them.
Goal: slmlab's int4 decodes at least as fast as llama.cpp's Q4_0 on the same weights: the
two rows' ratio, and the median of `--rounds` pairs of the two run back to back.

    python -m benchmarks.targets --paired-only --llama-cpp-python PYTHON

measures only the pairs and adds them to the stored run.

    python -m benchmarks.targets --predict-again

predicts the stored run's rows again from its own measurements (the roofline changed, the
measurements did not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import RESULTS, write
from benchmarks.decode_speed import CONFIGS
from benchmarks.llama_cpp_decode import peak_rss_mib
from slmlab.devices import Device, Roofline, fixed_cost_and_share, roofline, this_machine
from slmlab.env import best_seconds
from slmlab.io import atomic_write_text
from slmlab.models import ModelConfig
from slmlab.models.budget import param_count

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("slmlab", "fp32"), ("slmlab", "int4"),
    ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
    ("executorch", "fp32"),
    ("llama.cpp", "f32"), ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0"), ("llama.cpp", "q4_k"),
]  # fmt: skip
ROOFLINE_WEIGHTS = {"fp32": "fp32", "f32": "fp32", "int4": "q4_0", "int8": "int8",
                    "q8_0": "q8_0", "q4_0": "q4_0", "q4_k": "q4_k"}  # fmt: skip
PROMPT, SHORT = 128, 16
# Each time is the best of two calls at least and of a second's calls: a small model's 128
# tokens take tens of milliseconds, which a neighbour's burst on a shared machine can double.
TIMING_SECONDS = 1.0
CALIBRATION = "tiny-3M"  # where each runtime's fixed cost a token is measured
SHARE_CALIBRATION = "base-76M"  # where its share of the ceiling is: the book's largest model


def prompt_ids() -> list[int]:
    """The same token ids for every runtime (every model here has more than 610 tokens)."""
    return [(17 * i + 5) % 600 + 10 for i in range(PROMPT)]


def checkpoint_of(name: str, work: Path) -> Path:
    """A zoo model's checkpoint, or a random model of `CONFIGS[name]`'s shape with the
    stories tokenizer (its speed does not depend on its weights' values)."""
    from slmlab import checkpoint, zoo

    if name not in CONFIGS:
        return zoo.ensure(name)
    path = work / name
    if not (path / "config.json").exists():
        from slmlab.models import DecoderLM

        torch.manual_seed(0)
        model = DecoderLM(CONFIGS[name]).eval()
        checkpoint.save(model, path, checkpoint.load_tokenizer(zoo.ensure("stories-8m")))
    return path


def int4_checkpoint(ckpt: Path, work: Path) -> Path:
    """`ckpt` rounded to 4 bits in groups of 32, its tied embedding and head too (Q4_0's
    layout), saved as slmlab's quantized checkpoint."""
    from slmlab import checkpoint
    from slmlab.quant import QuantConfig, quantize_

    out = work / f"{ckpt.parent.name}-{ckpt.name}-int4"
    if not (out / "config.json").exists():
        config = QuantConfig(bits=4, group_size=32, skip=(), embedding_bits=4)
        model = quantize_(checkpoint.load(ckpt), config)
        checkpoint.save(model, out, checkpoint.load_tokenizer(ckpt))
    return out


def export_file(ckpt: Path, runtime: str, precision: str, work: Path, context: int) -> Path:
    from slmlab import export

    suffix = {"onnxruntime": "onnx", "executorch": "pte", "llama.cpp": "gguf"}[runtime]
    out = work / f"{ckpt.parent.name}-{ckpt.name}-{precision}.{suffix}"
    if not out.exists():
        if runtime == "onnxruntime":
            export.to_onnx(ckpt, out, quant=precision)
        elif runtime == "executorch":
            export.to_executorch(ckpt, out, context=context)
        else:
            export.to_gguf(ckpt, out, quant=precision)
    return out


def stored_bits(file: Path, config: ModelConfig) -> float:
    """Bits a weight `file` takes: its tensors' bytes (a GGUF's tensors, not its tokenizer; a
    checkpoint's model safetensors, not its optimizer's; an ONNX or ExecuTorch file whole)
    over the model's parameters."""
    if file.is_dir():
        nbytes = sum(f.stat().st_size for f in file.glob("model*.safetensors"))
    elif file.suffix == ".gguf":
        import gguf

        nbytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(file).tensors)
    else:
        nbytes = file.stat().st_size
    return 8 * nbytes / param_count(config).total


def run_one(runtime: str, precision: str, path: str, new_tokens: int) -> dict:
    """In the measuring process: load, warm up, time; peak memory last."""
    if runtime == "slmlab":
        from slmlab import checkpoint
        from slmlab.infer import generate

        model = checkpoint.load(path)  # fp32, or the int4 checkpoint `int4_checkpoint` wrote

        def run(tokens: list[int], n: int) -> None:
            generate(model, torch.tensor([tokens]), n, stop_tokens=())  # every row as long

    elif runtime == "onnxruntime":
        from slmlab.export import OnnxDecoder

        runner = OnnxDecoder(path)

        def run(tokens: list[int], n: int) -> None:
            runner.generate(tokens, n)
    else:
        from slmlab.export import ExecuTorchDecoder

        et = ExecuTorchDecoder(path)

        def run(tokens: list[int], n: int) -> None:
            et.generate(tokens, n)

    ids = prompt_ids()

    def timed(tokens: list[int], n: int) -> float:
        return best_seconds(partial(run, tokens, n), repeats=2, seconds=TIMING_SECONDS)

    run(ids[:SHORT], 4)
    first = timed(ids, 1)
    short = timed(ids[:SHORT], 1)
    long = timed(ids[:SHORT], new_tokens + 1)
    return {
        "decode_tok_s": new_tokens / (long - short),
        "prefill_tok_s": PROMPT / first,
        "peak_rss_mib": peak_rss_mib(),
    }


def measure(
    runtime: str, precision: str, file: Path, new_tokens: int, llama_python: str | None
) -> dict | None:
    if runtime == "llama.cpp":
        if llama_python is None:
            return None
        cmd = [llama_python, str(ROOT / "benchmarks" / "llama_cpp_decode.py"), str(file),
               "--prompt-tokens", str(PROMPT), "--new-tokens", str(new_tokens)]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "benchmarks.targets", "--one", runtime, precision,
               str(file), "--new-tokens", str(new_tokens)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} {precision} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_LLAMA_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def q4_k_against_llama_quantize(f32_file: Path, ours: Path, llama_python: str) -> dict:
    """llama.cpp's own quantizer (llama-quantize's Q4_K_S, through llama-cpp-python) run on
    the F32 file: of the matrices both files store in Q4_K, the share of super-blocks whose
    144 bytes are the same as `slmlab.export.to_gguf`'s."""
    import gguf
    import numpy as np

    theirs = ours.with_name(ours.stem + "-llama-quantize.gguf")
    cmd = [llama_python, "-c", _LLAMA_QUANTIZE, str(f32_file), str(theirs)]
    subprocess.run(cmd, capture_output=True, check=True)
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    same = total = matrices = 0
    for tensor in gguf.GGUFReader(theirs).tensors:
        if tensor.tensor_type.name == "Q4_K" and mine[tensor.name].tensor_type.name == "Q4_K":
            a = np.asarray(tensor.data).reshape(-1, 144)
            b = np.asarray(mine[tensor.name].data).reshape(-1, 144)
            same += int((a == b).all(axis=1).sum())
            total += len(a)
            matrices += 1
    return {"matrices": matrices, "super_blocks": total, "identical": same / max(total, 1)}


def int4_over_q4_0(rows: list[dict]) -> dict[str, float]:
    """Per model measured both ways: slmlab's int4 decode tokens/s over llama.cpp's Q4_0."""
    speed = {(r["model"], r["runtime"], r["precision"]): r["decode_tok_s"] for r in rows}
    return {
        model: speed[(model, "slmlab", "int4")] / speed[(model, "llama.cpp", "q4_0")]
        for model in dict.fromkeys(r["model"] for r in rows)
        if (model, "slmlab", "int4") in speed and (model, "llama.cpp", "q4_0") in speed
    }


def paired_int4_over_q4_0(
    models: list[str], work: Path, new_tokens: int, llama_python: str, rounds: int
) -> dict[str, dict]:
    """slmlab's int4 over llama.cpp's Q4_0, decode tokens/s, from `rounds` pairs of runs back
    to back, the first of each pair taking turns: two rows of the table are minutes apart, and
    a shared machine's neighbours move either by a fifth in that time. Per model, each
    pair's decode tokens/s (slmlab's, llama.cpp's), its ratio, and the ratios' median."""
    out = {}
    context = max(PROMPT, SHORT + new_tokens + 1)
    for name in models:
        ckpt = checkpoint_of(name, work)
        files = {"slmlab": int4_checkpoint(ckpt, work),
                 "llama.cpp": export_file(ckpt, "llama.cpp", "q4_0", work, context)}  # fmt: skip
        ratios, pairs = [], []
        for turn in range(rounds):
            speed = {}
            for runtime in ("slmlab", "llama.cpp")[:: 1 if turn % 2 == 0 else -1]:
                precision = "int4" if runtime == "slmlab" else "q4_0"
                got = measure(runtime, precision, files[runtime], new_tokens, llama_python)
                speed[runtime] = got["decode_tok_s"]
            pairs.append([speed["slmlab"], speed["llama.cpp"]])
            ratios.append(speed["slmlab"] / speed["llama.cpp"])
            print(f"{name}: round {turn + 1}, slmlab int4 {speed['slmlab']:.1f} tok/s, "
                  f"llama.cpp Q4_0 {speed['llama.cpp']:.1f}: {ratios[-1]:.2f}", flush=True)  # fmt: skip
        out[name] = {"tok_s": pairs, "rounds": ratios, "median": statistics.median(ratios)}
    return out


def typical(machines: list[Device]) -> Device:
    """The median of each figure `this_machine` measured before every row: on a shared
    machine one measurement can catch the neighbours busy or away (its memory bandwidth read
    30 GB/s and 57 within minutes here), the median of the run's is what its rows ran on."""
    first, median = machines[0], statistics.median
    return Device(
        first.name, first.memory_gb,
        median(m.bandwidth_gbs for m in machines),
        median(m.fp32_tflops for m in machines),
        None, None,
        first.source + f"; the median of {len(machines)} measurements, one before each row",
        cache_bandwidths=tuple(
            (level[0][0], median(gbs for _, gbs in level))
            for level in zip(*(m.cache_bandwidths for m in machines), strict=True)
        ),
        int4_rates=tuple(
            (width[0][0], median(rate for _, rate in width))
            for width in zip(*(m.int4_rates for m in machines), strict=True)
        ),
    )  # fmt: skip


def predict(row: dict, config: ModelConfig, device: Device, **line: float) -> Roofline:
    """The roofline of a row's model, file and runtime on `device`; `line` is `roofline`'s
    fixed costs and shares (none: the bare ceilings)."""
    return roofline(config, device, weights=ROOFLINE_WEIGHTS[row["precision"]],
                    context=SHORT + 64, prompt=PROMPT, bits=row["bits_per_weight"],
                    **line)  # fmt: skip


def blocks(config: ModelConfig) -> int:
    """The blocks a token runs through."""
    return config.num_hidden_layers * config.block_repeats


def calibration(
    rows: list[dict], configs: list[ModelConfig], device: Device, part: str
) -> dict[tuple[str, str], tuple[float, float]]:
    """{(runtime, precision): (fixed seconds a block, share)} for `part`, "decode" (a token)
    or "prefill" (the prompt's pass): the line through a runtime's two calibration rows, its
    measured time against its roofline's, ``time = roofline's time / share + blocks * fixed``
    (`slmlab.devices.fixed_cost_and_share`). On `CALIBRATION` a token's ceiling is
    microseconds and its time nearly all fixed cost; on `SHARE_CALIBRATION`, read from memory,
    it is mostly reading, at the runtime's share of the rate. A prompt's pass is bound by
    compute on both, and the wider model's products are the larger part of its time."""
    points: dict[tuple, dict] = {}
    for row, config in zip(rows, configs, strict=True):
        if row["model"] in (CALIBRATION, SHARE_CALIBRATION):
            tokens = 1 if part == "decode" else PROMPT
            ceiling = tokens / getattr(predict(row, config, device), f"{part}_tokens_per_s")
            points.setdefault((row["runtime"], row["precision"]), {})[row["model"]] = (
                ceiling, tokens / row[f"{part}_tok_s"], blocks(config))  # fmt: skip
    return {
        key: fixed_cost_and_share(at[CALIBRATION], at.get(SHARE_CALIBRATION))
        for key, at in points.items()
        if CALIBRATION in at
    }


def within_goal(rows: list[dict]) -> dict:
    """How many rows the roofline predicts within the goal: decode within 30% of the measured
    tokens/s, prefill within 50%; and the rows that miss, with measured over predicted. The
    calibration models' rows are left out (they are the prediction by construction)."""
    out = {}
    for part, tolerance in (("decode", 0.3), ("prefill", 0.5)):
        ratio = f"{part}_measured_over_predicted"
        counted = [r for r in rows if r["model"] not in (CALIBRATION, SHARE_CALIBRATION)]
        missed = [f"{r['model']} {r['runtime']} {r['precision']} {r[ratio]:.2f}"
                  for r in counted if abs(1 / r[ratio] - 1) > tolerance]  # fmt: skip
        out[part] = {"tolerance": tolerance, "rows": len(counted),
                     "within": len(counted) - len(missed), "missed": missed}  # fmt: skip
    return out


def predicted(rows: list[dict], configs: list[ModelConfig], device: Device) -> dict:
    """Each row's roofline on `device`, with its runtime's fixed costs (its blocks') and
    shares measured on the calibration models, written into the rows; the machine, the
    calibrations and `within_goal`."""
    lines = {part: calibration(rows, configs, device, part) for part in ("decode", "prefill")}
    for row, config in zip(rows, configs, strict=True):
        key = (row["runtime"], row["precision"])
        (decode_fixed, row["share"]), (prefill_fixed, row["prefill_share"]) = (
            lines[part].get(key, (0.0, 1.0)) for part in ("decode", "prefill"))  # fmt: skip
        decode_s, prefill_s = decode_fixed * blocks(config), prefill_fixed * blocks(config)
        row["overhead_ms"], row["prefill_overhead_ms"] = 1e3 * decode_s, 1e3 * prefill_s
        roof = predict(row, config, device, overhead_s=decode_s, share=row["share"],
                       prefill_overhead_s=prefill_s, prefill_share=row["prefill_share"])  # fmt: skip
        row["predicted_decode_tok_s"] = roof.decode_tokens_per_s
        row["predicted_decode_bound"] = roof.decode_bound
        row["predicted_prefill_tok_s"] = roof.prefill_tokens_per_s
        row["predicted_prefill_bound"] = roof.prefill_bound
        row["decode_from_cache"] = roof.decode_from_cache
        for part in ("decode", "prefill"):
            row[f"{part}_measured_over_predicted"] = (
                row[f"{part}_tok_s"] / row[f"predicted_{part}_tok_s"]
            )
    out: dict = {"this_machine": device.__dict__}
    for part, prefix in (("decode", ""), ("prefill", "prefill_")):
        out[f"{prefix}overhead_ms_per_block"] = {
            f"{rt} {p}": 1e3 * f for (rt, p), (f, _) in lines[part].items()}  # fmt: skip
        out[f"{prefix}share_of_roofline"] = {
            f"{rt} {p}": share for (rt, p), (_, share) in lines[part].items()}  # fmt: skip
    return {**out, "within_goal": within_goal(rows)}


def predict_again(path: Path) -> None:
    """Predict a stored run's rows again from its own measurements and machine."""
    from slmlab import zoo

    stored = json.loads(path.read_text())
    machine = dict(stored["this_machine"])
    for field in ("cache_bandwidths", "int4_rates"):
        machine[field] = tuple(tuple(pair) for pair in machine[field])
    configs = [CONFIGS[r["model"]] if r["model"] in CONFIGS
               else ModelConfig.from_json(zoo.ensure(r["model"]) / "config.json")
               for r in stored["rows"]]  # fmt: skip
    fresh = predicted(stored["rows"], configs, Device(**machine))  # rows updated in place
    # the run's machine and date stay: only the predictions are new
    atomic_write_text(path, json.dumps({**stored, **fresh}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=[CALIBRATION, "stories-8m",
                                                         "base-76M", "smollm2-135m-instruct"])  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--llama-cpp-python", default=None, help="a Python with llama_cpp")
    parser.add_argument("--one", nargs=3, metavar=("RUNTIME", "PRECISION", "FILE"))
    parser.add_argument("--predict-again", action="store_true",
                        help="predict the stored run's rows again from its measurements")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7,
                        help="pairs of slmlab int4 and llama.cpp Q4_0 runs back to back")  # fmt: skip
    parser.add_argument("--paired-only", action="store_true",
                        help="measure only the pairs, and add them to the stored run")  # fmt: skip
    args = parser.parse_args()
    if args.predict_again:
        predict_again(RESULTS / "targets.json")
        return
    if args.paired_only:
        if args.llama_cpp_python is None:
            parser.error("--paired-only needs --llama-cpp-python")
        stored = json.loads((RESULTS / "targets.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            stored["int4_over_llama_cpp_q4_0_paired"] = paired_int4_over_q4_0(
                args.models, Path(tmp), args.new_tokens, args.llama_cpp_python, args.rounds
            )
        atomic_write_text(RESULTS / "targets.json", json.dumps(stored, indent=2) + "\n")
        return
    if args.one:
        print(json.dumps(run_one(*args.one, new_tokens=args.new_tokens)))
        return

    from slmlab import checkpoint

    rows, configs, machines, q4_k_bytes = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            ckpt = checkpoint_of(name, work)
            config = checkpoint.load(ckpt).config
            for runtime, precision in CASES:
                if runtime == "llama.cpp" and args.llama_cpp_python is None:
                    continue
                context = max(PROMPT, SHORT + args.new_tokens + 1)
                if runtime == "slmlab":
                    file = ckpt if precision == "fp32" else int4_checkpoint(ckpt, work)
                else:
                    file = export_file(ckpt, runtime, precision, work, context)
                machines.append(this_machine())
                got = measure(runtime, precision, file, args.new_tokens, args.llama_cpp_python)
                rows.append({
                    "model": name,
                    "runtime": runtime,
                    "precision": precision,
                    "file_mib": None if runtime == "slmlab" else file.stat().st_size / 2**20,
                    **got,
                    "bits_per_weight": stored_bits(file, config),
                    "bandwidth_gbs": machines[-1].bandwidth_gbs,
                })  # fmt: skip
                configs.append(config)
                if (runtime, precision) == ("llama.cpp", "q4_k"):
                    f32_file = export_file(ckpt, runtime, "f32", work, context)
                    q4_k_bytes[name] = q4_k_against_llama_quantize(
                        f32_file, file, args.llama_cpp_python
                    )
                    print(f"{name}: Q4_K against llama-quantize {q4_k_bytes[name]}", flush=True)
                print(
                    f"{name:24s} {runtime:12s} {precision:5s} decode {got['decode_tok_s']:7.1f} "
                    f"prefill {got['prefill_tok_s']:7.1f} peak {got['peak_rss_mib']:6.0f} MiB "
                    f"({machines[-1].bandwidth_gbs} GB/s)",
                    flush=True,
                )
        paired = {}
        if args.llama_cpp_python is not None and args.rounds > 0:
            paired = paired_int4_over_q4_0(
                args.models, work, args.new_tokens, args.llama_cpp_python, args.rounds
            )
    result = {
        "int4_over_llama_cpp_q4_0": int4_over_q4_0(rows),
        "int4_over_llama_cpp_q4_0_paired": paired,
        "q4_k_bytes_against_llama_quantize": q4_k_bytes,
        **predicted(rows, configs, typical(machines)),
        "new_tokens": args.new_tokens,
        "prompt_tokens": PROMPT,
        "rows": rows,
    }
    print(write("targets", result))


if __name__ == "__main__":
    main()

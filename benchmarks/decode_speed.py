"""Batch-1 greedy decoding: slmlab against transformers' generate on the same weights.

    python -m benchmarks.decode_speed [--new-tokens 128] [--threads N] [--no-real]

Decoding one token at a time reads every weight once per token, so its floor is
``weight bytes / read bandwidth``; whatever a framework spends above that is per-token overhead
(Python, dispatch, allocation). Both are reported, with the bandwidth measured in the same run.

Two random-weight models show the two regimes; the zoo's real SmolLM2-135M-Instruct (fetched on
first use) is measured in fp32 and in int4 (group 32, asymmetric: the grid its Q4_1 file came
in), beside transformers on the same checkpoint, with the time to first token of a 512-token
prompt and the first `generate` of a fresh process (import, load, first call, warm call).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

import slmlab
from benchmarks.common import best_time, write
from slmlab.devices import read_bandwidth_gbs
from slmlab.models import DecoderLM, ModelConfig

CONFIGS = {
    # ~3M parameters: overhead-bound, shows what the framework costs per token.
    "tiny-3M": ModelConfig(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=6,
        max_position_embeddings=1024,
    ),
    # ~77M parameters (width 768, 12 layers): bandwidth-bound.
    "base-76M": ModelConfig(
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
    ),
}


def weight_bytes_per_token(model: DecoderLM) -> int:
    """Bytes of weights a decode step reads: every matrix, plus one embedding row."""
    total = 0
    for name, p in model.named_parameters():
        total += p[0].nbytes if name.endswith("embed_tokens.weight") else p.nbytes
    if model.config.tie_word_embeddings:  # the head reads the whole (shared) embedding
        total += model.lm_head.weight.nbytes
    return total


def measure(config: ModelConfig, args: argparse.Namespace, bandwidth: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens
    row: dict[str, float] = {"params": model.num_parameters()}
    ours = best_time(lambda: slmlab.generate(model, prompt, n, stop_tokens=()))
    row["slmlab_tok_s"] = n / ours
    if not args.skip_transformers:
        import tempfile

        import transformers

        with tempfile.TemporaryDirectory() as folder:
            slmlab.save(model, folder)
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        theirs = best_time(
            lambda: hf.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        )
        row["transformers_tok_s"] = n / theirs
        row["speedup_vs_transformers"] = theirs / ours
    traffic = weight_bytes_per_token(model)
    row["weight_mb_per_token"] = traffic / 1e6
    row["weight_time_ms"] = traffic / (bandwidth * 1e9) * 1e3
    row["slmlab_ms_per_token"] = ours / n * 1e3
    row["slmlab_overhead_ms"] = row["slmlab_ms_per_token"] - row["weight_time_ms"]
    row["roofline_tok_s"] = 1e3 / row["weight_time_ms"]
    row["fraction_of_roofline"] = row["slmlab_tok_s"] / row["roofline_tok_s"]
    return row


REAL = "smollm2-135m-instruct"

# Run in a fresh interpreter: what a reader waits for on the first `generate` of a session.
FIRST_CALL = """
import json, sys, time
t0 = time.perf_counter()
import slmlab
t1 = time.perf_counter()
model = slmlab.load(sys.argv[1])
t2 = time.perf_counter()
prompt = [list(range(100, 116))]
slmlab.generate(model, prompt, 16, stop_tokens=())
t3 = time.perf_counter()
slmlab.generate(model, prompt, 16, stop_tokens=())
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_generate_s": t3 - t2,
                  "warm_generate_s": t4 - t3}))
"""


def first_call(path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", FIRST_CALL, path], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_real(args: argparse.Namespace, bandwidth: float) -> dict[str, dict[str, float]]:
    """The zoo's SmolLM2-135M-Instruct: fp32 and int4 decoding beside transformers, time to
    first token of a 512-token prompt, and a fresh process's first call."""
    import transformers

    from slmlab import zoo
    from slmlab.data import corpus_texts
    from slmlab.quant import QuantConfig, quantize_

    path = str(zoo.ensure(REAL))
    tokenizer = slmlab.load_tokenizer(path)
    text = "\n\n".join(corpus_texts("python-docs", "validation"))
    long_prompt = torch.tensor([tokenizer.encode(text).ids[:512]])
    prompt = long_prompt[:, : args.prompt_tokens]
    n = args.new_tokens
    fp32 = zoo.load(REAL)
    int4 = quantize_(copy.deepcopy(fp32), QuantConfig(bits=4, group_size=32, symmetric=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def hf_generate(ids: torch.Tensor, new: int) -> None:
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)

    rows: dict[str, dict[str, float]] = {}
    theirs = best_time(lambda: hf_generate(prompt, n))
    theirs_ttft = best_time(lambda: hf_generate(long_prompt, 1))
    for label, model in (("fp32", fp32), ("int4 g32", int4)):
        ours = best_time(lambda m=model: slmlab.generate(m, prompt, n, stop_tokens=()))
        ttft = best_time(lambda m=model: slmlab.generate(m, long_prompt, 1, stop_tokens=()))
        rows[f"{REAL} {label}"] = {
            "params": fp32.num_parameters(),
            "slmlab_tok_s": n / ours,
            "transformers_fp32_tok_s": n / theirs,
            "speedup_vs_transformers_fp32": theirs / ours,
            "ttft_512_ms": ttft * 1e3,
            "transformers_fp32_ttft_512_ms": theirs_ttft * 1e3,
        }
    rows[f"{REAL} int4 g32"]["speedup_vs_slmlab_fp32"] = (
        rows[f"{REAL} int4 g32"]["slmlab_tok_s"] / rows[f"{REAL} fp32"]["slmlab_tok_s"]
    )
    traffic = weight_bytes_per_token(fp32)
    rows[f"{REAL} fp32"]["weight_time_ms"] = traffic / (bandwidth * 1e9) * 1e3
    rows[f"{REAL} fp32"]["fraction_of_roofline"] = (
        rows[f"{REAL} fp32"]["slmlab_tok_s"] * rows[f"{REAL} fp32"]["weight_time_ms"] / 1e3
    )
    rows[f"{REAL} fp32"]["first_call"] = first_call(path)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--no-real", action="store_true", help=f"skip the zoo's {REAL}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth {bandwidth:.1f} GB/s, {args.threads} threads")
    results = {}
    for name, config in CONFIGS.items():
        results[name] = measure(config, args, bandwidth)
        print(name, {k: round(v, 3) for k, v in results[name].items()})
    if not args.no_real:
        t0 = time.perf_counter()
        for name, row in measure_real(args, bandwidth).items():
            results[name] = row
            print(name, row)
        print(f"real model measured in {time.perf_counter() - t0:.0f} s")
    path = write(
        "decode_speed",
        {
            "bandwidth_gbs": bandwidth,
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "models": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

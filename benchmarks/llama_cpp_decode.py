"""llama.cpp's batch-1 speed on one GGUF file, through llama-cpp-python: one JSON line.

    PYTHON benchmarks/llama_cpp_decode.py FILE --prompt-tokens 128 --new-tokens 128 --threads 2

Run by `benchmarks/targets.py` with the interpreter given to its ``--llama-cpp-python``: an
environment of its own with llama-cpp-python built from source (``pip install --no-binary
llama-cpp-python llama-cpp-python``, about ten minutes on two cores), since its wheels are not
built for every machine. Needs nothing else: no slmlab, no torch.

On a Xeon with AMX in a virtual machine, llama-cpp-python 0.3.36 built for the native CPU
crashed in its AMX matrix product (``ggml_backend_amx_mul_mat``) on every 4- and 8-bit file,
the registry's SmolLM2 Q4_1 included. Built with AMX off and AVX-512 on (``--no-cache-dir``,
or pip reuses the first build)::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON
    -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux's VmHWM: unlike getrusage's ru_maxrss, it
    starts afresh at exec, so a child does not inherit its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from llama_cpp import Llama

    context = max(args.prompt_tokens, 16 + args.new_tokens + 1)
    llm = Llama(args.file, n_ctx=context, n_threads=args.threads, n_batch=512, verbose=False)
    prompt = [(17 * i + 5) % 600 + 10 for i in range(args.prompt_tokens)]  # as targets.py

    def timed(tokens: list[int], n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for count, _ in enumerate(llm.generate(tokens, top_k=1, temp=0.0), 1):
            if count == n:
                break
        return time.perf_counter() - start

    def best(tokens: list[int], n: int) -> float:
        """The best of two calls at least and of a second's calls (as `benchmarks.targets`
        times the other runtimes; this interpreter has no slmlab to import)."""
        times, started = [], time.perf_counter()
        while len(times) < 2 or time.perf_counter() - started < 1.0:
            times.append(timed(tokens, n))
        return min(times)

    timed(prompt[:16], 4)  # warm-up
    first = best(prompt, 1)
    short = best(prompt[:16], 1)
    long = best(prompt[:16], args.new_tokens + 1)
    print(
        json.dumps(
            {
                "decode_tok_s": args.new_tokens / (long - short),
                "prefill_tok_s": args.prompt_tokens / first,
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


if __name__ == "__main__":
    main()

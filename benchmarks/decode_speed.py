"""Batch-1 greedy decoding: slmlab against transformers' generate on the same weights.

    python -m benchmarks.decode_speed [--new-tokens 128] [--threads N]

Decoding one token at a time reads every weight once per token, so its floor is
``weight bytes / read bandwidth``; whatever a framework spends above that is per-token overhead
(Python, dispatch, allocation). Both are reported, with the bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch

import slmlab
from benchmarks.common import best_time, read_bandwidth_gbs, write
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth {bandwidth:.1f} GB/s, {args.threads} threads")
    results = {}
    for name, config in CONFIGS.items():
        results[name] = measure(config, args, bandwidth)
        print(name, {k: round(v, 3) for k, v in results[name].items()})
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

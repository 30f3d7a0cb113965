"""What pruning does to batch-1 decoding speed on this CPU: zeros against structure.

    python -m benchmarks.prune_speed [--models smollm2-135m-instruct,stories-8m] [--tokens 64]

For each model: the dense model; 50% unstructured zeros (Wanda); Wanda 2:4, as zeros in the
dense layers and packed (kept values and 2-bit positions, `slmlab.prune.pack_2to4_`, which the
CPU kernel multiplies without unpacking); and structured cuts that remove about half of the
blocks' work: half the MLP channels with a third of the key/value groups, or half of the
blocks. Each row's speed is the best of `--repeats` greedy runs of
`--tokens` tokens after a 16-token prompt, the rows measured in turn and the whole round
repeated (`--rounds`), so a slow moment of the machine hits every row alike; ratios are
against the dense model in the same run. Also the bytes of weights a decoded token reads,
whose ratio bounds a bandwidth-bound speed-up. Goals: 2:4 packed at least 1.4x faster decoding
than dense fp32; structured pruning to half the blocks' FLOPs at least 1.7x.
Writes benchmarks/results/prune_speed.json.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import write
from slmlab import checkpoint, zoo
from slmlab.devices import read_bandwidth_gbs
from slmlab.experiments.compare import decode_tokens_per_s
from slmlab.layers import Sparse24Linear
from slmlab.prune import PruneConfig, StructureConfig, pack_2to4_, prune_, prune_structure_
from slmlab.quant import calibration_tokens


def block_flops_per_token(model) -> int:
    """Multiply-adds of one token through the blocks' linear layers (the head excluded); a
    packed 2:4 layer does half of its dense count."""
    config = model.config
    attention = (
        config.hidden_size * (config.q_size + 2 * config.kv_size)
        + config.q_size * config.hidden_size
    )
    mlp = 3 * config.hidden_size * config.intermediate_size
    skipped = sum(
        m.in_features * m.out_features // 2
        for m in model.modules()
        if isinstance(m, Sparse24Linear)
    )
    return config.num_hidden_layers * (attention + mlp) - skipped


def weight_bytes_per_token(model) -> int:
    """Bytes of the linear layers' weights a decoded token reads: every block, and the head."""
    total = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Sparse24Linear):
            total += m.values.numel() * m.values.element_size() + m.positions.numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,stories-8m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result: dict = {"read_bandwidth_gbs": read_bandwidth_gbs(), "models": {}}
    for name in args.models.split(","):
        path = zoo.ensure(name, quick=False)
        dense, tokenizer = checkpoint.load(path), checkpoint.load_tokenizer(path)
        source = "python-docs" if "smollm" in name else "stories"
        calibration = calibration_tokens(tokenizer, source, rows=8, seq_len=256)
        kv = dense.config.num_key_value_heads
        variants = {"dense": dense}
        variants["50% zeros (Wanda)"] = prune_(
            copy.deepcopy(dense), PruneConfig("wanda", 0.5), calibration=calibration
        )
        two_four = prune_(
            copy.deepcopy(dense), PruneConfig("wanda", pattern="2:4"), calibration=calibration
        )
        variants["2:4 zeros (Wanda)"] = two_four
        variants["2:4 packed (Wanda)"] = copy.deepcopy(two_four)
        pack_2to4_(variants["2:4 packed (Wanda)"])
        cut = copy.deepcopy(dense)
        prune_structure_(
            cut, StructureConfig(mlp=0.5, kv_groups=max(1, kv // 3)), calibration=calibration
        )
        variants[f"MLP 50%, {max(1, kv // 3)} of {kv} kv groups"] = cut
        half = copy.deepcopy(dense)
        prune_structure_(
            half,
            StructureConfig(layers=dense.config.num_hidden_layers // 2),
            calibration=calibration,
        )
        variants["half the blocks"] = half
        speeds: dict[str, float] = dict.fromkeys(variants, 0.0)
        for _ in range(args.rounds):
            for label, model in variants.items():
                speed = decode_tokens_per_s(model, args.tokens, repeats=args.repeats)
                speeds[label] = max(speeds[label], speed)
        rows = []
        base_flops = block_flops_per_token(dense)
        base_bytes = weight_bytes_per_token(dense)
        for label, model in variants.items():
            rows.append(
                {
                    "variant": label,
                    "parameters": model.num_parameters(),
                    "block_flops_share": block_flops_per_token(model) / base_flops,
                    "weight_bytes_share": weight_bytes_per_token(model) / base_bytes,
                    "decode_tokens_per_s": speeds[label],
                    "speedup": speeds[label] / speeds["dense"],
                }
            )
        goal = next(r for r in rows if r["variant"].startswith("MLP 50%"))
        packed = next(r for r in rows if r["variant"] == "2:4 packed (Wanda)")
        result["models"][name] = {
            "rows": rows,
            "goal: 2:4 packed >= 1.4x": packed["speedup"] >= 1.4,
            "goal: half the block FLOPs >= 1.7x": goal["speedup"] >= 1.7,
        }
        print(f"\n{name}")
        for r in rows:
            print(
                f"  {r['variant']:<34} {r['parameters'] / 1e6:7.2f}M  block FLOPs "
                f"{r['block_flops_share']:.2f}  weight bytes {r['weight_bytes_share']:.2f}  "
                f"{r['decode_tokens_per_s']:7.1f} tok/s  {r['speedup']:.2f}x"
            )
    print(write("prune_speed", result))


if __name__ == "__main__":
    main()

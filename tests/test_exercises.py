"""slmlab.exercises: every exercise's expected answers agree with an independent reference, the
library's own solution passes, and each plausible wrong answer is rejected with a paragraph a
student can act on (the failing case, its input, what was expected and a hint)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slmlab.exercises import EXERCISES, check, show


def _reference_rmsnorm(x, weight, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(weight.numel(), eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _reference_rope(x, positions, theta):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(positions.double(), inv)
    emb = torch.cat((angles, angles), -1)
    q, _ = apply_rotary_pos_emb(x.double(), x.double(), emb.cos()[None], emb.sin()[None])
    return q.float()


def _reference_rtn(w, group_size):
    out = torch.empty_like(w)
    for r in range(w.shape[0]):  # a loop over groups, as one would write it on paper
        for start in range(0, w.shape[1], group_size):
            group = w[r, start : start + group_size]
            scale = max(group.abs().max().item(), 1e-12) / 7
            out[r, start : start + group_size] = (group / scale).round().clamp(-7, 7) * scale
    return out


def _reference_lr(step, lr, min_lr, warmup, steps):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def _reference_perplexity(logprobs, mask):
    # as a loss would compute it: negative log-likelihood over the real tokens, then exp
    keep = mask.bool()
    return math.exp(
        F.nll_loss(logprobs[keep][:, None], torch.zeros(int(keep.sum()), dtype=torch.long)).item()
    )


def _reference_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    # Loshchilov and Hutter's algorithm 2, written out
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _reference_masked_loss(logits, targets):
    learnt = targets != -100
    logps = logits.log_softmax(-1)[learnt]
    return -logps.gather(-1, targets[learnt][:, None]).mean()


def _reference_nf4(w, block):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import get_4bit_type

    values = get_4bit_type("nf4", device="cpu")  # bitsandbytes' own table
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], block):
            group = w[r, start : start + block]
            scale = group.abs().max()
            nearest = (group[:, None] / scale - values).abs().argmin(-1)
            out[r, start : start + block] = values[nearest] * scale
    return out


def _reference_picks(loglikelihoods, choices):
    # lm-evaluation-harness: acc_norm divides by len(choice), characters of the continuation
    scores = range(len(choices))
    acc = max(scores, key=lambda i: loglikelihoods[i])
    acc_norm = max(scores, key=lambda i: loglikelihoods[i] / len(choices[i]))
    return acc, acc_norm


def _reference_merge(parts, pair):
    # a regular expression over the parts joined by a separator no part holds: non-overlapping
    # matches, left to right, each pair bounded by separators it does not consume
    import re

    sep = "\x00"
    joined = sep + sep.join(parts) + sep
    pattern = f"(?<={sep}){re.escape(pair[0])}{sep}{re.escape(pair[1])}(?={sep})"
    return re.sub(pattern, pair[0] + pair[1], joined).strip(sep).split(sep)


def _reference_attention(q, k, v):
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for t in range(length):
                scores = (k[b, kv, : t + 1] @ q[b, h, t]) / math.sqrt(dim)
                out[b, h, t] = scores.softmax(-1) @ v[b, kv, : t + 1]
    return out


def _reference_window(length, window):
    # transformers' own mask function for sliding layers, asked query by query, key by key
    from transformers.masking_utils import sliding_window_causal_mask_function

    visible = sliding_window_causal_mask_function(window)
    index = [torch.tensor(i) for i in range(length)]
    return torch.tensor([[bool(visible(0, 0, i, j)) for j in index] for i in index])


def _reference_routing(logits, k, normalize):
    # transformers' Qwen2-MoE router (norm_topk_prob as asked), its weight the identity so that
    # its logits are these
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    experts = logits.shape[-1]
    config = Qwen2MoeConfig(
        hidden_size=experts, num_experts=experts, num_experts_per_tok=k, norm_topk_prob=normalize
    )
    router = Qwen2MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        _, weights, chosen = router(logits)
    return chosen, weights


def _reference_ssd_step(state, x, dt, A, B, C):
    # transformers' Mamba-2 decoding step (Bamba's), each head its own group, no D
    from transformers.models.bamba.modeling_bamba import mamba2_selective_state_update

    h, p, n = state.shape
    state = state[None].clone()
    y = mamba2_selective_state_update(
        state, x[None], dt[None, :, None].expand(1, h, p), A[:, None, None].expand(h, p, n),
        B[None], C[None],
    )  # fmt: skip
    return y[0], state[0]


def _reference_param_count(config):
    # the model itself, built without memory, its parameters counted one tensor at a time
    from slmlab.models import DecoderLM

    with torch.device("meta"):
        return DecoderLM(config).num_parameters()


def _reference_kv_bytes(config, context, bytes_per_value):
    # the cache generation allocates, in a dtype of that width, measured
    from slmlab.infer import KVCache

    dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[bytes_per_value]
    return KVCache(config, 1, context, dtype=dtype).nbytes()


def _reference_residual(p, q):
    # Leviathan et al.'s rule, written as a loop over the vocabulary
    if torch.equal(p, q):
        return p
    residual = torch.tensor([max(0.0, float(a) - float(b)) for a, b in zip(p, q, strict=True)])
    return (residual / residual.sum()).to(p.dtype)


def _reference_pack(documents, seq_len, separator):
    # the stream cut with a slice per row, as one would on paper
    stream = []
    for doc in documents:
        stream += [*doc, separator]
    width = seq_len + 1
    rows = [stream[i : i + width] for i in range(0, len(stream), width)]
    return torch.tensor([r for r in rows if len(r) == width], dtype=torch.long)


def _reference_kd_loss(student, teacher, temperature):
    # PyTorch's KLDivLoss as Hinton et al.'s recipe uses it: batchmean, times T²
    t = temperature
    return t * t * F.kl_div(
        F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
        reduction="batchmean", log_target=True,
    ).item()  # fmt: skip


def _reference_gptq(weight, hessian):
    # Optimal Brain Quantization's update, derived again at every column: the free columns'
    # inverse Hessian recomputed from H itself, no Cholesky factor (Frantar et al. 2022, eq. 2)
    w = weight.clone()
    scale = w.abs().amax(1) / 7
    cols = w.shape[1]
    for j in range(cols):
        free = torch.arange(j, cols)
        inverse = torch.linalg.inv(hessian[free][:, free])
        q = (w[:, j] / scale).round().clamp(-7, 7) * scale
        error = (w[:, j] - q) / inverse[0, 0]
        w[:, j:] -= error[:, None] * inverse[0][None, :]
        w[:, j] = q
    return w


def _reference_wanda(weight, input_norms, sparsity):
    # Sun et al.'s Algorithm 1, one row at a time with a sort
    out = weight.clone()
    drop = round(sparsity * weight.shape[1])
    for r in range(weight.shape[0]):
        scores = weight[r].abs() * input_norms
        out[r, torch.sort(scores, stable=True).indices[:drop]] = 0.0
    return out


def _reference_q4_0(x):
    # llama.cpp's quantize_row_q4_0_ref and dequantize_row_q4_0 (ggml-quants.c), one block and
    # one value at a time, in float32 as C computes them
    import numpy as np

    values = x.numpy().astype(np.float32)
    out = np.empty_like(values)
    for start in range(0, len(values), 32):
        block = values[start : start + 32]
        amax, largest = np.float32(0), np.float32(0)
        for v in block:
            if abs(v) > amax:
                amax, largest = abs(v), v
        d = np.float32(largest / np.float32(-8))
        inverse = np.float32(1) / d if d else np.float32(0)
        stored = np.float32(np.float16(d))
        for i, v in enumerate(block):
            q = min(15, int(np.float32(v * inverse) + np.float32(8.5)))
            out[start + i] = np.float32(q - 8) * stored
    return torch.from_numpy(out)


def _reference_q4_k(block):
    # llama.cpp's get_scale_min_k4 and dequantize_row_q4_K (ggml-quants.c), one weight at a
    # time in float32
    import numpy as np

    raw = [int(b) for b in block]
    d, dmin = (np.float32(np.frombuffer(bytes(raw[i : i + 2]), np.float16)[0]) for i in (0, 2))
    scales, codes = raw[4:16], raw[16:]

    def scale_min(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))  # fmt: skip

    out = []
    for group in range(4):
        q = codes[32 * group : 32 * group + 32]
        for j, shift in ((2 * group, 0), (2 * group + 1, 4)):
            sc, m = scale_min(j)
            d1, m1 = np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(m))
            out += [np.float32(d1 * np.float32((v >> shift) & 0xF)) - m1 for v in q]
    return torch.tensor(np.array(out, np.float32))


def _reference_kv_step(q, k, v, cache_k, cache_v, length):
    # the cache written by hand, then transformers' own attention over what it holds
    from transformers.models.llama.modeling_llama import repeat_kv

    cache_k, cache_v = cache_k.clone(), cache_v.clone()
    cache_k[:, :, length], cache_v[:, :, length] = k[:, :, 0], v[:, :, 0]
    groups = q.shape[1] // k.shape[1]
    keys = repeat_kv(cache_k[:, :, : length + 1], groups)
    values = repeat_kv(cache_v[:, :, : length + 1], groups)
    out = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ values
    return out, cache_k, cache_v


def _reference_bits_per_char(token_nats, text):
    # a closed form: log2(e) bits in a nat, one character at a time
    return sum(float(x) for x in token_nats) * math.log2(math.e) / sum(1 for _ in text)


REFERENCES = {
    "01.param_count": _reference_param_count,
    "01.kv_cache_bytes": _reference_kv_bytes,
    "10.residual": _reference_residual,
    "03.sliding_window": _reference_window,
    "03.moe_routing": _reference_routing,
    "03.ssd_step": _reference_ssd_step,
    "02.bpe_merge": _reference_merge,
    "03.gqa_attention": _reference_attention,
    "05.adamw": _reference_adamw,
    "06.masked_loss": _reference_masked_loss,
    "08.nf4": _reference_nf4,
    "11.acc_norm": _reference_picks,
    "03.rmsnorm": _reference_rmsnorm,
    "03.rope": _reference_rope,
    "08.rtn": _reference_rtn,
    "05.lr": _reference_lr,
    "11.perplexity": _reference_perplexity,
    "00.bits_per_char": _reference_bits_per_char,
    "04.pack": _reference_pack,
    "07.kd_loss": _reference_kd_loss,
    "08.gptq": _reference_gptq,
    "09.wanda": _reference_wanda,
    "10b.q4_0": _reference_q4_0,
    "10b.q4_k": _reference_q4_k,
    "10.kv_step": _reference_kv_step,
}


def test_every_exercise_has_a_reference_and_wrong_answers() -> None:
    assert set(REFERENCES) == set(EXERCISES)
    assert all(len(e.wrong) >= 2 for e in EXERCISES.values())


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_expected_answers_match_an_independent_reference(name: str) -> None:
    exercise = EXERCISES[name]
    result = check(name, REFERENCES[name])
    assert result.passed, result.message
    assert len(list(exercise.cases())) >= 2


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_the_library_solution_passes(name: str) -> None:
    result = check(name, EXERCISES[name].expected)
    assert result.passed and "cases passed" in result.message


@pytest.mark.parametrize(
    ("name", "mistake"), [(n, w) for n, e in sorted(EXERCISES.items()) for w in e.wrong]
)
def test_a_plausible_wrong_answer_is_rejected(name: str, mistake: str) -> None:
    result = check(name, EXERCISES[name].wrong[mistake])
    assert not result.passed
    message = result.message
    assert message.startswith(f"{name}: ") and "\n" not in message
    assert "with input" in message and "is wrong:" in message and "Hint:" in message


def test_code_that_raises_gets_a_paragraph_not_a_traceback() -> None:
    def broken(w, group_size):
        return w.reshape(-1, group_size, 3)

    result = check("08.rtn", broken)
    assert not result.passed
    assert "raised RuntimeError" in result.message and "case 1" in result.message


def test_a_solution_that_writes_into_its_input_does_not_spoil_the_check() -> None:
    def in_place(x, weight, eps):
        return x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).mul_(weight)

    assert check("03.rmsnorm", in_place).passed


def test_unknown_exercise_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"03\.rmsnorm"):
        check("99.nothing", lambda: None)
    assert show("08.rtn").startswith("08.rtn: rtn_int4(w, group_size)")

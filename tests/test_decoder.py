"""Our decoder against transformers' logits, in both directions, for every variant."""

from __future__ import annotations

import pytest
import torch

import slmlab
from slmlab.models import DecoderLM
from slmlab.models.rope import inverse_frequencies

from .hf_reference import VARIANTS, hf_model, perturb_norms_and_biases, save_hf

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def tokens(config, batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(
        0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_theirs_to_ours_same_logits(name: str, tmp_path) -> None:
    config = VARIANTS[name]
    theirs = save_hf(config, tmp_path)
    ours = slmlab.load(tmp_path)
    ids = tokens(config)
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ours_to_theirs_same_logits(name: str, tmp_path) -> None:
    config = VARIANTS[name]
    torch.manual_seed(3)
    ours = DecoderLM(config).eval()
    perturb_norms_and_biases(ours)
    slmlab.save(ours, tmp_path / "ckpt")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = tokens(config)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL


def test_sharded_checkpoint_with_index(tmp_path) -> None:
    config = VARIANTS["llama-gqa-untied"]
    theirs = save_hf(config, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = slmlab.load(tmp_path)
    ids = tokens(config)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", 7]
)
def test_an_index_cannot_name_shards_outside_its_directory(tmp_path, shard) -> None:
    """A shared checkpoint's index is data: it must not open files elsewhere on the machine."""
    import json
    import shutil

    save_hf(VARIANTS["llama-gqa-untied"], tmp_path / "ckpt", max_shard_size="40KB")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    # A real shard beside the directory: only the check, not a missing file, can refuse it.
    shutil.copy(tmp_path / "ckpt" / data["weight_map"][first], tmp_path / "outside.safetensors")
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(slmlab.checkpoint.CheckpointError, match=r"index\.json: weight_map"):
        slmlab.load(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "name", ["llama-mqa-llama3-rope", "llama-linear-rope", "llama-mha-tied-theta"]
)
def test_rope_frequencies_match_transformers(name: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = VARIANTS[name]
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    rope_type = (config.rope_scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        expected = 1.0 / config.rope_theta ** (
            torch.arange(0, config.head_dim, 2).float() / config.head_dim
        )
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    torch.testing.assert_close(inverse_frequencies(config), expected.float(), rtol=1e-6, atol=0)


def test_padding_does_not_change_real_tokens() -> None:
    """A left-padded row gives the same logits at its real tokens as the unpadded row."""
    config = VARIANTS["llama-gqa-untied"]
    model = DecoderLM(config).eval()
    ids = tokens(config, batch=1, length=12)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask)[:, 5:], model(ids), rtol=0, atol=1e-5)


def test_parts_compose_like_the_whole() -> None:
    """The block is x + attn(norm(x)), then x + mlp(norm(x)): rebuild it from its parts."""
    config = VARIANTS["llama-gqa-untied"]
    model = DecoderLM(config).eval()
    ids = tokens(config, batch=1, length=9)
    block = model.model.layers[0]
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(torch.arange(9)[None], x.dtype)
        h = x + block.self_attn(block.input_layernorm(x), cos, sin, None)
        h = h + block.mlp(block.post_attention_layernorm(h))
        torch.testing.assert_close(block(x, cos, sin, None), h)


def test_positions_beyond_the_context_are_an_error() -> None:
    config = VARIANTS["llama-linear-rope"].replace(max_position_embeddings=16)
    with pytest.raises(ValueError, match="beyond max_position_embeddings"):
        DecoderLM(config)(torch.zeros(1, 17, dtype=torch.long))


def test_hf_reference_model_is_deterministic() -> None:
    a, b = hf_model(VARIANTS["qwen2-bias"], seed=5), hf_model(VARIANTS["qwen2-bias"], seed=5)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_attention_probs_reproduce_the_fused_output() -> None:
    """weights @ v, through o_proj, is what the fused SDPA path returns (GQA included)."""
    config = VARIANTS["llama-gqa-untied"]
    attn = DecoderLM(config).eval().model.layers[0].self_attn
    rotary = DecoderLM(config).model.rotary_emb
    x = torch.randn(2, 13, config.hidden_size)
    cos, sin = rotary(torch.arange(13).expand(2, 13), x.dtype)
    probs = attn.attention_probs(x, cos, sin)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, config.num_attention_heads, 13))
    assert torch.all(probs.triu(1) == 0)
    v = attn.v_proj(x).view(2, 13, config.num_key_value_heads, -1).transpose(1, 2)
    v = v.repeat_interleave(config.num_attention_heads // config.num_key_value_heads, dim=1)
    manual = attn.o_proj((probs @ v).transpose(1, 2).reshape(2, 13, -1))
    with torch.no_grad():
        torch.testing.assert_close(manual, attn(x, cos, sin, None), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_distance() -> None:
    """The defining property of RoPE: <R(m)q, R(n)k> is a function of m - n alone."""
    config = VARIANTS["llama-gqa-untied"]
    rotary = DecoderLM(config).model.rotary_emb
    from slmlab.models.rope import apply_rope

    q, k = torch.randn(config.head_dim), torch.randn(config.head_dim)
    cos, sin = rotary(torch.arange(40)[None], torch.float32)
    rq = apply_rope(q.expand(1, 1, 40, -1), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 40, -1), cos, sin)[0, 0]
    scores = rq @ rk.T
    for offset in (0, 3, 17):
        diagonal = torch.diagonal(scores, offset=-offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_marked_positions_skip_what_follows_each_row_with_the_same_logits_and_gradients(
    name: str, packed: bool
) -> None:
    """With `logits_at`, a training pass computes nothing after each row's last marked
    position: the per-token layers see the kept positions alone (plain attention models) and
    the logits and gradients are those of the whole rows'. Rows end at 19, 6 and nowhere;
    packed rows are checkpointed too (a block recomputed takes the kept positions again)."""
    config = VARIANTS[name]
    model = perturb_norms_and_biases(DecoderLM(config)).train()
    model.activation_checkpointing = packed
    ids = tokens(config, batch=3, length=20)
    marks = torch.zeros(3, 20, dtype=torch.bool)
    marks[0, [3, 11, 19]] = True
    marks[1, [2, 6]] = True
    segments = (torch.arange(20) >= 8).long().expand(3, 20) if packed else None
    seen: list[torch.Size] = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))

    def grads(logits: torch.Tensor) -> list[torch.Tensor]:
        loss = (logits * torch.linspace(-1, 1, logits.shape[-1])).sum()
        return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))

    picked = model(ids, segments=segments, logits_at=marks)
    hook.remove()
    whole = model(ids, segments=segments)[marks]
    torch.testing.assert_close(picked, whole, rtol=1e-5, atol=1e-5)
    for mine, reference in zip(grads(picked), grads(whole), strict=True):
        if reference is None:  # a part no marked position reaches (an unused expert)
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    plain = not (config.kv_lora_rank or any(config.linear_layers))
    # 20 + 7 positions kept, or the 20 columns up to the last mark of all three rows
    assert seen == [torch.Size([27, config.hidden_size]) if plain else (3, 20, config.hidden_size)]

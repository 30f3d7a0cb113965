"""The one layer swap: which layers it finds, that tied heads stay tied, that hooks keep firing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slmlab.layers import QuantEmbedding, quantize
from slmlab.models import (
    ATTENTION,
    LINEAR_TARGETS,
    DecoderLM,
    ModelConfig,
    linear_layers,
    replace_module,
    swap_linears,
)


def tiny(tied: bool) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return DecoderLM(config).eval()


class Doubled(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.linear(x)


def test_targets_name_llama_layers_and_skip_the_head() -> None:
    model = tiny(tied=False)
    names = [n for n, _ in linear_layers(model)]
    assert len(names) == 2 * len(LINEAR_TARGETS)
    assert all(n.rpartition(".")[2] in LINEAR_TARGETS for n in names)
    assert [n for n, _ in linear_layers(model, ["q_proj"])] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert "lm_head" in [n for n, _ in linear_layers(model, "all")]
    assert "lm_head" not in [n for n, _ in linear_layers(model, "all", skip=["lm_head"])]
    with pytest.raises(ValueError, match="its linear layers end in"):
        linear_layers(model, ["qkv"])


def test_swap_computes_with_the_new_layers_and_keeps_hooks_on_the_model() -> None:
    model = tiny(tied=False)
    ids = torch.randint(0, 64, (1, 8))
    seen = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        before = model(ids)
        swapped = swap_linears(model, lambda name, layer: Doubled(layer), ATTENTION)
        after = model(ids)
        o_proj = model.model.layers[1].self_attn.o_proj.linear
        # Only the layers named were swapped, and None keeps a layer.
        assert len(swapped) == 2 * len(ATTENTION)
        assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
        assert swap_linears(model, lambda name, layer: None, ["up_proj"]) == {}
    assert isinstance(o_proj, nn.Linear) and not torch.allclose(before, after)
    assert seen == [1, 1]  # the hook on the block fired in both passes


def test_replacing_the_embedding_keeps_a_tied_head_tied() -> None:
    model = tiny(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = nn.Embedding(64, 32)
    replace_module(model, "model.embed_tokens", table)
    assert model.lm_head.weight is table.weight
    quantized = QuantEmbedding(quantize(table.weight.detach(), "int", 8, group_size=None))
    replace_module(model, "model.embed_tokens", quantized)
    assert model.lm_head is quantized.linear  # the head reads the same codes
    untied = tiny(tied=False)
    head = untied.lm_head
    replace_module(untied, "model.embed_tokens", nn.Embedding(64, 32))
    assert untied.lm_head is head


def test_a_swapped_in_layer_the_fused_step_does_not_know_decodes_through_its_forward() -> None:
    import slmlab
    from slmlab import kernels

    model = tiny(tied=True)
    swap_linears(model, lambda name, layer: Doubled(layer), ["o_proj", "down_proj"])
    prompts = [[3, 4, 5, 6], [7]]
    fast = slmlab.generate(model, prompts, 12, stop_tokens=())
    with kernels.disabled():
        assert slmlab.generate(model, prompts, 12, stop_tokens=()) == fast

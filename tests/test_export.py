"""Export: every target's file runs in that target's own runtime with the model's numbers.

GGUF is read back by slmlab's reader and by transformers' GGUF loader (its own reader and
dequantization); ONNX runs in ONNX Runtime; the ExecuTorch program in ExecuTorch's runtime.
Each is compared with the slmlab model it came from: logits, and greedy tokens through the
runtime's own KV cache."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import slmlab
from slmlab.checkpoint import save
from slmlab.cli import main
from slmlab.export import ExportError, OnnxDecoder, to_gguf, to_onnx
from slmlab.gguf_file import read_gguf, read_gguf_metadata
from slmlab.infer import generate
from slmlab.layers.lora import LoraConfig, apply_lora_
from slmlab.models import DecoderLM, ModelConfig

gguf = pytest.importorskip("gguf")

CHAT = {
    "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    "eos_token": "<|endoftext|>",
}


def tiny(tokenizer, **changes) -> DecoderLM:
    """A random model over `tokenizer` whose matrix rows are whole 32-weight blocks, with norms
    and biases moved off their initial values so that a lost one shows, and queries and keys
    large enough that attention is sharp (uniform attention would hide a wrong RoPE order)."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )  # fmt: skip
    model = DecoderLM(ModelConfig(**{**fields, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, story_tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = json.dumps({**CHAT, "tokenizer_class": "PreTrainedTokenizerFast"}).encode()
    save(
        tiny(story_tokenizer), path, story_tokenizer, extra_files={"tokenizer_config.json": config}
    )
    return path


IDS = torch.tensor([[5, 17, 33, 200, 7, 9, 100, 3, 250, 42, 11, 60]])


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_metadata_and_types_read_back_as_written(tmp_path, checkpoint, quant) -> None:
    path = to_gguf(checkpoint, tmp_path / "m.gguf", quant=quant, name="tiny")
    meta = read_gguf_metadata(path)
    config = slmlab.load(checkpoint).config
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    expected = {
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.context_length": config.max_position_embeddings,
        "llama.rope.dimension_count": config.head_dim,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": config.eos_token_id,
        "tokenizer.chat_template": CHAT["chat_template"],
        "general.file_type": int(gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])
        if quant != "f32"
        else int(gguf.LlamaFileType.ALL_F32),
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    types = read_gguf(path).tensor_types
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {quant.upper()}
    assert "lm_head.weight" not in types  # tied: llama.cpp reads the embedding for the head


def test_f32_gguf_is_the_model_exactly(tmp_path, checkpoint) -> None:
    path = to_gguf(checkpoint, tmp_path / "m.gguf")
    ours, back = slmlab.load(checkpoint), slmlab.load(path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(back(IDS), ours(IDS))
    text = "Once upon a time, Mia found 3 red kites.<|endoftext|>"
    original = slmlab.load_tokenizer(checkpoint).encode(text).ids
    assert slmlab.load_tokenizer(path).encode(text).ids == original


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0"])
def test_gguf_logits_equal_transformers_gguf_loader(tmp_path, checkpoint, quant) -> None:
    transformers = pytest.importorskip("transformers")
    to_gguf(checkpoint, tmp_path / "m.gguf", quant=quant)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    ours = slmlab.load(tmp_path / "m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=0, atol=1e-4)
        if quant == "q8_0":  # rounding moved the logits, a little
            gap = (ours(IDS) - slmlab.load(checkpoint)(IDS)).abs().max()
            assert 0 < gap < 0.05
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Mia and her dog went to the park. They found a shell!"
    assert tokenizer.encode(text) == slmlab.load_tokenizer(checkpoint).encode(text).ids


def test_q4_k_gguf_is_read_by_transformers_as_slmlab_reads_it(tmp_path, story_tokenizer) -> None:
    """A model 256 wide has every matrix in Q4_K's super-blocks, each nearer the model's than
    Q4_0 (the same 4.5 bits a weight) puts it; one 64 wide has none, so its matrices fall back
    to Q5_0 as llama-quantize's do."""
    transformers = pytest.importorskip("transformers")
    wide = tiny(story_tokenizer, hidden_size=256, intermediate_size=512)
    path = to_gguf(wide, tmp_path / "wide.gguf", quant="q4_k", tokenizer=story_tokenizer)
    types = read_gguf(path).tensor_types
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"Q4_K"}
    meta = read_gguf_metadata(path)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="wide.gguf", dtype=torch.float32
    ).eval()
    ours = slmlab.load(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=0, atol=1e-4)
    q4_0 = slmlab.load(to_gguf(wide, tmp_path / "q4_0.gguf", quant="q4_0",
                               tokenizer=story_tokenizer)).state_dict()  # fmt: skip
    for name, weight in wide.state_dict().items():
        if weight.ndim == 2:
            error = (ours.state_dict()[name] - weight).square().mean()
            assert 0 < error < 0.8 * (q4_0[name] - weight).square().mean(), name
    narrow = to_gguf(tiny(story_tokenizer), tmp_path / "n.gguf", quant="q4_k",
                     tokenizer=story_tokenizer)  # fmt: skip
    types = read_gguf(narrow).tensor_types
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"Q5_0"}


def test_qwen2_gguf_keeps_its_biases(tmp_path, story_tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny(story_tokenizer, model_type="qwen2", attention_bias=True)
    to_gguf(model, tmp_path / "q.gguf", tokenizer=story_tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="q.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), theirs(IDS).logits, rtol=0, atol=1e-4)
        assert torch.equal(slmlab.load(tmp_path / "q.gguf")(IDS), model(IDS))


def test_layers_and_options_a_target_lacks_are_refused_by_name(
    tmp_path, story_tokenizer, checkpoint
) -> None:
    adapted = apply_lora_(tiny(story_tokenizer), LoraConfig(r=4, targets=("v_proj",)))
    with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.v_proj.*LoRALinear.*GGUF.*merge"):
        to_gguf(adapted, tmp_path / "m.gguf", tokenizer=story_tokenizer)
    with pytest.raises(ExportError, match=r"v_proj.*ONNX"):
        to_onnx(adapted, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"'q3_k'.*q4_0"):
        to_gguf(checkpoint, tmp_path / "m.gguf", quant="q3_k")
    scaled = tiny(story_tokenizer, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ExportError, match="rope_scaling"):
        to_gguf(scaled, tmp_path / "m.gguf", tokenizer=story_tokenizer)
    hooked = tiny(story_tokenizer)
    hooked.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ExportError, match=r"layers\.1\.mlp\.up_proj.*hook"):
        to_onnx(hooked, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left


def test_a_tokenizer_gguf_cannot_describe_is_refused_and_nothing_written(
    tmp_path, story_tokenizer
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match=r"WordLevel.*byte-level BPE"):
        to_gguf(tiny(story_tokenizer), tmp_path / "m.gguf", tokenizer=words)
    odd = Tokenizer.from_str(story_tokenizer.to_str())
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match=r"pre_tokenizer.*llama\.cpp"):
        to_gguf(tiny(story_tokenizer), tmp_path / "m.gguf", tokenizer=odd)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, checkpoint):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return to_onnx(checkpoint, tmp_path_factory.mktemp("onnx") / "m.onnx")


def test_onnx_logits_equal_the_model_with_padding_and_cache(onnx_file, checkpoint) -> None:
    model, runner = slmlab.load(checkpoint), OnnxDecoder(onnx_file)
    ids = torch.cat((IDS, IDS.flip(1)))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second row left-padded
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
    got = runner.logits(ids, mask)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1, 4:], expected[1, 4:], rtol=0, atol=1e-4)
    # The cache ONNX Runtime hands back continues the sequence as the whole sequence would.
    first, past = runner._run(IDS[:, :5].numpy(), runner.empty_cache())
    rest, _ = runner._run(IDS[:, 5:].numpy(), past)
    np.testing.assert_allclose(np.concatenate((first, rest), 1), expected[:1].numpy(), atol=1e-4)


def test_onnx_greedy_tokens_and_scores_equal_slmlab(onnx_file, checkpoint) -> None:
    from slmlab.eval import token_bits

    model, runner = slmlab.load(checkpoint), OnnxDecoder(onnx_file)
    expected = generate(model, IDS, 24)[0, IDS.shape[1] :].tolist()
    assert runner.generate(IDS[0].tolist(), 24) == expected
    ids = torch.randint(0, model.config.vocab_size, (150,)).tolist()  # past the context: windows
    torch.testing.assert_close(
        token_bits(runner, ids, context=64, stride=32),
        token_bits(model, ids, context=64, stride=32),
        rtol=0,
        atol=1e-4,
    )


def test_onnx_int8_stores_int8_weights_and_stays_close(tmp_path, onnx_file, checkpoint) -> None:
    onnx = pytest.importorskip("onnx")
    path = to_onnx(checkpoint, tmp_path / "m8.onnx", quant="int8")
    graph = onnx.load(path).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops  # int8 products
    int8 = sum(
        int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
    )
    blocks = slmlab.load(checkpoint).model.layers
    assert int8 >= sum(p.numel() for n, p in blocks.named_parameters() if n.endswith("proj.weight"))
    got, full = OnnxDecoder(path).logits(IDS), OnnxDecoder(onnx_file).logits(IDS)
    assert 0 < (got - full).abs().max() < 0.1 * full.abs().max()


def test_executorch_program_matches_the_model(tmp_path, checkpoint) -> None:
    pytest.importorskip("executorch")
    from slmlab.export import ExecuTorchDecoder, to_executorch

    path = to_executorch(checkpoint, tmp_path / "m.pte", context=48)
    runner, model = ExecuTorchDecoder(path), slmlab.load(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(runner.logits(IDS), model(IDS)[:, -1:], rtol=0, atol=1e-4)
    expected = generate(model, IDS, 16)[0, IDS.shape[1] :].tolist()
    assert runner.generate(IDS[0].tolist(), 16) == expected


def test_cli_exports_and_names_a_bad_quant(tmp_path, checkpoint, capsys) -> None:
    assert main(["export", str(checkpoint), "--to", "gguf", "--quant", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0  # fmt: skip
    assert (
        read_gguf(tmp_path / "m.gguf").tensor_types["model.layers.0.mlp.up_proj.weight"] == "Q8_0"
    )
    with pytest.raises(SystemExit):
        main(["export", str(checkpoint), "--to", "onnx", "--quant", "q4_0", "--out", "x.onnx"])
    assert "onnx takes one of ['fp32', 'int8']" in capsys.readouterr().err


def test_merged_lora_exports(tmp_path, story_tokenizer) -> None:
    from slmlab.layers.lora import merge_lora_

    model = apply_lora_(tiny(story_tokenizer), LoraConfig(r=4))
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    merged = merge_lora_(copy.deepcopy(model))
    to_gguf(merged, tmp_path / "m.gguf", tokenizer=story_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(slmlab.load(tmp_path / "m.gguf")(IDS), model(IDS))


@pytest.mark.parametrize(("quant", "atol"), [("f32", 1e-3), ("q8_0", 0.05)])
def test_llama_cpp_itself_continues_as_slmlab_does(tmp_path, checkpoint, quant, atol) -> None:
    """llama.cpp (its WebAssembly build, in Chromium) reads the exported file, tokenizes the
    prompt and decodes greedily: the same tokens as slmlab's greedy decoding, and the same
    log-probabilities of the likeliest tokens at every step. The reference is the model that
    was exported (f32), or the file as slmlab reads it (q8_0, whose products llama.cpp runs
    with activations rounded to 8 bits too: hence the looser tolerance)."""
    from tests.browser import llama_cpp_complete, skip_reason

    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    path = to_gguf(checkpoint, tmp_path / f"tiny-{quant}.gguf", quant=quant)
    prompt = "Once upon a time, Mia"
    ids = slmlab.load_tokenizer(path).encode(prompt).ids
    model = slmlab.load(checkpoint if quant == "f32" else path)
    out = generate(model, torch.tensor([ids]), 12)[0].tolist()
    with torch.no_grad():
        logprobs = model(torch.tensor([out])).log_softmax(-1)[0, len(ids) - 1 : -1]
    steps = llama_cpp_complete(path, prompt, 12, logprobs=3)["logprobs"]["content"]
    assert [step["id"] for step in steps] == out[len(ids) :]
    for step, expected in zip(steps, logprobs, strict=True):
        for top in step["top_logprobs"]:
            assert top["logprob"] == pytest.approx(float(expected[top["id"]]), abs=atol)

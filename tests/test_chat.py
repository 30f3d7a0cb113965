"""Chat: the template rendered as transformers renders it, in a sandbox; replies that stream."""

from __future__ import annotations

import io

import pytest
import torch

import slmlab
from slmlab.checkpoint import load_chat_settings
from slmlab.cli import main
from slmlab.infer import Chat, ChatTemplateError, render_chat
from tests.test_gguf import CONFIG, SPECIALS, write_gguf

# SmolLM2-135M-Instruct's template (Apache-2.0), as its GGUF file carries it.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A template in the style of Llama 3's: whitespace control, loop controls, raise_exception, tojson.
FANCY = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}\n"
    "  {% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n"
    "  <{{ m['role'] }}>{{ m['content'] | tojson }}</{{ m['role'] }}>{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, naïve café 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "tool", "content": "ignored"},
        {"role": "user", "content": 'Say "yes".'},
    ],
]


@pytest.mark.parametrize("template", [SMOLLM2, FANCY], ids=["smollm2", "fancy"])
@pytest.mark.parametrize("generation", [True, False])
def test_render_equals_transformers_apply_chat_template(template, generation) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()), chat_template=template,
        bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
        got = render_chat(
            template, messages, add_generation_prompt=generation, bos_token="<s>", eos_token="</s>"
        )
        assert got == expected


@pytest.mark.parametrize(
    "escape",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.append(1) }}",  # the immutable sandbox: no changing the caller's data
    ],
)
def test_a_template_cannot_leave_the_sandbox(escape) -> None:
    with pytest.raises(ChatTemplateError, match="cannot render the chat template: SecurityError"):
        render_chat(escape, [{"role": "user", "content": "x"}])


def test_a_template_can_refuse_messages() -> None:
    with pytest.raises(ChatTemplateError, match="refused the messages: unknown role robot"):
        render_chat(FANCY, [{"role": "robot", "content": "x"}], bos_token="", eos_token="")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from slmlab.data import stories
    from slmlab.models import DecoderLM
    from slmlab.tokenizers import train_bpe

    tokenizer = train_bpe(stories(300, seed=5), CONFIG.vocab_size, special_tokens=SPECIALS).to_hf()
    torch.manual_seed(0)  # an untied random model: a tied one repeats the prompt's last token
    folder = tmp_path_factory.mktemp("chat")
    model = DecoderLM(CONFIG.replace(tie_word_embeddings=False)).eval()
    with torch.no_grad():  # no single bytes or specials: replies of whole (story) words
        model.lm_head.weight[:259] = 0
    return write_gguf(folder / "chat.gguf", model, tokenizer)


def test_chat_replies_what_greedy_generation_gives_and_streams_it(chat_model) -> None:
    model, tokenizer = slmlab.load(chat_model), slmlab.load_tokenizer(chat_model)
    settings = load_chat_settings(chat_model)
    assert settings["eos_token"] == "<|im_end|>"
    chat = Chat(model, tokenizer, settings, system="Be brief.")
    pieces: list[str] = []
    reply = chat.say("Once upon a time", max_new_tokens=12, stream=pieces.append)
    prompt = "<|im_start|>Be brief.<|im_end|><|im_start|>Once upon a time<|im_end|>"
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    expected = slmlab.generate(model, [ids], 12, temperature=0.0)[0][len(ids) :]
    assert reply == tokenizer.decode(expected) and "".join(pieces) == reply and len(pieces) == 12
    assert [m["role"] for m in chat.history] == ["system", "user", "assistant"]
    chat.say("and then", max_new_tokens=4)
    assert [m["role"] for m in chat.history][-2:] == ["user", "assistant"]


def test_slmlab_chat_takes_one_turn_a_line_when_piped(chat_model, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n\nand then\n"))
    assert main(["chat", str(chat_model), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    chat = Chat(
        slmlab.load(chat_model), slmlab.load_tokenizer(chat_model), load_chat_settings(chat_model)
    )
    assert lines == [
        chat.say("Once upon a time", max_new_tokens=6),
        chat.say("and then", max_new_tokens=6),
    ]
    assert (
        main(
            [
                "generate",
                str(chat_model),
                "--chat",
                "--prompt",
                "Once upon a time",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    # The same prompt, specials dropped when printed: the user's turn, then the same reply.
    assert capsys.readouterr().out == "Once upon a time" + lines[0] + "\n"


def test_a_model_without_a_template_is_not_a_chat_model(tmp_path) -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Chat(slmlab.models.DecoderLM(CONFIG), slmlab.tokenizers.train_bpe(["a b"], 260), {})

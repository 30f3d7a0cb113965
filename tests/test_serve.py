"""`slmlab serve`: OpenAI's own client talks to it. Temperature 0 gives `slmlab.generate`'s
tokens; streamed text equals the whole text; stop sequences, max_tokens and n behave as the API
says; bad requests get a 4xx with OpenAI's error object; a client that leaves frees its row."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

import slmlab
from slmlab.infer import render_chat
from slmlab.models import DecoderLM, ModelConfig

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def served():
    """A tiny model with a byte-level BPE tokenizer and a ChatML template, served on a free
    port of 127.0.0.1 for the module's tests."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from slmlab.serve import BackgroundServer, create_app

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["once upon a time there was a small cat that liked to sing"] * 20,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.add_special_tokens([AddedToken("<|im_start|>"), AddedToken("<|im_end|>")])
    end = tok.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=end,
    )
    model = DecoderLM(config, init_std=0.1).eval()
    settings = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    app = create_app(model, tok, settings, name="tiny", max_batch=4, max_queue=4)
    server = BackgroundServer(app)
    yield {"model": model, "tokenizer": tok, "app": app, "base": server.url, "end": end}
    server.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["base"], api_key="unused", max_retries=0)


def greedy_text(served, ids: list[int], n: int) -> tuple[str, list[int]]:
    out = slmlab.generate(served["model"], ids, n, stop_tokens=served["end"])[0][len(ids) :]
    return served["tokenizer"].decode(out, skip_special_tokens=True), out


def test_models_and_greedy_completion_equal_generate(served, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    got = client.completions.create(model="tiny", prompt="once upon", max_tokens=12, temperature=0)
    ids = served["tokenizer"].encode("once upon").ids
    text, tokens = greedy_text(served, ids, 12)
    assert got.choices[0].text == text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(tokens)
    assert got.choices[0].finish_reason == ("stop" if served["end"] in tokens else "length")


def test_chat_plain_and_streamed(served, client) -> None:
    messages = [{"role": "user", "content": "a small cat"}]
    got = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0
    )
    rendered = render_chat(CHATML, messages, add_generation_prompt=True)
    ids = served["tokenizer"].encode(rendered, add_special_tokens=False).ids
    assert got.choices[0].message.content == greedy_text(served, ids, 20)[0]
    assert got.choices[0].message.role == "assistant"
    pieces = []
    reasons = []
    for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == got.choices[0].message.content
    assert reasons[-1] == got.choices[0].finish_reason and set(reasons[:-1]) == {None}
    *_, last = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert last.choices == [] and last.usage.completion_tokens == got.usage.completion_tokens


def test_stop_sequences_max_tokens_and_n(served, client) -> None:
    full = client.completions.create(model="tiny", prompt="once", max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert len(text) > 6
    stop = text[3:5]
    cut = client.completions.create(
        model="tiny", prompt="once", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="once", max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut.choices[0].text
    short = client.completions.create(model="tiny", prompt="once", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3
    three = client.completions.create(
        model="tiny", prompt="once", max_tokens=8, temperature=1.0, n=3, seed=5
    )
    again = client.completions.create(
        model="tiny", prompt="once", max_tokens=8, temperature=1.0, n=3, seed=5
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == [c.text for c in again.choices]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": "tiny", "prompt": 7}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "n": 99}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "stop": [1]}, 400, "stop"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "once " * 200}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}}, 400, None),
        ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(served, body, status, param) -> None:
    path = "/chat/completions" if "messages" in body else "/completions"
    reply = httpx.post(served["base"] + path, json=body, timeout=10)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_malformed_json_and_a_client_that_leaves(served) -> None:
    reply = httpx.post(
        served["base"] + "/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    engine = served["app"].state.engine
    body = {"model": "tiny", "prompt": "once", "max_tokens": 100, "temperature": 1, "stream": True}
    with httpx.stream("POST", served["base"] + "/completions", json=body, timeout=10) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                break  # one chunk, then the client goes away
    deadline = time.time() + 10
    while (engine.batcher.running or engine.outstanding) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.batcher.running == 0 and engine.outstanding == 0


def test_a_full_queue_answers_429(served) -> None:
    """max_batch 4 + max_queue 4: of 16 requests sent at once, each is answered or refused with
    429, and at least one is refused."""
    body = {"model": "tiny", "prompt": "once", "max_tokens": 120, "temperature": 1}
    codes: list[int] = []

    def send() -> None:
        codes.append(httpx.post(served["base"] + "/completions", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=send) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_the_command_serves_until_interrupted(served, tmp_path, stop) -> None:
    """`slmlab serve CHECKPOINT --port N` (the engine on the main thread): it answers as the
    library does, and Ctrl-C or `kill` stops it cleanly, also when it was started as a
    shell's background job is, with SIGINT ignored."""
    import os
    import signal
    import subprocess
    import sys

    path = slmlab.save(served["model"], tmp_path / "ckpt", tokenizer=served["tokenizer"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Output to files, not pipes: a pipe nobody reads until the end can fill and block the
    # server. PYTHONFAULTHANDLER: if it hangs, SIGABRT makes it print every thread's stack.
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        command = ["serve", str(path), "--port", str(port), "--name", "t"]
        process = subprocess.Popen(
            [sys.executable, "-m", "slmlab", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120  # the first run may compile the CPU kernels
        while True:
            try:
                assert httpx.get(base + "/models", timeout=1).json()["data"][0]["id"] == "t"
                break
            except httpx.TransportError:
                assert process.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.2)
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        got = client.completions.create(model="t", prompt="once upon", max_tokens=10, temperature=0)
        ids = served["tokenizer"].encode("once upon").ids
        assert got.choices[0].text == greedy_text(served, ids, 10)[0]
    finally:
        process.send_signal(getattr(signal, stop))
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # the stacks of every thread, into the log
            process.wait(timeout=30)
            pytest.fail(f"slmlab serve still running 30 s after {stop}:\n{log.read_text()}")
    assert code == 0, log.read_text()

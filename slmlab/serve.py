"""An OpenAI-compatible HTTP server: ``slmlab serve MODEL --port N``.

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the model's own
chat template applied), plain or streamed as server-sent events, in the shapes of OpenAI's API,
so that its clients (the ``openai`` package, and the tools built on it) talk to a small model
on this machine. Requests run together through `slmlab.infer.ContinuousBatcher`, on one engine
thread that owns the model; the ASGI app (Starlette, under uvicorn) only queues and streams.

A bad request gets a 4xx with OpenAI's error object (``{"error": {"message", "type", "param",
"code"}}``), never a traceback; a full queue gets 429; a client that goes away mid-stream
frees its row. The server binds 127.0.0.1 unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import math
import queue
import socket
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .infer import BatchRequest, ContinuousBatcher, render_chat
from .infer.chat import ChatTemplateError
from .models import DecoderLM
from .tokenizers import as_hf_tokenizer

__all__ = ["BackgroundServer", "Engine", "RequestError", "create_app"]

MAX_N = 16  # completions per request
MAX_STOPS = 4  # OpenAI's limit on stop sequences


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = {404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error"
        )
        error = {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


class Engine:
    """The batcher's loop: `submit` and `cancel` from any thread; tokens come back through
    each request's ``on_token``. At most `max_batch` requests run and `max_queue` wait; one
    more is refused (429).

    `run` loops on the calling thread; `start` runs it on a thread of its own. The loop is
    fastest on the thread that first ran the model's parallel kernels (the main thread, as
    `slmlab serve` arranges): each thread that starts parallel regions gets its own OpenMP
    team, and two teams spinning on two cores slow each step 2-4x (measured: a stories-8m step
    1.8 ms on the main thread, 7 ms on another).
    """

    def __init__(
        self, model: DecoderLM, tokenizer: Any, *, max_batch: int = 8, max_queue: int = 64
    ) -> None:
        self.batcher = ContinuousBatcher(model, max_batch=max_batch, tokenizer=tokenizer)
        self.capacity = max_batch + max_queue
        self.inbox: queue.SimpleQueue[tuple[str, BatchRequest]] = queue.SimpleQueue()
        self.outstanding = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.waker = _Waker()
        self.thread = threading.Thread(target=self._run, name="slmlab-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The loop, on this thread, until `stop` or `until()`."""
        self._run(until)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, requests: list[BatchRequest]) -> None:
        """Queue `requests` together, or refuse them all: a RequestError when the queue is full."""
        for request in requests:
            try:
                self.batcher.check(request)  # reads the configuration only: safe on any thread
            except ValueError as err:
                raise RequestError(400, str(err), code="invalid_value") from None
        with self.lock:
            if self.outstanding + len(requests) > self.capacity:
                raise RequestError(
                    429,
                    "the server is busy: too many requests waiting; retry later",
                    code="rate_limit_exceeded",
                )
            self.outstanding += len(requests)
        for request in requests:
            self.inbox.put(("submit", request))
        self.wake.set()

    def cancel(self, request: BatchRequest) -> None:
        self.inbox.put(("cancel", request))
        self.wake.set()

    def done(self) -> None:
        """Called once by each request as it finishes (cancelled included)."""
        with self.lock:
            self.outstanding -= 1

    def _run(self, until: Callable[[], bool] = lambda: False) -> None:
        # What exists now (the model, the libraries) lives as long as the server: moved out of
        # the garbage collector's way, a collection visits only the requests' objects (a batch-1
        # step of stories-8m spent 15% of its time in the collector, measured with perf).
        gc.freeze()
        batcher = self.batcher
        while not self.stopping and not until():
            while True:
                try:
                    op, request = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if op == "submit":
                    if request.finished:  # cancelled before it arrived here
                        continue
                    batcher.waiting.append(request)
                elif not request.finished:
                    batcher.cancel(request)
            if batcher.idle:
                self.waker.flush()  # what the cancellations above finished
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                batcher.step()
            except Exception:  # a failing step must not leave every client waiting
                traceback.print_exc()
                for request in [*batcher.waiting, *(r.request for r in batcher.rows if r)]:
                    batcher.cancel(request)
            self.waker.flush()


class _Waker:
    """Wakes the event loop once per decode step for every mailbox that got tokens in it: a
    wake-up from another thread is a write to the loop's pipe and a turn of the loop, 32 of
    them a step at 32 rows (measured with the benchmark: 2167 → 2302 tok/s at 32 clients,
    within the runs' spread)."""

    def __init__(self) -> None:
        self.pending: collections.deque[_Mailbox] = collections.deque()  # thread-safe ends

    def flush(self) -> None:
        """On the engine thread: wake the loops of the mailboxes filled since the last flush."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Mailbox]] = {}
        while self.pending:
            box = self.pending.popleft()
            by_loop.setdefault(box.loop, []).append(box)
        for loop, boxes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: no one waits
                loop.call_soon_threadsafe(_set_ready, boxes)


def _set_ready(boxes: list[_Mailbox]) -> None:
    for box in boxes:
        box.ready.set()


class _Mailbox:
    """Tokens from the engine thread to one request's coroutine: `put` from the engine, `get`
    all that arrived since the last `get`. The event loop is woken once per batch of tokens,
    not once per token (by the engine's `_Waker`, after each decode step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, waker: _Waker) -> None:
        self.loop = loop
        self.waker = waker
        self.items: collections.deque[tuple[int, int | None]] = collections.deque()
        self.ready = asyncio.Event()
        self.scheduled = False

    def put(self, item: tuple[int, int | None]) -> None:
        self.items.append(item)
        if not self.scheduled:
            self.scheduled = True
            self.waker.pending.append(self)

    async def get(self) -> list[tuple[int, int | None]]:
        await self.ready.wait()
        self.ready.clear()
        self.scheduled = False  # before draining: a token put after this wakes us again
        items = []
        while self.items:
            items.append(self.items.popleft())
        return items


class _Choice:
    """One completion being made: its request, and how much of its text was sent."""

    def __init__(self, index: int, request: BatchRequest, tokenizer: Any, stops: list[str]):
        self.index, self.request, self.tokenizer, self.stops = index, request, tokenizer, stops
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def text(self) -> str:
        text = self.tokenizer.decode(self.request.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        return text[: min(cuts)] if cuts else text

    def delta(self) -> str:
        """The text not sent yet that can be sent: never a part of a stop string or of a
        character whose bytes have not all come."""
        text = self.text()
        if not self.request.finished:
            text = text[: max(self.sent, len(text) - self.hold)]
            if text.endswith("\ufffd"):
                text = text[:-1]
        piece = text[self.sent :]
        self.sent += len(piece)
        return piece

    @property
    def finish_reason(self) -> str:
        return "length" if self.request.finish_reason == "length" else "stop"


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(400, f"{name} must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, low: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {value!r}", param=name)
    if value < low:
        raise RequestError(400, f"{name} must be >= {low}, got {value}", param=name)
    return value


def _stops(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(400, f"stop takes at most {MAX_STOPS} sequences", param="stop")
    return stops


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise RequestError(400, "logit_bias must map token ids to numbers", param="logit_bias")
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
        raise RequestError(
            400, "logit_bias must map token ids to numbers", param="logit_bias"
        ) from None


def create_app(
    model: DecoderLM,
    tokenizer: Any,
    settings: Mapping[str, Any],
    *,
    name: str,
    max_batch: int = 8,
    max_queue: int = 64,
    engine_thread: bool = True,
) -> Starlette:
    """The ASGI app serving `model` as `name`; `settings` are the checkpoint's chat settings
    (`slmlab.checkpoint.load_chat_settings`), needed for chat completions. The app starts its
    `Engine` on a thread of its own, or, with `engine_thread` False, leaves the caller to run
    ``app.state.engine.run()`` (on the main thread: see `Engine`)."""
    tokenizer = as_hf_tokenizer(tokenizer)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    context = model.config.max_position_embeddings
    eos = model.config.eos_token_id
    stop_tokens = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    created = int(time.time())

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        if body.get("model") != name:
            raise RequestError(
                404,
                f"The model `{body.get('model')}` does not exist: this server has `{name}`",
                param="model",
                code="model_not_found",
            )
        return body

    def prompt_of_chat(body: Mapping[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list", param="messages")
        for m in messages:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise RequestError(
                    400, "each message needs a string role and string content", param="messages"
                )
        template = settings.get("chat_template")
        if not template:
            raise RequestError(400, f"`{name}` has no chat template: use /v1/completions")
        special = {k: v for k, v in settings.items() if k.endswith("_token")}
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text = render_chat(template, messages, add_generation_prompt=True, **special)
        except ChatTemplateError as err:
            raise RequestError(400, str(err), param="messages") from None
        return tokenizer.encode(text, add_special_tokens=False).ids

    def prompt_of_completion(body: Mapping[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string", param="prompt")
        return tokenizer.encode(prompt).ids

    def requests_of(body: Mapping[str, Any], prompt: list[int], chat: bool) -> list[BatchRequest]:
        n = _integer(body, "n", 1, 1)
        assert n is not None
        if n > MAX_N:
            raise RequestError(400, f"n must be <= {MAX_N}, got {n}", param="n")
        room = context - len(prompt)
        if room < 1:
            raise RequestError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's context is {context}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        field = (
            "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        )
        max_tokens = _integer(body, field, room if chat else 16, 1)
        assert max_tokens is not None
        if max_tokens > room:
            raise RequestError(
                400,
                f"{field} ({max_tokens}) plus the prompt ({len(prompt)} tokens) exceeds this "
                f"model's context ({context})",
                param=field,
                code="context_length_exceeded",
            )
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError(400, "top_p must be > 0", param="top_p")
        seed = _integer(body, "seed", None, 0)
        base = seed if seed is not None else uuid.uuid4().int % 2**31
        stops = _stops(body)
        return [
            BatchRequest(
                prompt,
                max_tokens,
                temperature=temperature,
                top_p=None if top_p == 1.0 else top_p,
                seed=base + i,
                logit_bias=_logit_bias(body),
                stop_tokens=stop_tokens,
                stop_strings=stops,
            )
            for i in range(n)
        ]

    async def complete(request: Request, chat: bool) -> Response:
        try:
            body = await body_of(request)
            prompt = prompt_of_chat(body) if chat else prompt_of_completion(body)
            jobs = requests_of(body, prompt, chat)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError(400, "stream must be true or false", param="stream")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise RequestError(400, "stream_options must be an object", param="stream_options")
            usage_chunk = bool(options.get("include_usage", False))
        except RequestError as err:
            return err.response()
        events = _Mailbox(asyncio.get_running_loop(), engine.waker)
        for index, job in enumerate(jobs):

            def on_token(job: BatchRequest, token: int | None, index: int = index) -> None:
                if token is None:
                    engine.done()
                events.put((index, token))

            job.on_token = on_token
        choices = [_Choice(i, job, tokenizer, _stops(body)) for i, job in enumerate(jobs)]
        try:
            engine.submit(jobs)
        except RequestError as err:
            return err.response()
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": ident, "created": int(time.time()), "model": name}
        if stream:
            usage = {"prompt_tokens": len(prompt)} if usage_chunk else None
            return StreamingResponse(
                _stream(events, choices, head, chat, engine, usage),
                media_type="text/event-stream",
            )
        try:
            finished = 0
            while finished < len(jobs):
                finished += sum(token is None for _, token in await events.get())
        finally:
            for job in jobs:
                if not job.finished:
                    engine.cancel(job)
        out = []
        for c in choices:
            text = c.text()
            item: dict[str, Any] = {
                "index": c.index,
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if chat:
                item["message"] = {"role": "assistant", "content": text}
            else:
                item["text"] = text
            out.append(item)
        completion_tokens = sum(len(job.tokens) for job in jobs)
        return JSONResponse(
            {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": out,
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt) + completion_tokens,
                },
            }
        )

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def models(request: Request) -> Response:
        card = {"id": name, "object": "model", "created": created, "owned_by": "slmlab"}
        return JSONResponse({"object": "list", "data": [card]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if engine_thread:
            engine.start()
        yield
        engine.stop()

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.engine = engine
    return app


async def _stream(
    events: _Mailbox,
    choices: list[_Choice],
    head: dict[str, Any],
    chat: bool,
    engine: Engine,
    usage: dict[str, int] | None,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text as it is decoded, a last chunk per choice
    with its finish reason, a chunk with the token counts when `usage` (``stream_options:
    {"include_usage": true}``), then ``[DONE]``. If the client goes away, its requests are
    cancelled and their rows freed."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

    finished = 0
    try:
        if chat:
            for c in choices:
                yield chunk(c.index, None, None, role=True)
        while finished < len(choices):
            # Every token that came since the last wake-up, in one piece of text per choice:
            # under load, fewer and larger chunks.
            arrived = await events.get()
            ended = [index for index, token in arrived if token is None]
            for index in dict.fromkeys(index for index, _ in arrived):
                piece = choices[index].delta()
                if piece:
                    yield chunk(index, piece, None)
            for index in ended:
                finished += 1
                yield chunk(index, None, choices[index].finish_reason)
        if usage is not None:
            made = sum(len(c.request.tokens) for c in choices)
            counts = {
                **usage,
                "completion_tokens": made,
                "total_tokens": usage["prompt_tokens"] + made,
            }
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': counts})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for c in choices:
            if not c.request.finished:
                engine.cancel(c.request)


class BackgroundServer:
    """`app` served by uvicorn on a thread of this process, at `url` (``http://HOST:PORT/v1``):
    how `slmlab serve`, a notebook or a test runs it. `port` None picks a free one."""

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int | None = None):
        if port is None:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        config = uvicorn.Config(app, host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.url = f"http://{host}:{port}/v1"
        self.thread = threading.Thread(target=self.server.run, name="slmlab-http", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise OSError(f"the server could not start on {host}:{port} (is the port taken?)")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask uvicorn to finish (open connections closed, answers in flight sent) and wait up
        to `timeout` seconds; whether it has stopped."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        return not self.thread.is_alive()

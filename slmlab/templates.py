"""Jinja templates that arrive with other people's files, rendered as data, never as code.

A task file's ``doc_to_text`` (lm-evaluation-harness's format) and a model's chat template are
Jinja templates written by whoever shared the file. Jinja's immutable sandbox refuses the
attribute walks that reach Python's internals (``lipsum.__globals__``,
``"".__class__.__mro__``) and any change to the data passed in. It does not bound the work: its
``range`` stops at 100,000 items, but two nested loops, ``"x" * 10**10`` or a string doubled in a
``namespace`` run until the machine gives out. `Sandbox` adds those bounds: the time a render may
take (checked at every call, attribute lookup, arithmetic and piece of output), the characters it
may write, and the size of what ``*``, ``**`` and a filter's numeric arguments may build.

`render_chat` writes a conversation in a model's chat format through such a sandbox, the way
transformers' ``apply_chat_template`` does; `CHATML` is the format slmlab gives the models it
fine-tunes to chat (SmolLM2's, without its default system prompt).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "CHATML",
    "MAX_CHARS",
    "MAX_SECONDS",
    "ChatTemplateError",
    "Sandbox",
    "TemplateLimitError",
    "render_chat",
]

MAX_SECONDS = 5.0  # the prompts of a whole benchmark render in less
MAX_CHARS = 1_000_000  # characters a render may write, or a value it may build

# ChatML: each turn is <|im_start|>role\ncontent<|im_end|>\n; the reply opens with the assistant's.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateLimitError(TemplateError):
    """A template that took too long or built too much."""


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with a time and a size bound on every `render`."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(
        self,
        *,
        filters: dict[str, Any] | None = None,
        seconds: float = MAX_SECONDS,
        max_chars: int = MAX_CHARS,
        **options: Any,
    ) -> None:
        """`filters` are added to Jinja's own; `options` are Jinja's (``trim_blocks``...)."""
        super().__init__(**options)
        self.seconds, self.max_chars = seconds, max_chars
        self._deadline = math.inf
        self._compiled: dict[str, Any] = {}  # a task renders one template for every item
        merged = {**self.filters, **(filters or {})}
        self.filters = {name: self._bounded(f) for name, f in merged.items()}

    def render(self, source: str, context: dict[str, Any]) -> str:
        """`source` rendered with `context`, or `TemplateLimitError` past the bounds (other
        failures raise Jinja's own `TemplateError`s: a sandbox escape is a `SecurityError`)."""
        if source not in self._compiled:
            self._compiled[source] = self.from_string(source)
        template = self._compiled[source]
        self._deadline = time.monotonic() + self.seconds
        pieces, size = [], 0
        try:
            for piece in template.generate(**context):
                size += len(piece)
                self._check(piece)
                if size > self.max_chars:
                    raise TemplateLimitError(
                        f"the template wrote more than {self.max_chars:,} characters"
                    )
                pieces.append(piece)
        finally:
            self._deadline = math.inf
        return "".join(pieces)

    def _check(self, value: Any = None) -> Any:
        if time.monotonic() > self._deadline:
            raise TemplateLimitError(f"the template ran longer than {self.seconds:g} s")
        if isinstance(value, str | list | tuple | dict) and len(value) > self.max_chars:
            raise TemplateLimitError(
                f"the template built a value of more than {self.max_chars:,} items"
            )
        return value

    def _bounded(self, fn):
        """A filter that refuses numeric arguments that would build more than `max_chars`."""

        @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
        def bounded(*args: Any, **kwargs: Any) -> Any:
            for arg in (*args, *kwargs.values()):
                big = (
                    isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > self.max_chars
                )
                if big:
                    raise TemplateLimitError(f"a filter argument of {arg:,} is beyond the bound")
            return self._check(fn(*args, **kwargs))

        return bounded

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:
        __self._check()
        return __self._check(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self._check(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self._check(super().getitem(obj, argument))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self._check()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(n, int)
                if sized and len(seq) * n > self.max_chars:
                    raise TemplateLimitError(f"{len(seq):,} items × {n:,} is beyond the bound")
        powers = operator == "**" and isinstance(left, int) and isinstance(right, int)
        if powers and right > 0 and right * abs(left).bit_length() > 8 * self.max_chars:
            raise TemplateLimitError(f"{left} ** {right} is beyond the bound")  # too many bits
        return self._check(super().call_binop(context, operator, left, right))


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered (or tries to escape the sandbox)."""


def _refuse(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


@functools.lru_cache(maxsize=1)
def _chat_sandbox() -> Sandbox:
    """transformers' chat environment: trim_blocks, lstrip_blocks, loop controls,
    ``raise_exception`` and ``tojson`` (one, so a template compiles once per process)."""
    env = Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        filters={
            "tojson": lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        },
    )
    env.globals["raise_exception"] = _refuse
    return env


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **special_tokens: str | None,
) -> str:
    """`messages` (``{"role": ..., "content": ...}``) written in `template`'s format, with the
    assistant's turn opened when `add_generation_prompt`. `special_tokens` (``bos_token``,
    ``eos_token``...) are the variables templates use for them."""
    try:
        return _chat_sandbox().render(
            template,
            {
                "messages": list(messages),
                "add_generation_prompt": add_generation_prompt,
                **special_tokens,
            },
        )
    except TemplateError as err:  # SecurityError (a sandbox escape) is one of them
        raise ChatTemplateError(
            f"cannot render the chat template: {type(err).__name__}: {err}"
        ) from None

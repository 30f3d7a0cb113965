"""Chat: messages in, the model's reply out, through the checkpoint's own chat template.

An instruction-tuned model was trained on conversations written in one exact format (SmolLM2's
is ChatML: ``<|im_start|>user\\n...<|im_end|>``), and it answers well only when the prompt is
written the same way. The format ships with the model as a Jinja template
(``tokenizer_config.json``'s ``chat_template``, or a GGUF file's ``tokenizer.chat_template``),
rendered by `slmlab.templates.render_chat` as transformers' ``apply_chat_template`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.decoder import DecoderLM
from ..templates import ChatTemplateError, render_chat
from ..tokenizers import as_hf_tokenizer
from .generate import generate

__all__ = ["Chat", "ChatTemplateError", "render_chat"]


@dataclass
class Chat:
    """A conversation with a model: `say` adds the user's turn and returns the reply, which
    joins the history so the next turn sees it. `settings` is the checkpoint's
    (`slmlab.checkpoint.load_chat_settings`): the template and its special tokens."""

    model: DecoderLM
    tokenizer: Any
    settings: dict[str, Any]
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokenizer = as_hf_tokenizer(self.tokenizer)
        if not self.settings.get("chat_template"):
            raise ChatTemplateError("this model has no chat template: it is not a chat model")
        if self.system is not None:
            self.history.insert(0, {"role": "system", "content": self.system})

    def prompt(self) -> str:
        tokens = {k: v for k, v in self.settings.items() if k.endswith("_token")}
        return render_chat(self.settings["chat_template"], self.history, **tokens)

    def say(
        self,
        text: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = 0,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """The model's reply to `text`; `stream` receives it piece by piece as it is decoded."""
        self.history.append({"role": "user", "content": text})
        ids = self.tokenizer.encode(self.prompt(), add_special_tokens=False).ids
        stops = self.model.config.eos_token_id
        reply: list[int] = []
        shown = ""

        def show(tokens: torch.Tensor) -> None:
            nonlocal shown
            if tokens[0].item() in ([stops] if isinstance(stops, int) else stops or []):
                return
            reply.append(int(tokens[0]))
            text = self.tokenizer.decode(reply)
            if not text.endswith("\ufffd"):  # wait for the rest of a character's bytes
                stream(text[len(shown) :])
                shown = text

        out = generate(
            self.model,
            [ids],
            max_new_tokens,
            temperature=temperature,
            seed=seed,
            on_tokens=show if stream is not None else None,
        )
        answer = self.tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True)
        if stream is not None and answer != shown:
            stream(answer[len(shown) :])
        self.history.append({"role": "assistant", "content": answer})
        return answer

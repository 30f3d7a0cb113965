"""Token healing: a prompt that stops inside a token is taken back and regrown by the model.

A tokenizer cuts running text its own way; a prompt cut anywhere else ends in tokens the model
rarely saw there. With superword tokens (chapter 02) "In the end, Mia and" ends in ``an`` +
``d``, because in a story ``andĠ`` is always merged with what follows, and the model, never
having been there, continues badly. Healing (Lundberg, "The Art of Prompt Design: Prompt
Boundaries and Token Healing", 2023) takes the prompt's last tokens back for as long as the text
they spell could still be the beginning of a longer token, then constrains generation to spell
that text again before it goes on freely: the model picks its own tokens for the cut. This is
llama.cpp's multi-token ("dynamic") healing; transformers' ``token_healing`` heals one token.

A prompt that ends where the tokenizer would have cut anyway loses nothing: the model regrows
the same tokens when they are the likeliest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

from .generate import generate

__all__ = ["TokenHealer"]


def _token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Each id's bytes (None for special tokens), for a byte-level BPE ``tokenizers.Tokenizer``
    or slmlab's `BPETokenizer`."""
    from tokenizers import decoders

    from ..tokenizers import as_hf_tokenizer, bytes_to_unicode

    tokenizer = as_hf_tokenizer(tokenizer)
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        raise ValueError(
            f"token healing needs a byte-level BPE tokenizer (GPT-2's byte alphabet, as slmlab's, "
            f"SmolLM's and Qwen's); this one decodes with {type(tokenizer.decoder).__name__}"
        )
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.get_added_tokens_decoder())
    table: list[bytes | None] = [None] * tokenizer.get_vocab_size(with_added_tokens=True)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i not in special:
            table[i] = bytes(byte_of[c] for c in token)
    return table


class TokenHealer:
    """Token healing for one tokenizer (see the module): `heal` a prompt, `generate` after it."""

    def __init__(self, tokenizer: Any) -> None:
        self.token_bytes = _token_bytes(tokenizer)
        # Every text that some token strictly extends: where a prompt may have stopped mid-token.
        self._unfinished = {
            piece[:end]
            for piece in self.token_bytes
            if piece is not None
            for end in range(1, len(piece))
        }
        self._every_token = list(range(len(self.token_bytes)))
        self.allowed = lru_cache(maxsize=4096)(self._allowed)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes that `ids` spell (special tokens spell nothing)."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def heal(self, ids: Sequence[int]) -> tuple[list[int], bytes]:
        """The prompt's tokens to keep, and the bytes that generation must spell again.

        Tokens come off the end while the text they spell together is the beginning of a longer
        token; a special token is never taken.
        """
        keep, regrow = len(ids), b""
        while keep > 0:
            piece = self.token_bytes[ids[keep - 1]]
            if piece is None or piece + regrow not in self._unfinished:
                break
            keep, regrow = keep - 1, piece + regrow
        return list(ids[:keep]), regrow

    def _allowed(self, regrow: bytes) -> list[int]:
        """Tokens that may come next while `regrow` is still to be spelled: those that begin with
        it and those that are a beginning of it."""
        if not regrow:
            return self._every_token
        return [
            i
            for i, piece in enumerate(self.token_bytes)
            if piece and (piece.startswith(regrow) or regrow.startswith(piece))
        ]

    def constraint(
        self, prompt_width: int, regrow: Sequence[bytes]
    ) -> Callable[[int, torch.Tensor], list[int]]:
        """A `generate` ``prefix_allowed_tokens_fn``: row r must spell ``regrow[r]`` first; its
        prompt (left-padded) fills the first `prompt_width` positions."""

        def allowed_tokens(row: int, ids: torch.Tensor) -> list[int]:
            spelled = self.decode_bytes(ids[prompt_width:].tolist())
            return self.allowed(regrow[row][len(spelled) :])

        return allowed_tokens

    def generate(
        self, model: torch.nn.Module, ids: Sequence[int], max_new_tokens: int, **kwargs: Any
    ) -> tuple[list[int], bytes]:
        """Heal prompt `ids` and continue it; returns the new tokens (the regrown ones first) and
        the bytes that follow the original prompt. `max_new_tokens` counts tokens after the
        original prompt: the taken-back tokens get their places back. `kwargs` go to
        `slmlab.generate`."""
        kept, regrow = self.heal(ids)
        if not kept:
            raise ValueError(
                "the whole prompt is the beginning of one token, so nothing is left to condition "
                "on: start the prompt with a special token (the end-of-text token, as training did)"
            )
        new = max_new_tokens + len(ids) - len(kept)
        out = generate(
            model,
            [kept],
            new,
            prefix_allowed_tokens_fn=self.constraint(len(kept), [regrow]),
            **kwargs,
        )[0][len(kept) :]
        return out, self.decode_bytes(out)[len(regrow) :]

"""The three questions every evaluation asks a language model, with lm-evaluation-harness's rules.

`Scorer` wraps a model and its tokenizer and answers

* ``loglikelihood``: log p(continuation | context), and whether greedy decoding would have
  produced the continuation (multiple-choice tasks score every choice this way);
* ``loglikelihood_rolling``: log p(text) of a whole text (perplexity tasks);
* ``generate_until``: greedy text after a context, cut at the first stop string.

The rules are lm-evaluation-harness's, so a number here means what it means there:

* a context's trailing whitespace moves to the continuation, and the continuation's tokens are
  those of ``encode(context + continuation)`` after the context's (so "Paris" after "capital
  is" is tokenized the way the model would have seen it in running text); where a token of
  the whole runs across the cut (superword tokens), the continuation starts at that token;
* an empty context is the model's beginning-of-text token where it has one, else its
  end-of-text token (the document separator slmlab's own models were trained on), as
  lm-evaluation-harness's ``hf`` model conditions a text's first token;
* truncation: a request longer than the model's context keeps its *last* ``max_length + 1``
  tokens (the oldest context goes). `Scorer.truncated` counts such requests, and every result
  that `slmlab.eval` reports carries the count; a continuation that alone does not fit is an error;
* log-likelihoods are natural logs, summed over the continuation's tokens.

One departure is offered, off by default: ``token_healing=True`` generates with token healing
(`slmlab.infer.TokenHealer`), for tokenizers whose tokens run across the places where a task
cuts its prompts (superwords, chapter 02).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tokenizers import END_OF_TEXT, as_hf_tokenizer, encoder
from .perplexity import token_bits

__all__ = ["Scorer"]


class Scorer:
    """A model and its tokenizer, scored by lm-evaluation-harness's rules (see the module)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        prefix_token_id: int | None = None,
        token_healing: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = as_hf_tokenizer(tokenizer)
        self.healer = None
        if token_healing:
            from ..infer import TokenHealer

            self.healer = TokenHealer(self.tokenizer)
        self.encode = encoder(self.tokenizer)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        config = model.config
        self.max_length = max_length or config.max_position_embeddings
        if prefix_token_id is None:
            # lm-evaluation-harness's `hf` model: the beginning-of-text token where there is one,
            # else the end-of-text token (the document separator of slmlab's own models).
            prefix_token_id = next(
                (t for t in (config.bos_token_id, config.eos_token_id) if t is not None), None
            )
            if isinstance(prefix_token_id, list):
                prefix_token_id = prefix_token_id[0]
        if prefix_token_id is None:
            prefix_token_id = self.tokenizer.token_to_id(END_OF_TEXT)
        if prefix_token_id is None:
            raise ValueError(
                "the model has no end-of-text token to condition a text's first token on: set "
                f"eos_token_id in its config.json, or give the tokenizer a {END_OF_TEXT} token"
            )
        self.prefix_token_id = int(prefix_token_id)
        self.truncated = 0  # requests whose oldest context tokens were dropped to fit

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a request's context and continuation (the module's first two rules)."""
        if not context:
            ids = self.encode(continuation)
            if ids and ids[0] == self.prefix_token_id:
                return ids[:1], ids[1:]
            return [self.prefix_token_id], ids
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        # The continuation starts at the first token that is not the context's own. With word
        # tokens that is lm-evaluation-harness's cut, len(context_ids). A superword tokenizer
        # can merge the context's last words with the continuation's first ("and Luca"): the
        # tokens then part earlier, and the scored tokens carry those few context characters,
        # the same for every choice, where slicing at len(context_ids) would cut a token apart.
        shared = 0
        for a, b in zip(whole, context_ids, strict=False):
            if a != b:
                break
            shared += 1
        return whole[:shared], whole[shared:]

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, progress: bool = False
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) for each (context, continuation)."""
        pairs = [self.encode_pair(context, continuation) for context, continuation in requests]
        return self.loglikelihood_tokens(pairs, progress=progress)

    @torch.no_grad()
    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, progress: bool = False
    ) -> list[tuple[float, bool]]:
        """`loglikelihood` on token ids: batched, longest first, right-padded (a causal model's
        earlier positions never see the padding, so no mask is needed)."""
        inputs: list[list[int]] = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("a continuation must have at least one token")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens does not fit the model's "
                    f"context of {self.max_length} tokens"
                )
            whole = [*context, *continuation]
            if len(whole) > self.max_length + 1:
                self.truncated += 1
            inputs.append(whole[-(self.max_length + 1) :])
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="scoring", disable=not progress, leave=False):
            chunk = order[start : start + self.batch_size]
            width = len(inputs[chunk[0]]) - 1
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                batch[row, : len(inputs[i]) - 1] = torch.tensor(inputs[i][:-1])
            logprobs = F.log_softmax(self.model(batch.to(self.device)).float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                n, k = len(inputs[i]) - 1, len(pairs[i][1])
                target = torch.tensor(inputs[i][-k:])
                scores = logprobs[row, n - k : n]
                ll = float(scores.gather(-1, target[:, None]).sum())
                results[i] = (ll, bool((scores.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, texts: Sequence[str], *, progress: bool = False) -> list[float]:
        """log p(text) of each whole text after the end-of-text token, in non-overlapping
        windows of the model's context (lm-evaluation-harness's rolling windows)."""
        out = []
        for text in tqdm(texts, desc="scoring", disable=not progress, leave=False):
            ids = [self.prefix_token_id, *self.encode(text)]
            bits = token_bits(self.model, ids, context=self.max_length)
            out.append(-float(bits.sum()) * math.log(2))
        return out

    @torch.no_grad()
    def generate_until(
        self, requests: Sequence[tuple[str, dict[str, Any]]], *, progress: bool = False
    ) -> list[str]:
        """Greedy continuation of each context, cut before the first of its ``until`` strings.

        Each request carries lm-evaluation-harness's ``generation_kwargs``: ``until`` (a string
        or list), ``max_gen_toks`` (default 256), and ``do_sample``/``temperature`` (sampling
        draws from seed 0). A context is cut from the left to leave room for ``max_gen_toks``.
        With ``token_healing`` the context's last tokens are regrown first (`TokenHealer`).
        """
        from ..infer import generate

        out = []
        for context, kwargs in tqdm(requests, desc="generating", disable=not progress):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            temperature = (
                float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            )
            unknown = set(kwargs) - {"top_p", "top_k"}
            if unknown:
                raise ValueError(f"generation_kwargs not supported here: {sorted(unknown)}")
            ids = self.encode(context) if context else [self.prefix_token_id]
            room = self.max_length - new
            if len(ids) > room:
                self.truncated += 1
                ids = ids[-room:]
            sampling = dict(
                temperature=temperature,
                top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"),
                seed=0,
                stop_tokens=self.prefix_token_id,
            )
            if self.healer is None:
                tokens = generate(self.model, [ids], new, **sampling)[0][len(ids) :]
                text = self.decode(tokens)
            else:
                if self.healer.heal(ids)[0] == []:  # all of it regrows: condition on end-of-text
                    ids = [self.prefix_token_id, *ids]
                _, spelled = self.healer.generate(self.model, ids, new, **sampling)
                text = spelled.decode("utf-8", errors="replace")
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out

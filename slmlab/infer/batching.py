"""Continuous batching: many requests share one preallocated KV cache and one decode step.

A server that runs requests one after the other leaves the machine idle: at batch 1 a decode
step reads every weight to make one token. Run together, the same read makes a token for every
row. Requests arrive and finish at different times, so rows are admitted and retired between
decode steps (Orca, Yu et al., 2022; vLLM's scheduler): a request waits only for a free row,
not for the batch.

All rows share the cache's length, so a row's tokens end where every other row's end: a new
request's prompt is placed just before that end, with the positions in front of it marked as
padding (positions count real tokens only, so the model sees what it would see alone). Where
the fused step takes it, the prompt rides in the next decode step, its last token beside the
running rows' new ones (chunked prefill, as serving engines batch prompts: a newcomer costs
its tokens' rows in a step the running rows make anyway, not a call of its own); otherwise
it is computed alone first and its keys and values copied into place. When the cache is
full, every row moves back by the padding they all have in front; when a prompt is longer
than the shared length, every row moves forward. A request is admitted only when all the
admitted ones can then finish within the cache. Each row computes exactly what it would
compute alone: the fused step computes a row's numbers independently of the other rows, its
attention counting from the row's first real key (a model the step does not take goes through
the kernels up to 8 rows, and through PyTorch's batched products beyond, equal to rounding). The rows' next tokens are chosen together, each
drawn from its own request's generator.
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.decoder import (
    DecoderLM,
    KVCache,
    fused_decode_step,
    takes_fused_step,
    takes_ragged_step,
)
from .generate import adjust_logits, bias_vector, check_sampling, draw, token_probs

__all__ = ["BatchRequest", "ContinuousBatcher"]

_ids = itertools.count()


@dataclass(eq=False)
class BatchRequest:
    """One request: its prompt and settings in, its tokens and how it finished out.

    `on_token(request, token)` is called for every new token as it is made (streaming), and
    once more with None when the request finishes. `finish_reason` is ``"stop"`` (a stop token
    or string), ``"length"`` (`max_new_tokens`), or ``"cancelled"``.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    seed: int = 0
    stop_tokens: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    on_token: Callable[[BatchRequest, int | None], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Row:
    request: BatchRequest
    start: int  # where its first token sits in the cache
    generator: torch.Generator | None
    bias: torch.Tensor | None


class ContinuousBatcher:
    """Runs `BatchRequest`s on `model` in up to `max_batch` rows of one KV cache of `max_len`
    positions (default: the model's context). `submit` queues a request, `step` admits what
    fits and makes one token for every running row, `run` steps until everything is done.
    `tokenizer` (with ``decode``) is needed only for stop strings. Not thread-safe: one thread
    owns a batcher (a server's engine thread)."""

    def __init__(
        self,
        model: DecoderLM,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.max_batch = max_batch
        self.max_len = max_len or self.config.max_position_embeddings
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(self.config, max_batch, self.max_len, dtype=dtype, device=self.device)
        self.cache.key_mask.zero_()
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[BatchRequest] = deque()
        # The admitted requests (ids) whose prompts ride the next step.
        self.riding: set[int] = set()
        self.steps = 0

    # -- requests ----------------------------------------------------------------------------

    def check(self, request: BatchRequest) -> None:
        """Refuse a request that could never run, before it waits: a ValueError naming why."""
        check_sampling(request.temperature, request.top_k, request.top_p, request.min_p)
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        total = len(request.prompt) + request.max_new_tokens
        limit = min(self.max_len, self.config.max_position_embeddings)
        if total > limit:
            raise ValueError(
                f"the prompt ({len(request.prompt)} tokens) plus max_new_tokens "
                f"({request.max_new_tokens}) exceeds the context ({limit} tokens)"
            )
        if request.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the batcher's tokenizer")
        if any(not 0 <= t < self.config.vocab_size for t in request.prompt):
            raise ValueError(f"the prompt has token ids outside 0..{self.config.vocab_size - 1}")
        if request.logit_bias:
            bias_vector(request.logit_bias, self.config.vocab_size)

    def submit(self, request: BatchRequest) -> BatchRequest:
        self.check(request)
        self.waiting.append(request)
        return request

    def cancel(self, request: BatchRequest) -> None:
        """Stop `request` now (a client went away): its row is freed before the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        self.riding.discard(request.id)
        for i, row in enumerate(self.rows):
            if row is not None and row.request is request:
                self._retire(i)
        if not request.finished:
            self._finish(request, "cancelled")

    @property
    def running(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running == 0

    # -- the loop ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit the waiting requests that fit, then one decode step for every running row."""
        self._admit()
        self._pack()
        n = self.running
        if n == 0:
            return
        if self.cache.length == self.max_len:
            self._compact()
        # The running rows are the first n: the step computes those alone, on views of the
        # cache's first n rows (the batch dimension is the outermost: the views are contiguous).
        view = copy.copy(self.cache)
        view.keys = [k[:n] for k in self.cache.keys]
        view.values = [v[:n] for v in self.cache.values]
        view.key_mask = self.cache.key_mask[:n]
        view.conv_states = {i: t[:n] for i, t in self.cache.conv_states.items()}
        view.ssm_states = {i: t[:n] for i, t in self.cache.ssm_states.items()}
        rows: list[_Row] = self.rows[:n]  # type: ignore[assignment]
        if self.riding:
            fed = [
                list(row.request.prompt)
                if row.request.id in self.riding
                else [row.request.tokens[-1]]
                for row in rows
            ]
            self.riding.clear()
            view.key_mask[:, view.length] = True
            logits = fused_decode_step(
                self.model,
                torch.tensor([t for tokens in fed for t in tokens]),
                view,
                logits=True,
                last_only=True,
                row_tokens=[len(tokens) for tokens in fed],
            )
            assert logits is not None, "admitted to ride, so the step takes them"
            view.length += 1
        else:
            ids = torch.tensor([[row.request.tokens[-1]] for row in rows], device=self.device)
            logits = self.model(ids, torch.ones_like(ids), view, last_only=True)
        self.cache.length = view.length
        self.steps += 1
        for i, token in enumerate(self._next_tokens(list(range(n)), logits[:, -1])):
            self._append(i, token)
        self._pack()

    def run(self) -> None:
        while not self.idle:
            self.step()

    # -- inside ------------------------------------------------------------------------------

    def _span(self, rows: list[tuple[int, BatchRequest]], length: int) -> int:
        """Cache positions needed until every request of `rows` (start, request) is done."""
        if not rows:
            return 0
        ends = [
            start + len(r.prompt) + r.max_new_tokens - 1  # the last token is never fed
            for start, r in rows
        ]
        return max(max(ends), length) - min(start for start, _ in rows)

    def _admit(self) -> None:
        """Take the waiting requests that fit, in order; their prompts ride the next step where
        the fused step takes them all, and are computed now otherwise."""
        admitted = []
        fed = [1] * self.running  # the next step's tokens a row, as it stands
        while self.waiting and None in self.rows:
            request = self.waiting[0]
            P, length = len(request.prompt), self.cache.length
            # Not with a sliding window: whether the step covers it depends on the length the
            # step finds, which a later admission's move can change.
            rides = self.config.sliding_window is None and takes_ragged_step(
                self.model, [*fed, P], self.cache
            )
            before = P - 1 if rides else P  # the prompt's tokens in front of the shared end
            shift = max(0, before - length)  # rows move forward for a long prompt
            rows = [(row.start + shift, row.request) for row in self.rows if row is not None]
            rows.append((length + shift - before, request))
            if self._span(rows, length + shift) > self.max_len:
                break  # waits for a row to finish
            self.waiting.popleft()
            if shift:
                self._move(shift)
            slot = self._reserve(self.rows.index(None), request, before)
            fed.append(P if rides else 1)
            if rides:
                self.riding.add(request.id)
            else:
                admitted.append(slot)
        if admitted:
            self._prefill(admitted)

    def _reserve(self, slot: int, request: BatchRequest, before: int) -> int:
        """Give `request` row `slot`, `before` of its prompt's tokens just in front of the shared
        end (their keys and values come in `_prefill`, or in the step the prompt rides)."""
        end = self.cache.length
        self.cache.key_mask[slot] = False
        self.cache.key_mask[slot, end - before : end] = True
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
        bias = None
        if request.logit_bias:
            bias = bias_vector(request.logit_bias, self.config.vocab_size).to(self.device)
        self.rows[slot] = _Row(request, end - before, generator, bias)
        return slot

    def _prefill(self, slots: list[int]) -> None:
        """Compute the prompts of the rows `slots`, put their keys and values in their places,
        and make their first tokens. Where the fused step takes them, the prompts go in one
        call, left-padded (the step computes each as it would alone: a burst of newcomers
        costs about one of them); otherwise one at a time, as `generate` computes a prompt."""
        prompts = [list(self.rows[slot].request.prompt) for slot in slots]  # type: ignore[union-attr]
        width = max(len(p) for p in prompts)
        dtype = self.cache.keys[0].dtype
        together = KVCache(self.config, len(slots), width, dtype=dtype, device=self.device)
        if len(slots) > 1 and takes_fused_step(self.model, len(slots), width, together):
            groups = [list(range(len(slots)))]
        else:
            groups = [[i] for i in range(len(slots))]
        end = self.cache.length
        for group in groups:
            width = max(len(prompts[i]) for i in group)
            own = KVCache(self.config, len(group), width, dtype=dtype, device=self.device)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            padded = not bool(mask.all())
            logits = self.model(
                ids.to(self.device),
                mask.to(self.device) if padded else None,
                own,
                last_only=True,
            )[:, -1]
            for row, i in enumerate(group):
                slot, P = slots[i], len(prompts[i])
                for shared, alone in zip(
                    self.cache.keys + self.cache.values, own.keys + own.values, strict=True
                ):
                    shared[slot, :, end - P : end] = alone[row, :, width - P :]
                for shared, alone in zip(self.cache.states, own.states, strict=True):
                    shared[slot] = alone[row]  # a Mamba-2 layer's state, the prompt's whole past
            chosen = [slots[i] for i in group]
            for slot, token in zip(chosen, self._next_tokens(chosen, logits), strict=True):
                self._append(slot, token)

    def _next_tokens(self, slots: list[int], logits: torch.Tensor) -> list[int]:
        """The next token of each row of `slots` from its `logits` (len(slots), vocab), by its
        request's settings and generator, what `generate` would choose for it alone. Rows that
        share settings are computed together: at 32 rows the draws alone took 0.50 ms against
        0.88 for 32 calls of torch.multinomial, each row's softmax saved besides (the draws
        still come from each row's generator)."""
        rows = [self.rows[slot] for slot in slots]
        assert all(row is not None for row in rows)
        adjusted = logits
        for i, row in enumerate(rows):
            request = row.request  # type: ignore[union-attr]
            if request.repetition_penalty != 1.0 or row.bias is not None:  # type: ignore[union-attr]
                seen = torch.tensor([[*request.prompt, *request.tokens]], device=self.device)
                adjusted = adjusted.clone() if adjusted is logits else adjusted
                adjusted[i : i + 1] = adjust_logits(
                    logits[i : i + 1],
                    seen,
                    repetition_penalty=request.repetition_penalty,
                    logit_bias=row.bias,  # type: ignore[union-attr]
                )
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            r = row.request  # type: ignore[union-attr]
            groups.setdefault((r.temperature, r.top_k, r.top_p, r.min_p), []).append(i)
        tokens = [0] * len(rows)
        for (temperature, top_k, top_p, min_p), members in groups.items():
            part = adjusted if len(members) == len(rows) else adjusted[members]
            if temperature == 0:
                chosen = part.argmax(dim=-1)
            else:
                probs = token_probs(
                    part, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
                )
                chosen = draw(probs, [rows[i].generator for i in members])  # type: ignore[union-attr]
            for i, token in zip(members, chosen.tolist(), strict=True):
                tokens[i] = token
        return tokens

    def _append(self, slot: int, token: int) -> None:
        """Give row `slot` its next `token`; retire the row if that ends it."""
        row = self.rows[slot]
        assert row is not None
        request = row.request
        request.tokens.append(token)
        if request.on_token is not None:
            request.on_token(request, token)
        reason = None
        if token in request.stop_tokens or self._stop_string(request):
            reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._retire(slot)
            self._finish(request, reason)

    def _stop_string(self, request: BatchRequest) -> bool:
        if not request.stop_strings:
            return False
        text = self.tokenizer.decode(request.tokens)
        return any(s in text for s in request.stop_strings)

    def _finish(self, request: BatchRequest, reason: str) -> None:
        request.finish_reason = reason
        if request.on_token is not None:
            request.on_token(request, None)

    def _pack(self) -> None:
        """Move rows down into free slots, so that the running rows are the first ones."""
        for slot in range(self.max_batch):
            if self.rows[slot] is not None:
                continue
            last = max((i for i, r in enumerate(self.rows) if r is not None), default=-1)
            if last < slot:
                return
            for t in [
                *self.cache.keys,
                *self.cache.values,
                *self.cache.states,
                self.cache.key_mask,
            ]:
                t[slot] = t[last]
            self.cache.key_mask[last] = False
            self.rows[slot], self.rows[last] = self.rows[last], None

    def _retire(self, slot: int) -> None:
        self.rows[slot] = None
        self.cache.key_mask[slot] = False
        if self.running == 0:
            self.cache.length = 0  # nothing to keep: start again from the front

    def _move(self, shift: int) -> None:
        """Every row `shift` positions forward (> 0) or back (< 0) in the cache; the positions
        the tokens had in their texts do not change (they count real tokens, not places)."""
        n = self.cache.length
        lo, hi = (0, n) if shift > 0 else (-shift, n)
        for t in [*self.cache.keys, *self.cache.values, self.cache.key_mask]:
            block = t[..., lo:hi, :].clone() if t.dim() == 4 else t[:, lo:hi].clone()
            if t.dim() == 4:
                t[..., lo + shift : hi + shift, :] = block
            else:
                t[:, lo + shift : hi + shift] = block
        if shift > 0:
            self.cache.key_mask[:, :shift] = False
        for row in self.rows:
            if row is not None:
                row.start += shift
        # Every token stays, in another place: the states (which hold no places) stay as well.
        self.cache.restore((n + shift, self.cache.states))

    def _compact(self) -> None:
        front = min(row.start for row in self.rows if row is not None)
        if front == 0:  # admission leaves room for every admitted request: cannot happen
            raise RuntimeError("the batch's cache is full and no row can move back")
        self._move(-front)

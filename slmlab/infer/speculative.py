"""Speculative decoding: a cheap drafter guesses a few tokens, the model checks them in one call.

Decoding one token reads every weight of the model once, so a call that checks k + 1 tokens
costs little more than a call that makes one (chapter 10 measures it). A drafter -- a smaller
model, or a lookup of the text so far -- proposes k tokens; the target model scores all of
them in one call and keeps a prefix. The rule of Leviathan et al. (2023) and Chen et al. (2023)
decides what is kept so that the output is distributed exactly as the target's own sampling:
draft token x, drawn from the draft's distribution q, is accepted with probability
min(1, p(x) / q(x)); at the first rejection, the replacement is drawn from the residual
max(0, p - q), normalised; when every draft is accepted, one more token comes from the target's
last distribution for free. At temperature 0 both distributions put all their mass on the
argmax, and the same rule keeps exactly the target's greedy tokens.

Batch 1: a batch's rows would accept different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ..models.decoder import FUSED_MAX_TOKENS, DecoderLM, KVCache, fused_decode_tokens
from .generate import check_sampling, draw, token_probs

__all__ = [
    "Drafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SpeculativeResult",
    "acceptance_probability",
    "expected_speedup",
    "residual_distribution",
    "speculative_generate",
]

# The longest draft: the draft and the token after it are checked in one call of the fused step.
MAX_DRAFT_TOKENS = FUSED_MAX_TOKENS - 1


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """The probability that a draft `token` drawn from `q` is kept when the target's
    distribution is `p`: min(1, p(x) / q(x))."""
    return _acceptance(float(p[token]), float(q[token]))


def _acceptance(px: float, qx: float) -> float:
    """min(1, p(x) / q(x)), from the two probabilities of the draft token x."""
    return 1.0 if px >= qx else px / qx


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected draft is replaced by: max(0, p - q), normalised. Where p and q agree to
    rounding (a rejection then has probability ~0), p itself."""
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return residual / total if total > 1e-12 else p


def expected_speedup(
    acceptance: float, draft_tokens: int, draft_cost: float, *, check_cost: float = 1.0
) -> float:
    """Tokens per unit of time against the target alone, when each draft token is accepted
    with probability `acceptance` independently and a round drafts `draft_tokens` (k) at
    `draft_cost` (c) each, then checks them in one call of the target costing `check_cost` (v),
    both relative to one decoding step of the target: the tokens a round yields on average,
    (1 - a^(k+1)) / (1 - a), over its cost, k·c + v (Leviathan et al., 2023, with v = 1: a
    check of k + 1 tokens costs what one token does while reading the weights is the cost)."""
    a, k = acceptance, draft_tokens
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * draft_cost + check_cost)


def cut_back(cache: KVCache, length: int, saved: tuple[int, list[torch.Tensor]]) -> None:
    """Forget what `cache` holds past `length` tokens. A cache with Mamba-2 states cannot
    forget a token it has read: it goes back to `saved` (taken before the call that read too
    far), and the kept tokens are read again by the next call."""
    if length >= cache.length:
        return
    if cache.ssm_states:
        cache.restore(saved)
    else:
        cache.length = length


class Drafter(Protocol):
    """Proposes tokens that may continue a sequence; told afterwards how much was kept."""

    def propose(self, ids: Sequence[int], count: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to `count` tokens continuing `ids`, and the distribution each was drawn from
        ((len(tokens), vocab)), or None when the tokens were chosen, not drawn (a point mass)."""
        ...

    def keep(self, length: int) -> None:
        """The sequence now has `length` tokens, of which the drafter's state may keep the
        ones it proposed and that were accepted."""
        ...


class ModelDrafter:
    """A smaller model with the target's tokenizer, sampling with the target's settings, its
    own KV cache rolled back to what the target kept. With `min_confidence`, a draft ends
    early after a token its model gave a probability (softmax of its logits) below it: the
    tokens after an unsure one are seldom kept, and not drafting them saves their steps
    (transformers' assistant confidence threshold)."""

    def __init__(
        self,
        model: DecoderLM,
        max_len: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        generator: torch.Generator | None = None,
        min_confidence: float | None = None,
    ) -> None:
        if min_confidence is not None and not 0 < min_confidence < 1:
            raise ValueError(f"min_confidence must be in (0, 1), got {min_confidence}")
        self.min_confidence = min_confidence
        self.model = model
        dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.config, 1, max_len, dtype=dtype, device=self.device)
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
        self.generator = generator
        self.saved = self.cache.snapshot()

    @torch.no_grad()
    def propose(self, ids: Sequence[int], count: int) -> tuple[list[int], torch.Tensor | None]:
        self.saved = self.cache.snapshot()
        feed = list(ids[self.cache.length :])
        x = torch.tensor([feed], device=self.device)
        greedy = self.sampling["temperature"] == 0
        # Each draw's Exp(1) race for every token (`draw`), taken before the steps, so that the
        # compiled steps and the loop below draw the same tokens from the same generator.
        races = None
        if not greedy and count:
            vocab = self.model.config.vocab_size
            races = torch.empty(1, count, vocab, device=self.device)
            races.exponential_(1, generator=self.generator)
        # The compiled steps draw from the softmax alone; top-k, top-p and min-p cut in Python.
        uncut = all(self.sampling[cut] is None for cut in ("top_k", "top_p", "min_p"))
        if count and (greedy or uncut):  # every step in one compiled call, where it applies
            out = fused_decode_tokens(
                self.model,
                x,
                self.cache,
                count,
                min_confidence=self.min_confidence or 0.0,
                temperature=self.sampling["temperature"] or 1.0,
                races=races,
            )
            if out is not None:
                chosen, dists = out
                return chosen[0, len(feed) - 1 :].tolist(), None if dists is None else dists[0]
        tokens: list[int] = []
        drawn: list[torch.Tensor] = []
        for step in range(count):
            logits = self.model(x, cache=self.cache, last_only=True)[0, -1]
            if races is None:  # chosen, not drawn: a point mass, which `None` stands for
                token = int(logits.argmax())
            else:
                q = token_probs(logits, **self.sampling)  # type: ignore[arg-type]
                token = int((q / races[0, step]).argmax())
                drawn.append(q)
            tokens.append(token)
            if self.min_confidence and float(logits.softmax(-1)[token]) < self.min_confidence:
                break
            x = torch.tensor([[token]], device=self.device)
        return tokens, torch.stack(drawn) if drawn else None

    def keep(self, length: int) -> None:
        # Positions past length - 1 hold rejected drafts (or the last token, not yet fed).
        cut_back(self.cache, length - 1, self.saved)


class PromptLookupDrafter:
    """Drafts by copying: find the last few tokens earlier in the sequence (the longest match
    of `max_ngram` down to `min_ngram` tokens, the latest occurrence) and propose what followed
    them. No second model; it wins where the output repeats its input (summaries, edits,
    extraction, code), as in transformers' prompt-lookup decoding."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: Sequence[int], count: int) -> tuple[list[int], torch.Tensor | None]:
        ids = list(ids)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest occurrence first
                if ids[start : start + n] == tail:
                    follow = ids[start + n : start + n + count]
                    if follow:
                        return follow, None
        return [], None

    def keep(self, length: int) -> None:
        pass


@dataclass
class SpeculativeResult:
    """The ids (prompt included, cut after a stop token) and what the speculation did."""

    ids: list[int]
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """The share of drafted tokens the target kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """New tokens per call of the target: 1 without speculation."""
        return (self.accepted + self.target_calls) / self.target_calls if self.target_calls else 0.0


@torch.no_grad()
def speculative_generate(
    target: DecoderLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    draft: DecoderLM | Drafter | Literal["prompt-lookup"],
    draft_tokens: int | Literal["adaptive"] = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    draft_confidence: float | None = None,
) -> SpeculativeResult:
    """Continue `prompt` by up to `max_new_tokens` tokens of `target`, drafted by `draft`.

    The output has the distribution of ``slmlab.generate(target, ...)`` with the same sampling
    settings; at temperature 0 it is the same tokens. `draft` is a smaller model sharing the
    target's vocabulary, ``"prompt-lookup"`` (`PromptLookupDrafter`), or any `Drafter`.
    `draft_tokens` is k, the tokens drafted per round, or ``"adaptive"``: start at 4, grow by 2
    after a round that kept every draft, shrink by 1 after one that did not (the heuristic of
    transformers' assisted generation). With `draft_confidence`, a draft model's round also
    ends after a token it gave a probability below that (`ModelDrafter`); k is then the most
    a round drafts. `stop_tokens` defaults to the target's ``eos_token_id``; sampling draws
    from a generator seeded with `seed`.
    """
    check_sampling(temperature, top_k, top_p, min_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if draft_tokens != "adaptive" and not (
        isinstance(draft_tokens, int) and 1 <= draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise ValueError(
            f"draft_tokens must be 'adaptive' or an int in [1, {MAX_DRAFT_TOKENS}], "
            f"got {draft_tokens!r}"
        )
    if not prompt:
        raise ValueError("speculative_generate needs a prompt of at least one token")
    config = target.config
    if stop_tokens is None:
        stop_tokens = config.eos_token_id
    stops = (
        set()
        if stop_tokens is None
        else {stop_tokens}
        if isinstance(stop_tokens, int)
        else set(stop_tokens)
    )
    device = next(target.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    max_len = len(prompt) + max_new_tokens + MAX_DRAFT_TOKENS + 1

    drafter: Drafter
    if isinstance(draft, DecoderLM):
        if draft.config.vocab_size != config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the "
                f"target's ({config.vocab_size}): speculation needs one tokenizer for both"
            )
        drafter = ModelDrafter(
            draft,
            max_len,
            **sampling,  # type: ignore[arg-type]
            generator=generator,
            min_confidence=draft_confidence,
        )
    elif draft_confidence is not None:
        raise ValueError("draft_confidence is the draft model's: give a model as draft")
    elif draft == "prompt-lookup":
        drafter = PromptLookupDrafter()
    else:
        drafter = draft  # type: ignore[assignment]

    def choose(p: torch.Tensor) -> int:
        return int(p.argmax()) if temperature == 0 else int(draw(p, generator))

    def keep_sampled(tokens: list[int], q: torch.Tensor | None, logits: torch.Tensor) -> int:
        """Append to `ids` what the rule keeps of `tokens`, drawn from `q` (None: chosen), and
        the token after them, given the target's `logits` at each draft and one past; return
        how many drafts were kept."""
        p = token_probs(logits, **sampling)  # type: ignore[arg-type]
        drafted = torch.tensor(tokens, dtype=torch.long)
        at = torch.arange(len(tokens))
        p_drafted = p[at, drafted].tolist()
        q_drafted = [1.0] * len(tokens) if q is None else q[at, drafted].tolist()
        for i, token in enumerate(tokens):
            u = float(torch.rand((), generator=generator, device=device))
            if u < _acceptance(p_drafted[i], q_drafted[i]):
                ids.append(token)
                if token in stops:
                    return i + 1
            else:
                qi = q[i] if q is not None else torch.nn.functional.one_hot(drafted[i], p.shape[-1])
                ids.append(choose(residual_distribution(p[i], qi.to(p))))
                return i
        ids.append(choose(p[len(tokens)]))  # every draft kept: the target's next, for free
        return len(tokens)

    def keep_greedy(tokens: list[int], best: list[int]) -> int:
        """`keep_sampled` at temperature 0, where both distributions are a point mass: a draft
        is kept while it is the target's argmax (`best`, at each draft and one past), and the
        first that is not is replaced by the target's argmax. The same tokens, without building
        the distributions."""
        for i, token in enumerate(tokens):
            ids.append(best[i])
            if best[i] != token:
                return i
            if token in stops:
                return i + 1
        ids.append(best[len(tokens)])
        return len(tokens)

    ids = list(prompt)
    result = SpeculativeResult(ids=ids)
    if max_new_tokens == 0:
        return result
    dtype = next(target.parameters()).dtype
    cache = KVCache(config, 1, max_len, dtype=dtype, device=device)
    # The first token comes from the prompt's own call, as `generate` makes it.
    logits = target(torch.tensor([ids], device=device), cache=cache, last_only=True)[0, -1]
    ids.append(choose(token_probs(logits, **sampling)))  # type: ignore[arg-type]
    result.target_calls = 1
    k = 4 if draft_tokens == "adaptive" else draft_tokens
    new = 1
    while new < max_new_tokens and ids[-1] not in stops:
        count = min(k, max_new_tokens - new - 1)
        tokens, q = drafter.propose(ids, count) if count > 0 else ([], None)
        tokens = tokens[:count]
        # One call scores the last kept token and every draft: len(tokens) + 1 distributions.
        feed = ids[cache.length :] + tokens
        saved = cache.snapshot()
        x = torch.tensor([feed], device=device)
        first = len(feed) - len(tokens) - 1  # the last kept token's position in the feed
        if temperature == 0:
            out = fused_decode_tokens(target, x, cache, 1)  # the argmaxes, in one call
            chosen = out[0] if out is not None else target(x, cache=cache)[0].argmax(-1)[None]
            kept = keep_greedy(tokens, chosen[0, first:].tolist())
        else:
            kept = keep_sampled(tokens, q, target(x, cache=cache)[0, first:])
        result.target_calls += 1
        result.drafted += len(tokens)
        result.draft_lengths.append(len(tokens))
        result.accepted += kept
        new = len(ids) - len(prompt)
        cut_back(cache, len(ids) - 1, saved)
        drafter.keep(len(ids))
        if draft_tokens == "adaptive":
            k = min(MAX_DRAFT_TOKENS, k + 2) if tokens and kept == len(tokens) else max(1, k - 1)
    for i in range(len(prompt), len(ids)):
        if ids[i] in stops:
            del ids[i + 1 :]
            break
    return result

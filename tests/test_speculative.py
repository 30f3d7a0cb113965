"""Speculative decoding keeps the target's output: its greedy tokens exactly, its sampling
distribution exactly (the rule, enumerated) and in distribution (a chi-square test over seeded
runs of tiny models)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import slmlab
from slmlab import kernels
from slmlab.infer import PromptLookupDrafter, expected_speedup, speculative_generate, token_probs
from slmlab.infer.speculative import acceptance_probability, residual_distribution
from slmlab.models import DecoderLM, ModelConfig


def tiny(seed: int, *, vocab: int = 48, std: float = 0.02, layers: int = 2) -> DecoderLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return DecoderLM(config, init_std=std).eval()


@pytest.mark.parametrize("seed", range(5))
def test_the_rule_keeps_the_target_distribution_exactly(seed: int) -> None:
    """Enumerated over every draft token x ~ q: kept with min(1, p/q), else a draw from the
    residual. The output's distribution is p, for drafts that are near, far, one-hot or that
    give no mass where p has some."""
    g = torch.Generator().manual_seed(seed)
    vocab = 7
    p = torch.rand(vocab, generator=g, dtype=torch.float64).softmax(-1)
    qs = [
        torch.rand(vocab, generator=g, dtype=torch.float64).softmax(-1),
        (torch.randn(vocab, generator=g, dtype=torch.float64) * 4).softmax(-1),
        torch.nn.functional.one_hot(torch.tensor(seed % vocab), vocab).double(),
        torch.cat([torch.zeros(3, dtype=torch.float64), torch.rand(4, generator=g).double()]),
    ]
    for q in qs:
        q = q / q.sum()
        out = torch.zeros(vocab, dtype=torch.float64)
        for x in range(vocab):
            if q[x] == 0:
                continue
            keep = acceptance_probability(p, q, x)
            out[x] += q[x] * keep
            out += q[x] * (1 - keep) * residual_distribution(p, q)
        torch.testing.assert_close(out, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("draft_tokens", [1, 3, 5, "adaptive"])
@pytest.mark.parametrize("fused", [True, False])
def test_greedy_output_is_the_targets_own(draft_tokens, fused: bool) -> None:
    """At temperature 0, whatever the draft (another model, prompt lookup), the tokens are
    those `generate` makes with the target alone, through the fused step and through the
    blocks."""
    target, draft = tiny(0, std=0.2), tiny(1, std=0.2, layers=1)
    prompt = [3, 9, 4, 3, 9, 4, 7]
    with kernels.disabled() if not fused else torch.no_grad():
        expected = slmlab.generate(target, [prompt], 40, stop_tokens=())[0]
        for drafter in (draft, "prompt-lookup"):
            got = speculative_generate(
                target, prompt, 40, draft=drafter, draft_tokens=draft_tokens, stop_tokens=()
            )
            assert got.ids == expected
            assert got.target_calls < 40 or got.accepted == 0


@pytest.mark.parametrize("fused", [True, False])
def test_a_confidence_floor_shortens_drafts_and_keeps_the_greedy_output(fused: bool) -> None:
    """A draft model that stops after an unsure token drafts rounds of several lengths up to
    k, and the output is still the target's greedy tokens (the sampled distribution: below)."""
    target, draft = tiny(0, std=0.2), tiny(1, std=0.6, layers=1)
    prompt = [3, 9, 4, 3, 9, 4, 7]
    with kernels.disabled() if not fused else torch.no_grad():
        got = speculative_generate(
            target, prompt, 40, draft=draft, draft_tokens=6, draft_confidence=0.3, stop_tokens=()
        )
        assert got.ids == slmlab.generate(target, [prompt], 40, stop_tokens=())[0]
    assert len(set(got.draft_lengths)) > 1 and max(got.draft_lengths) <= 6
    with pytest.raises(ValueError, match="draft model"):
        speculative_generate(target, prompt, 4, draft="prompt-lookup", draft_confidence=0.3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_equal_to_the_target_is_always_accepted(temperature: float) -> None:
    """The target drafting for itself: p = q at every step, so every draft is kept and each
    call yields k + 1 tokens; the fused step computes a checked token's numbers exactly as
    it computed the same token alone."""
    target = tiny(0, std=0.2)
    got = speculative_generate(
        target,
        [1, 2, 3],
        31,
        draft=copy.deepcopy(target),
        draft_tokens=4,
        temperature=temperature,
        seed=5,
        stop_tokens=(),
    )
    assert got.acceptance_rate == 1.0
    assert got.target_calls == 1 + 30 // 5 and got.tokens_per_call == 31 / got.target_calls
    assert len(got.ids) == 3 + 31


def _exact_marginals(target: DecoderLM, prompt: list[int], **sampling):
    """The target's distribution of the 2nd and 3rd new tokens, by enumeration."""
    with torch.no_grad():
        vocab = target.config.vocab_size
        first = token_probs(target(torch.tensor([prompt]))[0, -1].double(), **sampling)
        rows = torch.tensor([[*prompt, t] for t in range(vocab)])
        second = token_probs(target(rows)[:, -1].double(), **sampling)  # (t1, t2)
        joint12 = first[:, None] * second
        rows3 = torch.tensor([[*prompt, a, b] for a in range(vocab) for b in range(vocab)])
        third = token_probs(target(rows3)[:, -1].double(), **sampling)
        third = third.reshape(vocab, vocab, vocab)
        return joint12.sum(0), (joint12[..., None] * third).sum((0, 1))


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 0.8, "min_p": 0.1},
        {"temperature": 1.0, "draft_confidence": 0.3},
    ],
)
def test_sampled_output_has_the_targets_distribution(sampling: dict) -> None:
    """Chi-square over 3000 seeded runs: the 2nd and 3rd sampled tokens (the first is the
    prompt call's own draw; the next ones pass the acceptance rule) follow the target's exact
    distribution, with a draft that disagrees often enough to exercise rejections, and with
    drafts that end early after an unsure token."""
    stats = pytest.importorskip("scipy.stats")
    sampling = dict(sampling)
    confidence = sampling.pop("draft_confidence", None)
    target, draft = tiny(0, vocab=10, std=0.5), tiny(3, vocab=10, std=0.5, layers=1)
    prompt = [1, 2]
    second, third = _exact_marginals(target, prompt, **sampling)
    counts = np.zeros((2, 10))
    accepted = drafted = 0
    for seed in range(3000):
        got = speculative_generate(
            target,
            prompt,
            3,
            draft=draft,
            draft_tokens=2,
            seed=seed,
            stop_tokens=(),
            draft_confidence=confidence,
            **sampling,
        )
        counts[0, got.ids[3]] += 1
        counts[1, got.ids[4]] += 1
        accepted, drafted = accepted + got.accepted, drafted + got.drafted
    assert 0.2 < accepted / drafted < 0.9  # rejections happen, and so do acceptances
    for observed, exact in zip(counts, (second, third), strict=True):
        expected = exact.double().numpy()
        expected = expected / expected.sum() * observed.sum()
        kept = expected > 0  # min-p leaves some tokens impossible: they must not appear
        assert observed[~kept].sum() == 0
        assert stats.chisquare(observed[kept], expected[kept]).pvalue > 1e-3


def test_stop_tokens_end_the_output_where_generate_ends_it() -> None:
    target, draft = tiny(0, std=0.2), tiny(1, std=0.2)
    prompt = [5, 6, 7]
    full = slmlab.generate(target, [prompt], 30, stop_tokens=())[0]
    stop = full[len(prompt) + 6]
    expected = slmlab.generate(target, [prompt], 30, stop_tokens=stop)[0]
    got = speculative_generate(target, prompt, 30, draft=draft, draft_tokens=4, stop_tokens=stop)
    assert got.ids == expected and got.ids[-1] == stop


def test_prompt_lookup_copies_what_followed_the_latest_match() -> None:
    drafter = PromptLookupDrafter(max_ngram=3)
    ids = [1, 2, 3, 4, 9, 8, 2, 3, 5, 6, 1, 2, 3]
    assert drafter.propose(ids, 3) == ([4, 9, 8], None)  # [1, 2, 3] at 0
    assert drafter.propose([*ids, 7], 3) == ([], None)  # 7 never came before
    assert drafter.propose([4, 2, 3, 7, 2, 3], 2) == ([7, 2], None)  # [2, 3]: the latest match


def test_expected_speedup_is_the_mean_of_simulated_rounds() -> None:
    """The closed form against rounds of independent acceptances, simulated."""
    rng = np.random.default_rng(0)
    for a, k, c in [(0.0, 3, 0.2), (0.7, 4, 0.1), (0.9, 6, 0.3), (1.0, 2, 0.5)]:
        kept = rng.random((200_000, k)) < a
        tokens = np.cumprod(kept, axis=1).sum(1) + 1  # accepted prefix, plus one from the target
        assert expected_speedup(a, k, c) == pytest.approx(tokens.mean() / (k * c + 1), rel=5e-3)


def test_bad_requests_are_refused() -> None:
    target = tiny(0)
    with pytest.raises(ValueError, match=r"vocabulary \(50 tokens\) is not the target's"):
        speculative_generate(target, [1], 4, draft=tiny(1, vocab=50))
    with pytest.raises(ValueError, match="draft_tokens must be"):
        speculative_generate(target, [1], 4, draft=target, draft_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        speculative_generate(target, [], 4, draft="prompt-lookup")

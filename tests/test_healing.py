"""Token healing: what comes off a prompt, and generation that spells it again."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmlab.data import stories
from slmlab.eval import Scorer
from slmlab.infer import TokenHealer, generate

PROMPT = next(stories(1, seed=11))[:-40]  # a story cut inside its last sentence
WHO = "Once upon a time, there was a girl named Mia. In the end, Mia and"


@pytest.fixture(scope="module")
def healer(superword_tokenizer) -> TokenHealer:
    return TokenHealer(superword_tokenizer)


def _unfinished(healer: TokenHealer, text: bytes) -> bool:
    """Whether some token strictly extends `text`, by a scan of the whole vocabulary."""
    return any(
        p is not None and len(p) > len(text) and p.startswith(text) for p in healer.token_bytes
    )


def _check_heal(healer: TokenHealer, ids: list[int]) -> tuple[list[int], bytes]:
    kept, regrow = healer.heal(ids)
    assert ids[: len(kept)] == kept
    assert healer.decode_bytes(kept) + regrow == healer.decode_bytes(ids)  # nothing lost
    taken = ids[len(kept) :]
    for k in range(len(taken)):  # every text taken back could have been stopped mid-token
        assert _unfinished(healer, healer.decode_bytes(taken[k:]))
    if kept and healer.token_bytes[kept[-1]] is not None:  # and it took all it could
        assert not _unfinished(healer, healer.decode_bytes([kept[-1], *taken]))
    return kept, regrow


def test_a_prompt_cut_before_a_superword_is_regrown(superword_tokenizer, healer) -> None:
    ids = superword_tokenizer.encode(WHO).ids
    running = superword_tokenizer.encode(WHO + " Luca were tired.").ids
    assert running[: len(ids)] != ids  # the prompt's last tokens are not those of the story
    kept, regrow = _check_heal(healer, ids)
    assert regrow.endswith(b"and") and running[: len(kept)] == kept  # healed back to agreement


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=1, max_value=len(PROMPT)))
def test_healing_takes_back_what_could_be_mid_token(superword_tokenizer, healer, cut) -> None:
    _check_heal(healer, superword_tokenizer.encode(PROMPT[:cut]).ids)


def _unfinished_word(tokenizer, healer: TokenHealer) -> str:
    """A text that is one token and the beginning of a longer one."""
    return next(
        text
        for text in ("he", "an", "the", "was", "Mia")
        if len(tokenizer.encode(text).ids) == 1 and _unfinished(healer, text.encode())
    )


def test_special_tokens_stay(superword_tokenizer, healer) -> None:
    eot = superword_tokenizer.token_to_id("<|endoftext|>")
    word = _unfinished_word(superword_tokenizer, healer)
    kept, regrow = healer.heal([eot, *superword_tokenizer.encode(word).ids])
    assert kept == [eot] and regrow == word.encode()
    assert healer.heal([eot]) == ([eot], b"")


def _naive_healed_greedy(model, healer: TokenHealer, ids: list[int], new: int) -> list[int]:
    """Greedy decoding without a cache; while the taken-back text is not yet spelled again,
    every token that does not agree with it is masked (checked byte by byte)."""
    kept, regrow = healer.heal(ids)
    seq, out = list(kept), []
    for _ in range(new + len(ids) - len(kept)):
        logits = model(torch.tensor([seq]))[0, -1]
        spelled = b"".join(healer.token_bytes[t] or b"" for t in out)
        rest = regrow[len(spelled) :]
        if rest:
            for t, piece in enumerate(healer.token_bytes):
                if not piece or not (piece.startswith(rest) or rest.startswith(piece)):
                    logits[t] = float("-inf")
        token = int(logits.argmax())
        seq.append(token)
        out.append(token)
        if token == model.config.eos_token_id:
            break
    return out


@torch.no_grad()
def test_healed_generation_equals_naive_constrained_greedy(
    superword_tokenizer, superword_model, healer
) -> None:
    eot = superword_tokenizer.token_to_id("<|endoftext|>")
    prompts = [[eot, *superword_tokenizer.encode(PROMPT[:cut]).ids] for cut in range(20, 200, 9)]
    healing = [ids for ids in prompts if healer.heal(ids)[1]][:4]
    intact = [ids for ids in prompts if not healer.heal(ids)[1]][:2]
    assert len(healing) == 4 and len(intact) == 2
    for ids in healing:
        regrow = healer.heal(ids)[1]
        new, text = healer.generate(superword_model, ids, 6)
        assert new == _naive_healed_greedy(superword_model, healer, ids, 6)
        spelled = healer.decode_bytes(new)
        assert spelled.startswith(regrow) and text == spelled[len(regrow) :]
    for ids in intact:  # nothing to heal: plain greedy decoding
        new, text = healer.generate(superword_model, ids, 6)
        assert ids + new == generate(superword_model, ids, 6)[0]
        assert text == healer.decode_bytes(new)


def test_scorer_generates_with_healing_when_asked(superword_tokenizer, superword_model) -> None:
    request = [(PROMPT[:90], {"until": ["\n"], "max_gen_toks": 6})]
    healed = Scorer(superword_model, superword_tokenizer, token_healing=True)
    ids = superword_tokenizer.encode(PROMPT[:90]).ids
    _, text = TokenHealer(superword_tokenizer).generate(
        superword_model, ids, 6, stop_tokens=superword_model.config.eos_token_id
    )
    assert healed.generate_until(request) == [text.decode().split("\n")[0]]
    plain = Scorer(superword_model, superword_tokenizer).generate_until(request)
    assert plain != healed.generate_until(request)  # this cut heals, and the model notices
    # a context that is all regrowth is conditioned on the end-of-text token, as training did
    word = _unfinished_word(superword_tokenizer, healed.healer)
    alone = [healed.prefix_token_id, *superword_tokenizer.encode(word).ids]
    expected = healed.healer.generate(superword_model, alone, 3)[1].decode()
    assert healed.generate_until([(word, {"max_gen_toks": 3})]) == [expected]


def test_a_tokenizer_that_is_not_byte_level_is_refused() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    with pytest.raises(ValueError, match=r"byte-level BPE tokenizer.*Metaspace"):
        TokenHealer(tokenizer)


def test_a_prompt_that_is_all_regrowth_is_an_error(superword_tokenizer, superword_model, healer):
    ids = superword_tokenizer.encode(_unfinished_word(superword_tokenizer, healer)).ids
    assert healer.heal(ids)[0] == []
    with pytest.raises(ValueError, match="start the prompt with a special token"):
        healer.generate(superword_model, ids, 3)

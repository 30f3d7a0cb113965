"""The data of a run: documents, a tokenizer trained on them, and packed token rows.

Pre-training trains a tokenizer on its documents and learns every token; supervised
fine-tuning (``objective = "sft"``) takes the tokenizer of the checkpoint it starts from (with
the chat template's tokens added where it lacks them), writes each conversation in the chat
template, and learns the replies alone, from rows of packed examples that never see each other
(`slmlab.data.chat`). Preference tuning (``dpo``, ``simpo``, ``orpo``) reads pairs, and a pair's
two replies are two neighbouring rows that are always drawn together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_chat_settings, load_tokenizer
from ..data import NAMED_CORPORA, corpus_texts, pack, shuffled
from ..data.chat import (
    IGNORE,
    PackedRows,
    chat_tokens,
    pack_examples,
    pair_rows,
    read_chat_jsonl,
    read_preference_jsonl,
)
from ..data.story_qa import preference_pairs, qa_conversations
from ..templates import CHATML
from ..tokenizers import END_OF_TEXT, as_hf_tokenizer, train_bpe
from .config import CHAT_DATA, PREFERENCE_OBJECTIVES, TrainConfig

__all__ = ["Batch", "TrainData", "build_data"]

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # what CHATML writes around each turn
SFT_VALIDATION = 200  # validation conversations of a named chat set


@dataclass
class Batch:
    """Training rows: `ids` (B, L + 1); for fine-tuning also `targets` (B, L; `IGNORE` where
    nothing is learnt) and `segments` (B, L; the packed example of each position). Without
    them every next token is learnt and the row is one sequence. Preference rows come in
    pairs (chosen, rejected) and may carry `reference`, the starting model's log-probability
    of each row's reply."""

    ids: torch.Tensor
    targets: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index) -> Batch:
        return Batch(*(None if t is None else t[index] for t in self._parts()))

    def _parts(self) -> tuple[torch.Tensor | None, ...]:
        return self.ids, self.targets, self.segments, self.reference

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in self._parts()))

    def split(self, size: int) -> list[Batch]:
        return [self[i : i + size] for i in range(0, len(self), size)]


@dataclass
class TrainData:
    tokenizer: Any  # a BPETokenizer trained on the data, or the fine-tuned checkpoint's tokenizers.Tokenizer
    train: torch.Tensor  # (rows, seq_len + 1)
    val: torch.Tensor
    val_docs: list[str]
    val_chars_per_token: float  # to convert a loss per token into bits per character
    train_targets: torch.Tensor | None = None  # fine-tuning: (rows, seq_len), see `Batch`
    train_segments: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None
    val_segments: torch.Tensor | None = None
    eos_token_id: int | None = None  # where generation stops; None: the end-of-text token
    chat_settings: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json
    pairs: bool = False  # preference data: rows 2k and 2k + 1 are pair k's chosen and rejected
    train_reference: torch.Tensor | None = None  # (rows,): see `Batch.reference`
    val_reference: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return as_hf_tokenizer(self.tokenizer).get_vocab_size(with_added_tokens=True)

    def end_token_id(self) -> int:
        """The token a generation ends at: the end of a reply for a chat model."""
        if self.eos_token_id is not None:
            return self.eos_token_id
        return as_hf_tokenizer(self.tokenizer).token_to_id(END_OF_TEXT)

    def _rows(self, index, split: str) -> Batch:
        parts = (
            (self.train, self.train_targets, self.train_segments, self.train_reference)
            if split == "train"
            else (self.val, self.val_targets, self.val_segments, self.val_reference)
        )
        return Batch(*(None if t is None else t[index] for t in parts))

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The rows of optimizer step `step`: a function of the step alone, so resuming is exact.
        For preference data `batch_size` counts pairs, each two neighbouring rows."""
        per = 2 if self.pairs else 1
        units = self.train.shape[0] // per
        start = step * batch_size
        epoch, offset = divmod(start, units)
        order = shuffled(units, seed, epoch)
        index = order[offset : offset + batch_size]
        if len(index) < batch_size:  # the batch runs into the next epoch's order
            index = torch.cat([index, shuffled(units, seed, epoch + 1)[: batch_size - len(index)]])
        if self.pairs:
            index = torch.stack([2 * index, 2 * index + 1], dim=1).flatten()
        return self._rows(index, "train")

    def validation_rows(self, count: int) -> Batch:
        """The first `count` validation rows (pairs, for preference data)."""
        return self._rows(slice(0, count * (2 if self.pairs else 1)), "val")


def _documents(config: TrainConfig) -> tuple[list[str], list[str]]:
    if config.data in NAMED_CORPORA:
        # Fixed data seeds: the run's own seed changes initialisation and order, not the corpus.
        return list(corpus_texts(config.data, "train", stories=config.data_size)), list(
            corpus_texts(config.data, "validation", stories=max(200, config.data_size // 50))
        )
    docs = list(corpus_texts(config.data))
    if len(docs) == 1:  # one long text (tinyshakespeare): the last 10% validates, as in nanoGPT
        cut = int(len(docs[0]) * 0.9)
        return [docs[0][:cut]], [docs[0][cut:]]
    cut = max(1, len(docs) // 20)
    return docs[cut:], docs[:cut]


def build_data(config: TrainConfig, tokenizer: Any = None) -> TrainData:
    """Documents → tokenizer (trained on the training split) → packed rows, or for
    fine-tuning, conversations → chat template → packed examples. Deterministic.

    A `tokenizer` given for next-token data is used instead of training one (`vocab_size`
    and `superwords` then go unused): a distilled student reads its teacher's tokens."""
    if config.objective != "next-token":
        return _chat_data(config)
    train_docs, val_docs = _documents(config)
    if tokenizer is None:
        tokenizer = train_bpe(
            train_docs,
            config.vocab_size,
            special_tokens=(END_OF_TEXT,),
            backend="tokenizers",
            superwords=config.superwords,
        )
    fast = as_hf_tokenizer(tokenizer)  # the same ids as tokenizer.encode (tested), much faster
    sep = fast.token_to_id(END_OF_TEXT)
    if sep is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token to separate documents with")
    train_ids = [e.ids for e in fast.encode_batch(train_docs)]
    val_ids = [e.ids for e in fast.encode_batch(val_docs)]
    val = pack(val_ids, config.seq_len, sep)
    tokens = sum(len(ids) + 1 for ids in val_ids)
    return TrainData(
        tokenizer,
        pack(train_ids, config.seq_len, sep),
        val,
        val_docs,
        sum(map(len, val_docs)) / tokens,
    )


def _conversations(
    config: TrainConfig, fits: Callable[[list[dict[str, str]]], bool]
) -> tuple[list, list, str]:
    """Training and validation conversations, and what to call one in an error. A named set
    leaves out the stories too long for a row (`fits`); the reader's data must fit."""
    preference = config.objective in PREFERENCE_OBJECTIVES
    if config.data in CHAT_DATA:  # story-qa
        if preference:

            def example_fits(example) -> bool:
                return fits(example.messages())

            return (
                preference_pairs(config.data_size, "train", keep=example_fits),
                preference_pairs(SFT_VALIDATION, "validation", keep=example_fits),
                "story-qa pair",
            )
        return (
            qa_conversations(config.data_size, "train", keep=fits),
            qa_conversations(SFT_VALIDATION, "validation", keep=fits),
            "story-qa conversation",
        )
    read = read_preference_jsonl if preference else read_chat_jsonl
    records = read(config.data)[: config.data_size]
    # The last 5% validate, so a training record's number is its line's (from 0).
    cut = max(1, len(records) // 20)
    train = records[:-cut] or records
    return train, records[len(train) - len(records) :] or records, f"{config.data} record"


def chat_tokenizer(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """The tokenizer and chat settings that fine-tuning checkpoint `source` to chat uses: its
    own where it has a chat template; otherwise its tokenizer with ChatML's two tokens added
    and ChatML's template."""
    tokenizer = load_tokenizer(source)
    settings = {k: v for k, v in load_chat_settings(source).items() if v is not None}
    if settings.get("chat_template"):
        return tokenizer, settings
    tokenizer.add_special_tokens(list(CHAT_TOKENS))
    return tokenizer, {"chat_template": CHATML, "eos_token": CHAT_TOKENS[1]}


def _chat_data(config: TrainConfig) -> TrainData:
    assert config.init_from is not None  # TrainConfig requires it for sft
    tokenizer, settings = chat_tokenizer(config.init_from)
    template = settings["chat_template"]
    special = {k: v for k, v in settings.items() if k.endswith("_token")}
    end = tokenizer.token_to_id(settings.get("eos_token", ""))
    if end is None:
        raise ValueError(
            f"{config.init_from}: its chat settings name eos_token "
            f"{settings.get('eos_token')!r}, which its tokenizer does not have"
        )

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    tokenized: dict[str, tuple[list[int], list[bool]]] = {}  # what `fits` measured, kept

    def fits(chat: list[dict[str, str]]) -> bool:
        key = json.dumps(chat)
        tokenized[key] = chat_tokens(chat, encode, template, **special)
        return len(tokenized[key][0]) <= config.seq_len + 1

    if config.objective in PREFERENCE_OBJECTIVES:
        return _pair_data(config, tokenizer, settings, encode, end, fits, tokenized)
    train_chats, val_chats, name = _conversations(config, fits)
    packed: list[PackedRows] = []
    learnt_chars = learnt_tokens = 0
    for chats, first in ((train_chats, 0), (val_chats, len(train_chats))):
        examples = [
            tokenized.get(json.dumps(chat))
            or chat_tokens(chat, encode, template, where=f"{name} {first + i}", **special)
            for i, chat in enumerate(chats)
        ]
        packed.append(pack_examples(examples, config.seq_len, end, where=name, first=first))
    for ids, learnt in examples:  # the validation examples: characters per learnt token
        reply = [i for i, keep in zip(ids, learnt, strict=True) if keep]
        learnt_tokens += len(reply)
        learnt_chars += len(tokenizer.decode(reply, skip_special_tokens=True)) + 1
    train, val = packed
    return TrainData(
        tokenizer,
        train.ids,
        val.ids,
        [f"{chat[-1]['content']}" for chat in val_chats],
        learnt_chars / learnt_tokens,
        train_targets=train.targets,
        train_segments=train.segments,
        val_targets=val.targets,
        val_segments=val.segments,
        eos_token_id=end,
        chat_settings={"tokenizer_class": "PreTrainedTokenizerFast", **settings},
    )


def _pair_data(
    config: TrainConfig,
    tokenizer: Any,
    settings: dict[str, Any],
    encode: Callable[[str], list[int]],
    end: int,
    fits: Callable[[list[dict[str, str]]], bool],
    tokenized: dict[str, tuple[list[int], list[bool]]],
) -> TrainData:
    """`_chat_data` for preference pairs: each pair's chosen and rejected conversation as two
    neighbouring rows. A named set leaves out the few pairs whose wrong reply no longer fits."""
    template = settings["chat_template"]
    special = {k: v for k, v in settings.items() if k.endswith("_token")}
    train_pairs, val_pairs, name = _conversations(config, fits)
    named = config.data in CHAT_DATA
    rows: list[PackedRows] = []
    for pairs, first in ((train_pairs, 0), (val_pairs, len(train_pairs))):
        sides = []
        for i, pair in enumerate(pairs):
            chats = [pair["prompt"] + pair[side] for side in ("chosen", "rejected")]
            if named and not all(map(fits, chats)):
                continue
            sides.append(
                tuple(
                    tokenized.get(json.dumps(chat))
                    or chat_tokens(chat, encode, template, where=f"{name} {first + i}", **special)
                    for chat in chats
                )
            )
        rows.append(pair_rows(sides, config.seq_len, end, where=name, first=first))
    train, val = rows
    val_tokens = int((val.targets != IGNORE).sum())
    val_chars = sum(
        len(tokenizer.decode(row[target != IGNORE].tolist(), skip_special_tokens=True)) + 1
        for row, target in zip(val.ids[:, 1:], val.targets, strict=True)
    )
    return TrainData(
        tokenizer,
        train.ids,
        val.ids,
        [pair["chosen"][-1]["content"] for pair in val_pairs],
        val_chars / val_tokens,
        train_targets=train.targets,
        val_targets=val.targets,
        eos_token_id=end,
        chat_settings={"tokenizer_class": "PreTrainedTokenizerFast", **settings},
        pairs=True,
    )

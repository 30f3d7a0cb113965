"""Conversations as training data: token ids, which of them are learnt, and packed rows.

Supervised fine-tuning teaches a model to write the assistant's turns, not the user's: the loss
counts only the tokens of the assistant's replies (and the token that ends each reply, so the
model learns to stop). `chat_tokens` writes a conversation in the model's chat template and marks
those tokens; each piece is tokenized on its own, so a reply's tokens are the ones the model
produces after the prompt at generation time.

`pack_examples` puts several examples in one training row, as pre-training packs documents, but
gives every token the number of its example (its segment): the model then attends only within a
segment and counts positions from each segment's start, so a packed row computes exactly what
the examples would compute one by one, without the padding.

`read_chat_jsonl` reads the reader's own data in the two usual shapes:
``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion": ...}``.

Preference tuning (DPO and its kin) learns from pairs: a prompt, a chosen reply and a rejected
one. `read_preference_jsonl` reads them in TRL's shape, ``{"prompt", "chosen", "rejected"}``
(text or turns), and `pair_rows` gives each reply its own row, the chosen one first, with only
the final reply learnt: the loss compares the two replies' whole log-probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..templates import render_chat

__all__ = [
    "IGNORE",
    "ChatDataError",
    "PackedRows",
    "chat_tokens",
    "pack_examples",
    "pair_rows",
    "read_chat_jsonl",
    "read_preference_jsonl",
]

IGNORE = -100  # a target that the loss skips (PyTorch's and transformers' convention)
ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """Chat data that cannot be trained on; the message names the file, the record and the field."""


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: messages must be a non-empty list of turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or set(turn) < {"role", "content"}:
            raise ChatDataError(f"{where}: messages[{i}] must have a role and a content")
        if turn["role"] not in ROLES:
            raise ChatDataError(
                f"{where}: messages[{i}].role is {turn['role']!r}; use one of {list(ROLES)}"
            )
        if not isinstance(turn["content"], str):
            raise ChatDataError(f"{where}: messages[{i}].content must be text")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise ChatDataError(f"{where}: messages[{i}] is an empty reply: nothing to learn")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise ChatDataError(f"{where}: no assistant turn: nothing to learn")
    return messages


def chat_tokens(
    messages: Sequence[dict[str, str]],
    encode: Callable[[str], list[int]],
    template: str,
    *,
    where: str = "conversation",
    **special_tokens: str | None,
) -> tuple[list[int], list[bool]]:
    """The ids of `messages` written in `template` (`encode` turns text into ids, without
    adding special tokens), and for each id whether it is learnt: the assistant's replies,
    each with the end of its turn. `where` names the example in errors."""
    messages = _check_messages(list(messages), where)
    ids: list[int] = []
    learnt: list[bool] = []
    written = ""

    def add(text: str, learn: bool) -> None:
        nonlocal written
        piece = encode(text) if text else []
        ids.extend(piece)
        learnt.extend([learn] * len(piece))
        written += text

    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:i], add_generation_prompt=True, **special_tokens)
        full = render_chat(
            template, messages[: i + 1], add_generation_prompt=False, **special_tokens
        )
        if not (prompt.startswith(written) and full.startswith(prompt)):
            raise ChatDataError(
                f"{where}: the chat template does not write each turn after the ones before it "
                "(it rewrites earlier turns), so replies cannot be marked for the loss"
            )
        add(prompt[len(written) :], False)
        reply = full[len(prompt) :]
        end = len(reply.rstrip())  # the reply and its end-of-turn token; not the newline after
        add(reply[:end], True)
        add(reply[end:], False)
    rest = render_chat(template, messages, add_generation_prompt=False, **special_tokens)
    add(rest[len(written) :], False)
    return ids, learnt


def _jsonl_records(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each object of jsonl file `path` with where it is (``path:line``); blank lines skipped.
    A file that cannot be read, or a line that is not a JSON object, is an error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ChatDataError(f"{path}: cannot read {what} ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ChatDataError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict):
            raise ChatDataError(f"{where}: each line must be a JSON object")
        yield where, record


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """The conversations of a jsonl file, one a line: ``{"messages": [...]}``, or
    ``{"prompt": ..., "completion": ...}`` (one user turn and one reply)."""
    path = Path(path)
    conversations = []
    for where, record in _jsonl_records(path, "chat data"):
        if "messages" in record:
            conversations.append(_check_messages(record["messages"], where))
        elif {"prompt", "completion"} <= set(record):
            prompt, completion = record["prompt"], record["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ChatDataError(f"{where}: prompt and completion must be text")
            conversations.append(
                _check_messages(
                    [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion},
                    ],
                    where,
                )
            )
        else:
            raise ChatDataError(
                f"{where}: a record needs messages, or prompt and completion; it has "
                f"{sorted(record)}"
            )
    if not conversations:
        raise ChatDataError(f"{path}: holds no conversations")
    return conversations


def _turns(value: Any, role: str, field: str, where: str) -> list[dict[str, str]]:
    """A preference record's field as turns: text is one turn of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ChatDataError(f"{where}: {field} must be text or a non-empty list of turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise ChatDataError(f"{where}: {field}[{i}] must have a role and a text content")
    return value


def read_preference_jsonl(path: str | Path) -> list[dict[str, list[dict[str, str]]]]:
    """The preference pairs of a jsonl file, one a line, in TRL's shape:
    ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each text (a user turn, an assistant
    turn) or a list of turns. Returned with every field as turns."""
    path = Path(path)
    pairs = []
    for where, record in _jsonl_records(path, "preference data"):
        if not {"prompt", "chosen", "rejected"} <= set(record):
            raise ChatDataError(
                f"{where}: a pair needs prompt, chosen and rejected; it has {sorted(record)}"
            )
        pair = {
            "prompt": _turns(record["prompt"], "user", "prompt", where),
            "chosen": _turns(record["chosen"], "assistant", "chosen", where),
            "rejected": _turns(record["rejected"], "assistant", "rejected", where),
        }
        for side in ("chosen", "rejected"):
            _check_messages(pair["prompt"] + pair[side], f"{where} ({side})")
            if pair[side][-1]["role"] != "assistant":
                raise ChatDataError(f"{where}: {side} must end with an assistant turn")
        pairs.append(pair)
    if not pairs:
        raise ChatDataError(f"{path}: holds no preference pairs")
    return pairs


@dataclass
class PackedRows:
    """Training rows of packed examples: `ids` (rows, L + 1) hold the tokens; a model reads
    ``ids[:, :-1]`` with `segments` (rows, L), each position's example number (padding has
    its own), and is trained on `targets` (rows, L): the next token where it is learnt and
    belongs to the same example, `IGNORE` everywhere else."""

    ids: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor


def pack_examples(
    examples: Iterable[tuple[list[int], list[bool]]],
    seq_len: int,
    pad_id: int,
    *,
    where: str = "example",
    first: int = 0,
) -> PackedRows:
    """Examples (ids and learnt marks, as `chat_tokens` gives them) placed whole into rows of
    ``seq_len + 1`` tokens in order, a new row when the next one does not fit, the rest of a
    row padded with `pad_id`. An example longer than a row is an error (cutting it would train
    on a reply without its end, or without its question) that calls it `where` and its number,
    counted from `first`."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    width = seq_len + 1
    rows: list[tuple[list[int], list[bool], list[int]]] = []
    ids: list[int] = []
    learnt: list[bool] = []
    segment: list[int] = []
    for number, (example_ids, example_learnt) in enumerate(examples):
        if len(example_ids) > width:
            raise ChatDataError(
                f"{where} {first + number}: {len(example_ids)} tokens do not fit a sequence of "
                f"{width} (seq_len + 1); shorten it or raise seq_len"
            )
        if not any(example_learnt):
            raise ChatDataError(f"{where} {first + number}: no token to learn (an empty reply?)")
        if len(ids) + len(example_ids) > width:
            rows.append((ids, learnt, segment))
            ids, learnt, segment = [], [], []
        ids += example_ids
        learnt += example_learnt
        segment += [number] * len(example_ids)
    if ids:
        rows.append((ids, learnt, segment))
    if not rows:
        raise ChatDataError(f"no {where}s to pack")
    return _packed(rows, width, pad_id)


def _packed(
    rows: list[tuple[list[int], list[bool], list[int]]], width: int, pad_id: int
) -> PackedRows:
    """Rows of (ids, learnt marks, segment numbers) padded to `width` as `PackedRows`."""
    all_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    all_learnt = torch.zeros((len(rows), width), dtype=torch.bool)
    all_segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (row_ids, row_learnt, row_segment) in enumerate(rows):
        n = len(row_ids)
        all_ids[r, :n] = torch.tensor(row_ids)
        all_learnt[r, :n] = torch.tensor(row_learnt)
        all_segments[r, :n] = torch.tensor(row_segment)
    # A target counts where the next token is learnt and of the same example as this position.
    same = all_segments[:, 1:] == all_segments[:, :-1]
    keep = same & all_learnt[:, 1:] & (all_segments[:, 1:] >= 0)
    targets = torch.where(keep, all_ids[:, 1:], torch.full_like(all_ids[:, 1:], IGNORE))
    return PackedRows(all_ids, targets, all_segments[:, :-1])


def _final_reply(learnt: list[bool]) -> list[bool]:
    """`learnt` with only its last run of learnt tokens kept: the reply being judged."""
    end = max((i + 1 for i, keep in enumerate(learnt) if keep), default=0)
    start = end
    while start > 0 and learnt[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(learnt))]


def pair_rows(
    pairs: Iterable[tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]],
    seq_len: int,
    pad_id: int,
    *,
    where: str = "pair",
    first: int = 0,
) -> PackedRows:
    """Preference pairs (the chosen and the rejected conversation, each as `chat_tokens` gives
    it) as rows of ``seq_len + 1`` tokens: row 2k the chosen reply of pair k, row 2k + 1 the
    rejected one, each row one example with only its final reply learnt. A pair too long for a
    row is an error that calls it `where` and its number, counted from `first`."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    width = seq_len + 1
    rows = []
    for number, pair in enumerate(pairs):
        for side, (ids, learnt) in zip(("chosen", "rejected"), pair, strict=True):
            if len(ids) > width:
                raise ChatDataError(
                    f"{where} {first + number}: its {side} conversation is {len(ids)} tokens, "
                    f"more than a sequence of {width} (seq_len + 1); shorten it or raise seq_len"
                )
            reply = _final_reply(learnt)
            if not any(reply):
                raise ChatDataError(f"{where} {first + number}: the {side} reply is empty")
            rows.append((ids, reply, [0] * len(ids)))
    if not rows:
        raise ChatDataError(f"no {where}s to pack")
    return _packed(rows, width, pad_id)

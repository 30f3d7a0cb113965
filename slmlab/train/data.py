"""The data of a run: documents, a tokenizer trained on them, and packed token rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import NAMED_CORPORA, corpus_texts, pack, shuffled
from ..tokenizers import END_OF_TEXT, BPETokenizer, train_bpe
from .config import TrainConfig

__all__ = ["TrainData", "build_data"]


@dataclass
class TrainData:
    tokenizer: BPETokenizer
    train: torch.Tensor  # (rows, seq_len + 1)
    val: torch.Tensor
    val_docs: list[str]
    val_chars_per_token: float  # to convert a loss per token into bits per character

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The rows of optimizer step `step`: a function of the step alone, so resuming is exact."""
        rows = self.train.shape[0]
        start = step * batch_size
        epoch, offset = divmod(start, rows)
        order = shuffled(rows, seed, epoch)
        index = order[offset : offset + batch_size]
        if len(index) < batch_size:  # the batch runs into the next epoch's order
            index = torch.cat([index, shuffled(rows, seed, epoch + 1)[: batch_size - len(index)]])
        return self.train[index]


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


def build_data(config: TrainConfig) -> TrainData:
    """Documents → tokenizer (trained on the training split) → packed rows. Deterministic."""
    train_docs, val_docs = _documents(config)
    tokenizer = train_bpe(
        train_docs,
        config.vocab_size,
        special_tokens=(END_OF_TEXT,),
        backend="tokenizers",
        superwords=config.superwords,
    )
    fast = tokenizer.to_hf()  # the same ids as tokenizer.encode (tested), much faster
    sep = tokenizer.token_id(END_OF_TEXT)
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

"""Byte-level BPE, written to be read: train, encode, decode, and Hugging Face's tokenizer.json.

Text is split into pre-tokens by GPT-2's regular expression (words with their leading space,
numbers, punctuation runs, whitespace), each pre-token is turned into its UTF-8 bytes, and
merges learned from data join frequent neighbouring pieces into longer tokens. Because the base
alphabet is the 256 byte values, every string can be encoded and decoded exactly, emoji and
all. Bytes are shown as printable characters (GPT-2's byte-to-unicode table) so that a
vocabulary is readable and the file is the one Hugging Face ``tokenizers`` reads.

With ``superwords=True`` nothing is split first: a document is one sequence of bytes, and
merges may join words across spaces ("superword" tokens, as in Liu et al.'s SuperBPE, 2025).
On a narrow domain, where whole words run out long before the vocabulary does, that is where
the compression is (chapter 02).

This implementation is the book's; `train_bpe(..., backend="tokenizers")` trains large
vocabularies with the Rust library instead, and the tests check that both encode to the very
same ids.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import regex

from ..io import atomic_write_text

__all__ = [
    "END_OF_TEXT",
    "GPT2_SPLIT",
    "BPETokenizer",
    "byte_level",
    "bytes_to_unicode",
    "hf_tokenizer_json",
    "merge_pair",
    "train_bpe",
]

# The token between documents: what training packs between them, what scoring conditions a
# text's first token on, and what generation stops at.
END_OF_TEXT = "<|endoftext|>"

GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte value ↦ a printable character (printable bytes map to themselves)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merge_pair(parts: list[str], pair: tuple[str, str]) -> list[str]:
    """One BPE merge: every occurrence of `pair` in `parts` joined, left to right, so that of
    three equal parts in a row the first two merge."""
    first, second = pair
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


def _pretokens(text: str, superwords: bool) -> list[str]:
    """The pieces that merges stay inside, each as its bytes in printable form: GPT-2's
    pre-tokens, or with `superwords` the whole text."""
    table = bytes_to_unicode()
    pieces = ([text] if text else []) if superwords else GPT2_SPLIT.findall(text)
    return ["".join(table[b] for b in piece.encode("utf-8")) for piece in pieces]


class BPETokenizer:
    """A byte-level BPE tokenizer: a vocabulary (token → id) and an ordered list of merges;
    `superwords` says whether merges may cross GPT-2's pre-token boundaries (see the module)."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Sequence[str] = (),
        *,
        superwords: bool = False,
    ) -> None:
        self.superwords = superwords
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.special_tokens = list(special_tokens)
        for token in self.special_tokens:
            if token not in self.vocab:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self._special = (
            regex.compile("(" + "|".join(map(regex.escape, self.special_tokens)) + ")")
            if special_tokens
            else None
        )
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    # --- encoding ----------------------------------------------------------------------------
    def _bpe(self, piece: str) -> list[int]:
        """Merge the characters of one pre-token, lowest-ranked pair first, until none apply."""
        if piece in self._cache:
            return self._cache[piece]
        parts = list(piece)
        while len(parts) > 1:
            ranked = [
                (self.ranks.get(pair, len(self.ranks)), i)
                for i, pair in enumerate(itertools.pairwise(parts))
            ]
            rank, _ = min(ranked)
            if rank == len(self.ranks):
                break
            parts = merge_pair(parts, self.merges[rank])
        ids = [self.vocab[p] for p in parts]
        if not self.superwords:  # words repeat; whole documents would only fill memory
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their own ids."""
        chunks = self._special.split(text) if self._special else [text]
        ids: list[int] = []
        for chunk in chunks:
            if chunk in self.special_tokens:
                ids.append(self.vocab[chunk])
            else:
                for piece in _pretokens(chunk, self.superwords):
                    ids.extend(self._bpe(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: bytes joined, then decoded as UTF-8 (invalid bytes become U+FFFD)."""
        out = bytearray()
        for i in ids:
            token = self.id_to_token[i]
            if token in self.special_tokens:
                out.extend(token.encode("utf-8"))
            else:
                out.extend(self._byte_of[c] for c in token)
        return out.decode("utf-8", errors="replace")

    # --- Hugging Face tokenizer.json ----------------------------------------------------------
    def to_str(self) -> str:
        """The tokenizer as Hugging Face ``tokenizer.json`` text."""
        steps = byte_level(use_regex=not self.superwords)
        return hf_tokenizer_json(
            self.vocab,
            self.merges,
            [(self.vocab[t], t, True) for t in self.special_tokens],
            steps,
            decoder=steps,
            indent=1,
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_str())

    def to_hf(self):  # -> tokenizers.Tokenizer
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.to_str())

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        doc = json.loads(text)
        model = doc.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"not a BPE tokenizer (model type {model.get('type')!r})")
        pre = doc.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
            raise ValueError(
                "only byte-level BPE without add_prefix_space (GPT-2 style) is supported"
            )
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        special = [t["content"] for t in doc.get("added_tokens", []) if t.get("special")]
        vocab = dict(model["vocab"])
        for t in doc.get("added_tokens", []):
            vocab.setdefault(t["content"], t["id"])
        return cls(vocab, merges, special, superwords=not pre.get("use_regex", True))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        return cls.from_str(
            (path / "tokenizer.json" if path.is_dir() else path).read_text(encoding="utf-8")
        )


def byte_level(*, use_regex: bool, add_prefix_space: bool = False) -> dict:
    """``tokenizers``' ByteLevel step (pre-tokenizer, decoder or post-processor) as JSON."""
    return {
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def hf_tokenizer_json(
    vocab: dict[str, int],
    merges: Iterable[Sequence[str]],
    added: Iterable[tuple[int, str, bool]],
    pre_tokenizer: dict,
    *,
    post_processor: dict | None = None,
    decoder: dict | None = None,
    indent: int | None = None,
) -> str:
    """A byte-level BPE as Hugging Face ``tokenizer.json`` text: `vocab` (token -> id, in GGUF
    and GPT-2's printable byte spelling), `merges` (pairs, best first), `added` tokens as
    (id, text, special) that are matched whole and never split, and the pre-tokenizer."""
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for i, text, special in added
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder or byte_level(use_regex=True),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    return json.dumps(doc, ensure_ascii=False, indent=indent)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (END_OF_TEXT,),
    backend: str = "python",
    superwords: bool = False,
) -> BPETokenizer:
    """Learn merges until the vocabulary has `vocab_size` tokens (256 bytes + merges + specials).

    ``backend="python"`` is the algorithm as the chapter tells it: count adjacent pairs over the
    pre-tokens (weighted by how often each pre-token occurs), merge the most frequent, repeat.
    ``backend="tokenizers"`` runs the same algorithm in Hugging Face's Rust implementation, for
    large corpora and vocabularies. With `superwords`, merges may cross spaces and punctuation
    (the pre-tokens are whole texts); the Python backend is then slow beyond a few hundred
    documents, since every merge rescans every document.
    """
    base = len(bytes_to_unicode()) + len(special_tokens)
    if vocab_size < base:
        raise ValueError(
            f"vocab_size must be at least {base} (256 bytes + {len(special_tokens)} special tokens)"
        )
    if backend == "tokenizers":
        return _train_with_tokenizers(texts, vocab_size, special_tokens, superwords)
    if backend != "python":
        raise ValueError(f"backend must be 'python' or 'tokenizers', got {backend!r}")

    words = Counter(piece for text in texts for piece in _pretokens(text, superwords))
    splits = {word: list(word) for word in words}
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for char in sorted(bytes_to_unicode().values()):
        vocab[char] = len(vocab)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            parts = splits[word]
            for pair in itertools.pairwise(parts):
                pairs[pair] += count
        if not pairs:
            break  # every pre-token is already a single token
        # Most frequent pair; ties go to the lexicographically smallest, so training is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        for word, parts in splits.items():
            if len(parts) < 2:
                continue
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    return BPETokenizer(vocab, merges, special_tokens, superwords=superwords)


def _train_with_tokenizers(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], superwords: bool
) -> BPETokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not superwords)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer.from_str(tok.to_str())

"""The teacher's answers kept on disk: its top k next-token probabilities at every position of
the training rows, computed once and read by every run that distils from them.

A distillation step runs the teacher forward on the student's rows, which costs several
student steps (stories-8m teaching stories-1m: about 3 times a step of plain cross-entropy). When
several students, losses or seeds learn from one teacher on one corpus, that forward pass is
the same each time; a cache pays it once. Kept whole, it would be large (a 49,152-token
vocabulary is 196 KB a position in fp32), so a position keeps the teacher's `k` most likely
tokens and their log-probabilities at the run's temperature (fp16), as the knowledge
distillation of large models does (MiniLLM's and DistillKit's top-k logits).

What the k tokens leave out, 1 − Σ p, is spread evenly over the rest of the vocabulary when
the distribution is rebuilt (`CachedTeacherHead`): every divergence stays finite (reverse KL
charges the student for mass the teacher puts nowhere), the rebuilt distribution sums to 1,
and with k equal to the vocabulary it is the teacher's own, so a cached run then trains the
student the teacher would (tested).

The cache holds the rows it was made from and is looked up by a row's tokens, so it serves any
run over the same rows, whatever its seed, batch size or steps; a row it lacks is an error
naming the file (a cache made for other data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path
from ..models.decoder import DecoderLM

__all__ = ["CachedTeacherHead", "TeacherCache", "cache_teacher"]

# The largest vocabulary whose token ids an int16 holds; above it the cache stores int32.
_INT16_VOCAB = 2**15


@dataclass(frozen=True)
class CachedTeacherHead:
    """The teacher's "head" for cached rows: a row of ``2k`` numbers (k log-probabilities,
    then their k token ids, as `TeacherCache.rows` packs them) in, the logits whose softmax
    at `temperature` is the rebuilt distribution out, so that `distillation_loss` treats a
    cached teacher as it does a live one."""

    vocab_size: int
    temperature: float

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[-1] // 2
        log_probs, ids = rows[..., :k].float(), rows[..., k:].long()
        rest = self.vocab_size - k
        if rest == 0:
            fill = torch.full_like(log_probs[..., :1], -math.inf)
        else:
            left = (1 - log_probs.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
            fill = left.log() - math.log(rest)
        dense = fill.expand(*rows.shape[:-1], self.vocab_size).clone()
        dense.scatter_(-1, ids, log_probs)
        # log p̂ sums to one, so log_softmax(T · log p̂ / T) = log p̂.
        return self.temperature * dense


class TeacherCache:
    """A cache file (`cache_teacher` writes it) opened for a run: `rows(ids)` gives the cached
    rows of a batch, `head` rebuilds the teacher's logits from them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no teacher cache here; write one with slmlab.distill.cache_teacher"
            )
        # Kept open: a batch reads its own rows of the teacher's answers from the file, so a
        # cache larger than memory serves as well (the rows' tokens, a few bytes a position,
        # are read whole to index them).
        self._file = safe_open(self.path, "pt")
        meta = self._file.metadata() or {}
        if meta.get("format") != "slmlab-teacher-cache":
            raise ValueError(f"{self.path}: not a teacher cache (format {meta.get('format')})")
        self.ids = self._file.get_tensor("ids")
        self._log_probs = self._file.get_slice("log_probs")
        self._token_ids = self._file.get_slice("token_ids")
        self.k = int(meta["k"])
        self.temperature = float(meta["temperature"])
        self.vocab_size = int(meta["vocab_size"])
        self.teacher = meta.get("teacher", "")
        self.head = CachedTeacherHead(self.vocab_size, self.temperature)
        self._index = {row.numpy().tobytes(): i for i, row in enumerate(self.ids)}

    def check(self, *, k: int, temperature: float, vocab_size: int) -> None:
        """Refuse a cache made with other settings than the run's, naming the field."""
        for field, want, have in (
            ("top_k", k, self.k),
            ("temperature", temperature, self.temperature),
        ):
            if want != have:
                raise ValueError(
                    f"{self.path}: the cache was made with {field} = {have}, the run asks for "
                    f"distill.{field} = {want}: make a new cache (another distill.cache path)"
                )
        if vocab_size != self.vocab_size:
            raise ValueError(
                f"{self.path}: the cache holds a {self.vocab_size}-token teacher, the data has "
                f"{vocab_size} tokens: it was made for another teacher"
            )

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The cached rows (B, L, 2k), fp32, of training rows `ids` (B, L + 1)."""
        picked = []
        for row in ids.to("cpu", torch.int64):
            index = self._index.get(row.to(self.ids.dtype).numpy().tobytes())
            if index is None:
                raise ValueError(
                    f"{self.path}: a training row is not in the teacher cache, which was made "
                    "for other data: remake it for this run's data (slmlab.distill.cache_teacher)"
                )
            picked.append(index)
        packed = torch.stack(
            [
                torch.cat([self._log_probs[i].float(), self._token_ids[i].float()], -1)
                for i in picked
            ]
        )  # token ids below 2^24 are exact in fp32
        return packed.to(ids.device)


@torch.no_grad()
def cache_teacher(
    teacher: DecoderLM,
    rows: torch.Tensor,
    path: str | Path,
    *,
    k: int = 16,
    temperature: float = 1.0,
    batch_size: int = 16,
    name: str = "",
    progress: bool = True,
) -> Path:
    """Write the teacher's top `k` next-token log-probabilities (at `temperature`) at every
    position of training rows `rows` (R, L + 1) to the safetensors file `path` (written
    under a temporary name, then renamed). Returns `path`."""
    vocab = teacher.config.vocab_size
    if not 0 < k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary's {vocab} tokens, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be (count, length + 1) token ids, got {tuple(rows.shape)}")
    from tqdm.auto import tqdm

    teacher.eval()
    index_dtype = torch.int16 if vocab <= _INT16_VOCAB else torch.int32
    log_probs, token_ids = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher cache", disable=not progress):
        hidden = teacher(rows[start : start + batch_size, :-1], head=False)
        for piece in hidden.split(max(1, 4096 // hidden.shape[1])):  # (rows, L, vocab) at a time
            logp = F.log_softmax(teacher.lm_head(piece).float() / temperature, dim=-1)
            top = logp.topk(k, dim=-1)
            log_probs.append(top.values.half())
            token_ids.append(top.indices.to(index_dtype))
    tensors = {
        "ids": rows.to(torch.int32 if vocab <= 2**31 else torch.int64).contiguous(),
        "log_probs": torch.cat(log_probs).contiguous(),
        "token_ids": torch.cat(token_ids).contiguous(),
    }
    meta = {
        "format": "slmlab-teacher-cache",
        "k": str(k),
        "temperature": repr(float(temperature)),
        "vocab_size": str(vocab),
        "teacher": name,
    }
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=meta)
    return Path(path)

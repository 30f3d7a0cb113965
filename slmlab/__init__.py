"""slmlab: the library behind the book *Small Language Models, from scratch to device*.

Chapters import from here; the command line ``slmlab`` is a thin shell over the same functions.
The top-level verbs are imported on first use, so ``import slmlab`` (and ``slmlab --version``)
stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "generate", "load", "load_tokenizer", "save"]

if TYPE_CHECKING:
    from .checkpoint import load, load_tokenizer, save
    from .infer.generate import generate

_LAZY = {
    "load": "slmlab.checkpoint",
    "save": "slmlab.checkpoint",
    "load_tokenizer": "slmlab.checkpoint",
    "generate": "slmlab.infer.generate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slmlab' has no attribute {name!r}")

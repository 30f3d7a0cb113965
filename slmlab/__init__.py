"""slmlab: the library behind the book *Small Language Models, from scratch to device*.

Chapters import from here; the command line ``slmlab`` is a thin shell over the same functions.
"""

__version__ = "0.1.0"

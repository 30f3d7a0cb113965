"""Experiments that combine the library's layers: a transform, then evaluation, then timing.

* `quantization`: every quantization method on one model, measured the same way (chapter 08's
  table; `benchmarks/quant_quality.py`).
"""

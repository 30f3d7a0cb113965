"""Experiments that combine the library's layers: a transform, then evaluation, then timing.

* `compare`: transforms of one model (quantized, pruned, cut), measured the same way.
* `quantization`: every quantization method on one model (chapter 08's table;
  `benchmarks/quant_quality.py`).
* `pruning`: pruning methods and sparsities on one model (chapter 09's tables and curves;
  `benchmarks/prune_quality.py`), and what training wins back after (`recovery_curve`;
  `benchmarks/prune_recovery.py`).
* `architectures`: checkpoints of different architectures, measured the same way (chapter
  03b's table; `benchmarks/architectures.py`).
"""

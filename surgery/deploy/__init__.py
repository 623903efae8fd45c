"""Deployable outputs: what other runtimes read from a saved directory.

- hf_dir.py: the layout of `save` (plain HF, compressed-tensors, or surgery-only with a config
  transformers refuses) and the inverse that `surgery.load` uses.
- compressed_tensors.py: QuantLinear <-> compressed-tensors `pack-quantized`.
- sparse.py: SparseLinear <-> a dense Linear + a bit-packed mask.
"""

"""Compression under a budget: EvoPress per-layer levels for `prune` and `quantize`, the OWL
baseline allocation, and `drop N of SEL` (EvoPress or the cosine heuristic). See
docs/passes/evopress.md."""

from . import drop, owl, prune, quantize  # noqa: F401  (registers the passes)

"""Pruning: `prune SEL to N:M | P% using magnitude() | wanda(...) | sparsegpt(...)`.

Pruned Linears become SparseLinear (mask kept as state, compact N:M saving); see
docs/passes/prune.md.
"""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (registers the passes)
from .compact import pack_nm, unpack_nm  # noqa: F401
from .semistructured import to_semi_structured  # noqa: F401
from .sparse_linear import (SparseLinear, check_masks, finalize_sparse_training,  # noqa: F401
                            set_training_step)

"""Attention surgery: swap the attention softmax for StableMax or softplus attention (LSSA/LSSAR),
plus the StableMax training utilities (StableMax cross-entropy, perpGrad)."""

from . import functional, training  # noqa: F401
from . import softplus, stablemax  # noqa: F401  (registers the passes)
from .swap import AttentionSwap, attach_swaps, is_swapped  # noqa: F401
from .training import OrthoGrad, PerpGrad, stablemax_cross_entropy  # noqa: F401

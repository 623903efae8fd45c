"""Training utilities from the StableMax paper, re-exported for library users:
StableMax cross-entropy and the perpGrad (⊥Grad, OrthoGrad) optimizer wrapper."""

from surgery.passes.attention.training import (  # noqa: F401
    OrthoGrad,
    PerpGrad,
    orthogonal_grad,
    stablemax_cross_entropy,
)

__all__ = ["OrthoGrad", "PerpGrad", "orthogonal_grad", "stablemax_cross_entropy"]

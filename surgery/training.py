"""Training utilities re-exported for library users: Cut Cross-Entropy (:func:`cce_loss`, the LM
loss without materialising logits, as the `train` statement uses it), StableMax cross-entropy
and the perpGrad (⊥Grad, OrthoGrad) optimizer wrapper from the StableMax paper."""

from surgery.passes.attention.training import (  # noqa: F401
    OrthoGrad,
    PerpGrad,
    orthogonal_grad,
    stablemax_cross_entropy,
)
from surgery.passes.train.losses import cce_loss  # noqa: F401

__all__ = ["OrthoGrad", "PerpGrad", "cce_loss", "orthogonal_grad", "stablemax_cross_entropy"]

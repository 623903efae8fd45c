"""Training: `train SEL|adapters on DATA for N steps using lm(...)|distill(...)`.

Python API: :func:`cce_loss` (Cut Cross-Entropy for users' own loops, also exported as
``surgery.training.cce_loss``).
"""

from surgery.passes.train import passes  # noqa: F401  (registers the passes)
from surgery.passes.train.losses import cce_loss

__all__ = ["cce_loss"]

"""DARE (Yu et al., "Language Models are Super Mario"): drop each task-vector entry with
probability p and rescale the survivors. In the task-vector merge it is the sparsify=dare stage;
the `dare`, `dare_ties` and `dare_linear` rows (taskvector.py) choose what follows."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def dare_drop(tau: Tensor, p: float, rescale: str, generator: torch.Generator) -> Tensor:
    """tau * (1 - m), m ~ Bernoulli(p); rescaled by 1/(1-p) ("inverse_keep_prob", the paper) or so
    that the L1 norm is kept ("l1_match", mergekit; skipped when either norm < 1e-7)."""
    if p <= 0.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p
    out = tau * keep
    if rescale == "inverse_keep_prob" and p < 1.0:
        out = out / (1.0 - p)
    elif rescale == "l1_match":
        n0, n1 = tau.abs().sum(), out.abs().sum()
        if n0 > 1e-7 and n1 > 1e-7:
            out = out * (n0 / n1)
    return out

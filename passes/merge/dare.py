"""DARE (Yu et al., "Language Models are Super Mario"): drop each task-vector entry with
probability p, rescale the survivors, then combine with task arithmetic, TIES sign election,
averaging or WIDEN."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from surgery.registry import register

from .common import MergeParams, MergePass, TensorMerger, lambda_field, tensor_seed
from .task_arithmetic import combine_task_arithmetic
from .ties import disjoint_merge, elect_sign
from .widen import widen_merge

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


class DareParams(MergeParams):
    p: float = Field(0.5, ge=0.0, le=1.0, description="drop probability of each delta entry")
    rescale: Literal["inverse_keep_prob", "l1_match", "none"] = "inverse_keep_prob"
    combine: Literal["task_arithmetic", "ties", "linear", "widen"] = "task_arithmetic"
    scale: float = lambda_field(1.0)
    weights: list[float] | None = None
    t: float = Field(1.0, gt=0.0, description="WIDEN above-average ratio (combine=widen)")
    s: float = Field(1.0, ge=0.0, description="WIDEN score calibration (combine=widen)")


class _Dare(TensorMerger):
    needs_base = True

    def merge(self, name, base, tensors, kind):
        p = self.p
        b = base.float()
        deltas = []
        for i, t in enumerate(tensors):
            g = torch.Generator().manual_seed(tensor_seed(self.seed, name, i))
            deltas.append(dare_drop(t.float() - b, p.p, p.rescale, g))
        w = self.weights(len(tensors))
        if p.combine == "task_arithmetic":
            tau = p.scale * combine_task_arithmetic(deltas, w)
        elif p.combine == "linear":
            tau = combine_task_arithmetic(deltas, w, normalize=True)
        elif p.combine == "ties":  # dare_ties: sign election on weighted deltas, no trimming
            T = torch.stack([wi * d.reshape(-1) for wi, d in zip(w, deltas)])
            tau = p.scale * disjoint_merge(T, elect_sign(T)).view(b.shape)
        else:
            return widen_merge(base, [b + d for d in deltas], p.t, p.s, kind)
        return (b + tau).to(base.dtype)


@register
class DareMerge(MergePass):
    method = "dare"
    summary = "DARE: randomly drop task-vector entries, rescale, then combine"
    Params = DareParams
    merger_cls = _Dare
    needs_base = True

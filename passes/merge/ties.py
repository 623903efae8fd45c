"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from surgery.registry import register

from .common import MergeParams, MergePass, TensorMerger, lambda_field

Tensor = torch.Tensor


def trim_topk(T: Tensor, density: float, compat: str = "exact") -> Tensor:
    """Keep the largest-magnitude entries of each row of T (N, d).

    exact (mergekit): exactly int(density*d) entries, ties broken by index.
    ties_ref (original TIES / MergeLM): threshold at the k_drop-th smallest magnitude with
    k_drop = d - int(d*density), keep |T| >= threshold: one extra entry (more with ties)."""
    if density >= 1.0:
        return T.clone()
    d = T.shape[1]
    mag = T.abs()
    if compat == "ties_ref":
        k_drop = d - int(d * density)
        if k_drop <= 0:
            return T.clone()
        thr = mag.kthvalue(k_drop, dim=1, keepdim=True).values
        return T * (mag >= thr)
    k = int(d * density)
    mask = torch.zeros_like(T, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(-mag, dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return T * mask


def elect_sign(T: Tensor) -> Tensor:
    """gamma = sign(sum_i T_i); zero entries take the majority of the elected signs."""
    gamma = torch.sign(T.sum(0))
    majority = torch.sign(gamma.sum())
    if majority == 0:
        majority = torch.ones_like(majority)
    return torch.where(gamma == 0, majority, gamma)


def disjoint_merge(T: Tensor, gamma: Tensor, how: str = "mean") -> Tensor:
    keep = ((gamma > 0) & (T > 0)) | ((gamma < 0) & (T < 0))
    sel = T * keep
    if how == "sum":
        return sel.sum(0)
    if how == "max":
        return (sel.abs().max(0).values * gamma)
    return sel.sum(0) / keep.sum(0).clamp_min(1)


def ties_combine(T: Tensor, density: float, compat: str = "exact", how: str = "mean") -> Tensor:
    """Merged task vector tau_m (d,) from stacked task vectors T (N, d)."""
    Th = trim_topk(T, density, compat)
    return disjoint_merge(Th, elect_sign(Th), how)


class TiesParams(MergeParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    lam: float = lambda_field(1.0)
    scope: Literal["per_tensor", "global"] = "per_tensor"
    compat: Literal["exact", "ties_ref"] = "exact"
    disjoint: Literal["mean", "sum", "max"] = "mean"


class _Ties(TensorMerger):
    needs_base = True

    @property
    def scope(self):
        return self.p.scope

    def combine(self, T: Tensor) -> Tensor:
        return self.p.lam * ties_combine(T, self.p.density, self.p.compat, self.p.disjoint)

    def merge(self, name, base, tensors, kind):
        T = torch.stack([(t.float() - base.float()).reshape(-1) for t in tensors])
        return (base.float() + self.combine(T).view(base.shape)).to(base.dtype)


@register
class TiesMerge(MergePass):
    method = "ties"
    summary = "TIES: trim task vectors to the top density, elect signs, average agreeing entries"
    Params = TiesParams
    merger_cls = _Ties
    needs_base = True

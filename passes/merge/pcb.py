"""PCB-merging (Du et al., NeurIPS 2024): parameter competition balancing. Follows the canonical
reference `PCB_merge` (outlier clip, intra- and inter-balancing, drop, rescale)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from surgery.registry import register

from .common import MergeParams, MergePass, TensorMerger, lambda_field

Tensor = torch.Tensor


def clamp_rows(x: Tensor, lo: float, hi: float) -> Tensor:
    """Clamp each row to [sorted[int(d*lo)], sorted[int(d*(1-hi)) - 1]] (the reference's index
    arithmetic, so the row maximum is clipped to the 2nd largest value for any hi > 0)."""
    d = x.shape[1]
    s = x.sort(dim=1).values
    mn = s[:, int(d * lo)].unsqueeze(1)
    mx = s[:, int(d * (1 - hi)) - 1].unsqueeze(1)
    return torch.maximum(torch.minimum(x, mx), mn)


def minmax_rows(x: Tensor) -> Tensor:
    mn = x.min(dim=1, keepdim=True).values
    mx = x.max(dim=1, keepdim=True).values
    return (x - mn) / (mx - mn).clamp_min(1e-12)  # eps: a constant row gives 0, not NaN


def pcb_combine(T: Tensor, ratio: float, clip: float = 1e-4, inter: str = "sum_tanh") -> Tensor:
    """Merged task vector tau_m (d,) from task vectors T (N, d); `ratio` = fraction kept."""
    n = T.shape[0]
    A = clamp_rows(T.abs(), clip, clip)
    Tc = torch.sign(T) * A  # the clipped values are what get merged
    intra = torch.exp(n * minmax_rows(A) ** 2)
    if inter == "sum_tanh":  # canonical pcb-merging.py
        inter_b = torch.tanh(T * T.sum(0, keepdim=True))
    elif inter == "pairwise_normalized":  # vision pcb_ES.py
        S = torch.sign(T) * minmax_rows(A)
        inter_b = torch.tanh(S.unsqueeze(1) * S.unsqueeze(0)).sum(1)
    else:  # paper: sum_j softmax(Norm(tau_i * tau_j)) over the parameters
        prod = T.unsqueeze(1) * T.unsqueeze(0)  # (N, N, d)
        inter_b = torch.softmax(minmax_rows(prod.reshape(n * n, -1)), dim=1).view(n, n, -1).sum(1)
    beta = intra * inter_b
    scale = minmax_rows(clamp_rows(beta, 1 - ratio, 0.0))
    return (Tc * scale).sum(0) / scale.sum(0).clamp_min(1e-12)


class PcbParams(MergeParams):
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="fraction of each task vector kept")
    scale: float = lambda_field(1.0)
    clip: float = Field(1e-4, ge=0.0, lt=0.5, description="outlier clip ratio at both ends")
    inter: Literal["sum_tanh", "pairwise_normalized", "paper_softmax"] = "sum_tanh"
    scope: Literal["per_tensor", "global"] = "per_tensor"


class _Pcb(TensorMerger):
    needs_base = True

    @property
    def scope(self):
        return self.p.scope

    def combine(self, T: Tensor) -> Tensor:
        return self.p.scale * pcb_combine(T, self.p.ratio, self.p.clip, self.p.inter)

    def merge(self, name, base, tensors, kind):
        T = torch.stack([(t.float() - base.float()).reshape(-1) for t in tensors])
        return (base.float() + self.combine(T).view(base.shape)).to(base.dtype)


@register
class PcbMerge(MergePass):
    method = "pcb"
    summary = "PCB: balance parameter competition within and across task vectors"
    Params = PcbParams
    merger_cls = _Pcb
    needs_base = True

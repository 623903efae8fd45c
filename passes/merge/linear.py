"""Weighted averaging (model soups): theta = sum_i w_i theta_i / sum_i w_i."""

from __future__ import annotations

from typing import Sequence

import torch

from surgery.registry import register

from .common import MergePass, TensorMerger, WeightedParams


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 normalize: bool = True) -> torch.Tensor:
    """sum_i w_i t_i (/ sum_i w_i), in float32: each product rounded, then added in order (the
    arithmetic of ``sum(w * t.float() ...)``, bit for bit), with one accumulator and one product
    alive instead of a new tensor per operation."""
    acc = None
    for w, t in zip(weights, tensors):
        term = t.float().mul(w) if t.dtype == torch.float32 else t.float().mul_(w)
        if acc is None:
            acc = term
        else:
            acc.add_(term)
            del term
    if normalize:
        acc.div_(sum(weights))
    return acc.to(tensors[0].dtype)


class LinearParams(WeightedParams):
    normalize: bool = True

    @property
    def divides_by_weight_sum(self) -> bool:
        return self.normalize


class _Linear(TensorMerger):
    elementwise = True
    def merge(self, name, base, tensors, kind):
        return linear_merge(tensors, self.p.weight_list(len(tensors)), self.p.normalize)


@register
class LinearMerge(MergePass):
    method = "linear"
    summary = "weighted average of the models' parameters"
    Params = LinearParams
    merger_cls = _Linear

"""Task arithmetic (Ilharco et al.): theta = theta_0 + lambda * sum_i w_i tau_i."""

from __future__ import annotations

from typing import Sequence

import torch

from surgery.registry import register

from .common import MergeParams, MergePass, TensorMerger, lambda_field


def combine_task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float],
                            normalize: bool = False) -> torch.Tensor:
    """sum_i w_i tau_i (divided by sum w_i when normalize; a ~0 divisor counts as 1, as mergekit)."""
    acc = sum(w * d for w, d in zip(weights, deltas))
    if normalize:
        s = sum(weights)
        acc = acc / (s if abs(s) >= 1e-8 else 1.0)
    return acc


class TaskArithmeticParams(MergeParams):
    scale: float = lambda_field(1.0)
    weights: list[float] | None = None
    normalize: bool = False


class _TaskArithmetic(TensorMerger):
    needs_base = True

    def merge(self, name, base, tensors, kind):
        deltas = [t.float() - base.float() for t in tensors]
        tau = combine_task_arithmetic(deltas, self.weights(len(tensors)), self.p.normalize)
        return (base.float() + self.p.scale * tau).to(base.dtype)


@register
class TaskArithmeticMerge(MergePass):
    method = "task_arithmetic"
    summary = "base + lambda * sum of task vectors"
    Params = TaskArithmeticParams
    merger_cls = _TaskArithmetic
    needs_base = True

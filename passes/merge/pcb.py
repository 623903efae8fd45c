"""PCB-merging (Du et al., NeurIPS 2024): parameter competition balancing, following the canonical
reference `PCB_merge` (outlier clip, intra- and inter-balancing, drop, rescale). In the
task-vector merge it is a sparsifier that also weights every entry (`pcb_balance`); with
combine=mean it is the paper's method (the `pcb` row in taskvector.py)."""

from __future__ import annotations

import torch

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


def pcb_balance(T: Tensor, ratio: float, clip: float = 1e-4,
                inter: str = "sum_tanh") -> tuple[Tensor, Tensor]:
    """(clipped task vectors, balance weights in [0, 1]), both (N, d), from task vectors T (N, d);
    `ratio` = fraction kept (the other weights are 0)."""
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
    return Tc, minmax_rows(clamp_rows(beta, 1 - ratio, 0.0))


def balanced_mean(Tc: Tensor, S: Tensor) -> Tensor:
    """sum_i S_i Tc_i / sum_i S_i (entries nobody keeps are 0: the reference's eps)."""
    return (Tc * S).sum(0) / S.sum(0).clamp_min(1e-12)


def pcb_combine(T: Tensor, ratio: float, clip: float = 1e-4, inter: str = "sum_tanh") -> Tensor:
    """Merged task vector tau_m (d,) from task vectors T (N, d); `ratio` = fraction kept."""
    return balanced_mean(*pcb_balance(T, ratio, clip, inter))

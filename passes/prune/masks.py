"""Mask selection from scores: N:M groups along the input axis and exact unstructured ratios.

All masks are boolean ``keep`` masks shaped like the weight ``(out, in)``: True = weight kept.
Ties are broken deterministically (stable sorts: among equal scores the lower index is kept).
"""

from __future__ import annotations

import math

import torch


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features {cols} is not divisible by M={m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def pruned_count(fraction: float, total: int) -> int:
    """How many of ``total`` weights a ``fraction`` prunes (round half up, float-noise safe)."""
    return int(math.floor(fraction * total + 0.5 + 1e-9))


def split_counts(fraction: float, sizes: list[int]) -> list[int]:
    """Prune counts per part so the parts add up to exactly ``pruned_count(fraction, sum)``.

    Cumulative rounding: part i gets count(cum_end) - count(cum_start), so no rounding error
    accumulates and every part is within one weight of its exact share.
    """
    out, start = [], 0
    for s in sizes:
        out.append(pruned_count(fraction, start + s) - pruned_count(fraction, start))
        start += s
    return out


def _keep_lowest_pruned(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise: prune the ``counts[i]`` lowest scores of row i (stable order)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous())
    return ranks >= counts.to(scores.device).view(-1, 1)


def row_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Unstructured, compared per output row (Wanda's default); total ratio exact."""
    rows, cols = scores.shape
    counts = torch.tensor(split_counts(fraction, [cols] * rows))
    return _keep_lowest_pruned(scores, counts)


def layer_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Unstructured, one threshold for the whole layer (magnitude's default); ratio exact."""
    flat = scores.reshape(1, -1)
    k = torch.tensor([pruned_count(fraction, flat.shape[1])])
    return _keep_lowest_pruned(flat, k).reshape(scores.shape)


def unstructured_keep(scores: torch.Tensor, fraction: float, scope: str) -> torch.Tensor:
    return row_keep(scores, fraction) if scope == "row" else layer_keep(scores, fraction)


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """Exactly ``n`` kept slots in every group of ``m`` consecutive inputs."""
    rows, cols = keep.shape
    if cols % m:
        return False
    return bool((keep.reshape(rows, cols // m, m).sum(-1) == n).all())

"""TIES-merging (Yadav et al., NeurIPS 2023) as stages of the task-vector merge: magnitude
trimming (sparsify=magnitude), sign election and the disjoint merge (consensus=ties). The `ties`
method itself is a row in taskvector.py."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def trim_topk(T: Tensor, density: float, compat: str = "exact") -> Tensor:
    """Keep the largest-magnitude entries of each row of T (N, d).

    exact (mergekit): exactly int(density*d) entries per row (torch.topk).
    ties_ref (original TIES / MergeLM): threshold at the k_drop-th smallest magnitude with
    k_drop = d - int(d*density), keep |T| >= threshold: one extra entry (more with ties)."""
    if density >= 1.0:
        return T.clone()
    d = T.shape[1]
    if compat == "ties_ref":
        k_drop = d - int(d * density)
        if k_drop <= 0:
            return T.clone()
        thr = T.abs().kthvalue(k_drop, dim=1, keepdim=True).values
        return T * (T.abs() >= thr)
    k = int(d * density)
    out = torch.zeros_like(T)
    if k == 0:
        return out
    for i in range(T.shape[0]):  # row by row: the working set stays a few rows, not N x d x 8
        a = T[i].abs()
        thr = a.kthvalue(d - k + 1).values  # the k-th largest magnitude
        keep = a > thr
        eq = a == thr
        need = k - int(keep.sum())
        if need < int(eq.sum()):  # ties at the threshold: the lowest indices win
            eq = torch.zeros_like(eq).index_fill_(0, eq.nonzero().squeeze(1)[:need], True)
        keep |= eq
        out[i] = T[i] * keep
    return out


def elect_sign(T: Tensor) -> Tensor:
    """gamma = sign(sum_i T_i); zero entries take the majority of the elected signs."""
    gamma = torch.sign(T.sum(0))
    majority = torch.sign(gamma.sum())
    if majority == 0:
        majority = torch.ones_like(majority)
    return torch.where(gamma == 0, majority, gamma)


CHUNK = 1 << 18  # columns per step: bounds the temporaries of large tensors


def disjoint_merge(T: Tensor, gamma: Tensor, how: str = "mean", W: Tensor | None = None) -> Tensor:
    """Combine the entries of the (weighted) deltas T that agree with the elected sign (column
    chunks: columns are independent, and temporaries stay small). `mean` divides by the number
    of agreeing models, or by their summed weights W ((N, 1) or (N, d)) when given, as mergekit's
    normalize does; a column where nobody agrees is 0 either way."""
    out = torch.empty(T.shape[1], dtype=T.dtype)
    for j in range(0, T.shape[1], CHUNK):
        t, g = T[:, j:j + CHUNK], gamma[j:j + CHUNK]
        keep = (t * g) > 0  # same sign as gamma (zeros never count)
        sel = t * keep
        if how == "sum":
            out[j:j + CHUNK] = sel.sum(0)
        elif how == "max":
            out[j:j + CHUNK] = sel.abs().max(0).values * g
        elif W is None:
            out[j:j + CHUNK] = sel.sum(0) / keep.sum(0, dtype=t.dtype).clamp_min(1)
        else:
            w = W if W.shape[1] == 1 else W[:, j:j + CHUNK]
            den = (w * keep).sum(0)
            out[j:j + CHUNK] = sel.sum(0) / torch.where(den == 0, torch.ones_like(den), den)
    return out


def ties_combine(T: Tensor, density: float, compat: str = "exact", how: str = "mean") -> Tensor:
    """Merged task vector tau_m (d,) from stacked task vectors T (N, d)."""
    Th = trim_topk(T, density, compat)
    return disjoint_merge(Th, elect_sign(Th), how)


def ties_lean(base: Tensor, tensors: list[Tensor], density: float, compat: str = "exact",
              how: str = "mean", weights: Sequence[float] | None = None) -> Tensor:
    """ties_combine for one tensor with a working set of a few copies of it, whatever the number
    of models: per-model thresholds first, then column chunks recomputed from the inputs.
    Identical results (tested). `weights` multiply each trimmed task vector before the election
    (mergekit's weighted deltas)."""
    ct = torch.promote_types(base.dtype, torch.float32)  # float64 stays float64
    b = base.reshape(-1).to(ct)
    d = b.numel()
    flat = [t.reshape(-1) for t in tensors]
    k = int(d * density)
    thr, quota = [], []
    for t in flat:  # pass 1: each model's magnitude threshold (and how many ties it may keep)
        if density >= 1.0 or (compat == "ties_ref" and d - k <= 0):
            thr.append(None)
            quota.append(0)
            continue
        a = (t.to(ct) - b).abs_()
        if compat == "ties_ref":
            thr.append(a.kthvalue(d - k).values)
            quota.append(-1)  # keep every entry >= threshold
        elif k == 0:
            thr.append(torch.tensor(float("inf")))
            quota.append(0)
        else:
            th = a.kthvalue(d - k + 1).values
            thr.append(th)
            quota.append(k - int((a > th).sum()))
        del a

    def trimmed(i, j, left):
        tau = flat[i][j:j + CHUNK].to(ct) - b[j:j + CHUNK]
        if thr[i] is None:
            return tau
        a = tau.abs()
        if quota[i] < 0:
            return tau * (a >= thr[i])
        keep = a > thr[i]
        eq = (a == thr[i]).nonzero().squeeze(1)[: left[i]]
        left[i] -= eq.numel()
        keep[eq] = True
        return tau * keep

    def weighted(i, j, left):
        tau = trimmed(i, j, left)
        return tau if weights is None else weights[i] * tau

    left = list(quota)
    gsum = 0.0
    for j in range(0, d, CHUNK):  # pass 2: the majority of the elected signs
        T = torch.stack([weighted(i, j, left) for i in range(len(flat))])
        gsum += float(torch.sign(T.sum(0)).sum())
    majority = 1.0 if gsum >= 0 else -1.0
    W = None if weights is None else torch.tensor(list(weights), dtype=ct).unsqueeze(1)
    out = torch.empty(d, dtype=ct)
    left = list(quota)
    for j in range(0, d, CHUNK):  # pass 3: elect and merge chunk by chunk
        T = torch.stack([weighted(i, j, left) for i in range(len(flat))])
        g = torch.sign(T.sum(0))
        g = torch.where(g == 0, torch.full_like(g, majority), g)
        out[j:j + CHUNK] = disjoint_merge(T, g, how, W)
    return out.view(base.shape)

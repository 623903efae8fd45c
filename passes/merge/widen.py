"""WIDEN (Yu et al., arXiv 2408.03092): disentangle weights into magnitude and direction per input
column, rank each model's change against the base, and weight the task vectors column-wise.
In the task-vector merge it is the combine=widen stage (the `widen` row in taskvector.py)."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor
EPS = 1e-12


def stable_rank(x: Tensor) -> Tensor:
    """Position of each entry in a stable ascending sort of its row, divided by the row length."""
    order = torch.argsort(x, dim=1, stable=True)
    r = torch.empty_like(order)
    ar = torch.arange(x.shape[1]).expand_as(order)
    r.scatter_(1, order, ar)
    return r.to(x.dtype) / x.shape[1]


def importance(S: Tensor, t: float, s: float) -> Tensor:
    """softmax over models per column; entries above t x their model's mean get the score s."""
    score = torch.softmax(S, dim=0)
    mask = S > S.mean(dim=1, keepdim=True) * t
    return torch.where(mask, torch.full_like(score, s), score)


def widen_matrix(W0: Tensor, Ws: Sequence[Tensor], t: float, s: float,
                 scale: float = 1.0) -> Tensor:
    """W (out, in): magnitude = column norms, direction = normalised columns."""
    m0 = W0.norm(dim=0)
    D0 = W0 / m0.clamp_min(EPS)
    dm, dd = [], []
    for W in Ws:
        m = W.norm(dim=0)
        D = W / m.clamp_min(EPS)
        cos = (D * D0).sum(0)
        cos = torch.where((m < EPS) | (m0 < EPS), torch.ones_like(cos), cos)  # zero column
        dm.append((m - m0).abs())
        dd.append(1.0 - cos)
    score_mag = importance(stable_rank(torch.stack(dm)), t, s)
    score_dir = importance(stable_rank(torch.stack(dd)), t, s)
    w = 0.5 * (score_mag + score_dir)
    return W0 + scale * sum((W - W0) * w[i].unsqueeze(0) for i, W in enumerate(Ws))


def widen_vector(b0: Tensor, bs: Sequence[Tensor], t: float, s: float,
                 scale: float = 1.0) -> Tensor:
    """1-D parameters (and any tensor that is not a Linear/Embedding/conv weight): raw |delta|."""
    S = torch.stack([(b - b0).abs().reshape(-1) for b in bs])
    score = importance(S, t, s)
    flat = b0.reshape(-1) + scale * sum((b - b0).reshape(-1) * score[i] for i, b in enumerate(bs))
    return flat.view(b0.shape)


def widen_merge(base: Tensor, tensors: Sequence[Tensor], t: float, s: float, kind: str,
                scale: float = 1.0) -> Tensor:
    """Merged tensor; `scale` (lambda) multiplies the weighted sum of task vectors."""
    ct = torch.promote_types(base.dtype, torch.float32)  # float64 stays float64
    b = base.to(ct)
    ts = [x.to(ct) for x in tensors]
    if kind == "embedding" and b.ndim == 2:  # rows are tokens: treat tokens as input columns
        out = widen_matrix(b.T, [x.T for x in ts], t, s, scale).T
    elif kind == "matrix" and b.ndim == 2:
        out = widen_matrix(b, ts, t, s, scale)
    elif kind == "conv" and b.ndim > 2:  # extension: conv weights as (out, in*k)
        shp = b.shape
        out = widen_matrix(b.reshape(shp[0], -1), [x.reshape(shp[0], -1) for x in ts], t, s,
                           scale)
        out = out.view(shp)
    else:
        out = widen_vector(b, ts, t, s, scale)
    return out.to(base.dtype)

"""Shared helpers for the attention-swap tests: run the pass and a direct reference of the new
attention written from the papers' formulas (independent of passes/attention/functional.py)."""

import math

import torch
import torch.nn.functional as F

from surgery.passapi import RunContext
from surgery.progress import Progress
from surgery.registry import get_pass


def swap(model, paths, method="stablemax", data=None, **params):
    P = get_pass("swap", method)
    p = P(P.Params(**params))
    mods = {path: model.get_submodule(path) for path in paths}
    ctx = RunContext(model=model, models={}, data=data or {}, progress=Progress())
    return p.run(ctx, mods).report


def ref_weights(kind, q, k, keep, scale=None, p=15.0, reweight=False, eps=1e-8):
    """q (..., L, D), k (..., S, D), keep bool (..., L, S). Float64, plain formulas."""
    q, k = q.double(), k.double()
    keep = keep.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
    if kind == "stablemax":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        x = q @ k.transpose(-2, -1) * scale
        sx = torch.where(x >= 0, x + 1, 1 / (1 - x))
        sx = torch.where(keep, sx, torch.zeros_like(sx))
        return sx / sx.sum(-1, keepdim=True)
    n = keep.sum(-1, keepdim=True).double()
    cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-2, -1)
    z = math.log(q.shape[-1]) * torch.log(n) * cos
    a = F.softplus(z) * keep
    a = a / (a.sum(-1, keepdim=True) + eps)
    if not reweight:
        return a
    o = (n > 3).double()
    r = torch.relu(n * a - o) ** p * keep
    return r / (r.sum(-1, keepdim=True) + eps)


def collect_weights(module):
    """Record (weights, visible) of every rewrite in a swapped module."""
    seen = []
    remove = module.attention_swap.register_weights_hook(lambda w, vis: seen.append((w.detach(), vis)))
    return seen, remove


def check_rows(seen, keep_fn=None):
    """Rows that see at least one key sum to 1; masked entries are exactly 0."""
    assert seen, "no attention weights were observed"
    for w, vis in seen:
        vis = vis.expand_as(w) if vis is not None else torch.ones_like(w, dtype=torch.bool)
        assert (w.masked_select(~vis) == 0).all()
        live = vis.any(-1)
        sums = w.sum(-1)
        assert torch.allclose(sums[live], torch.ones_like(sums[live]), atol=1e-5)
        if keep_fn is not None:
            keep = keep_fn(w).expand_as(w)
            assert torch.equal(vis, keep)

"""PLeaS step 4 ("LeaS"): refit each Linear/Conv2d of the partially merged model so its output
matches the permuted ensemble features of the two original models, layer by layer with teacher
forcing (inputs are the permuted/averaged original features, as in the reference).

Solvers: "closed_form" (default): ridge least squares from accumulated X^T X and X^T Y, per
output block over its allowed input columns (merged outputs read all inputs; model-k-only outputs
read merged + model-k-only inputs), regularised towards the merged initialisation with
lambda = ridge * trace(X^T X) / dim. "adam": the reference's joint gradient fit (Adam, cosine
schedule, MSE) with the cross-model blocks' gradients masked so they stay exactly zero.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .partial import Blocks

Tensor = torch.Tensor


@dataclass
class LayerPlan:
    path: str  # layer in the merged model
    src1: str  # path of the input-capturing layer in model 1 / model 2
    src2: str
    in_b: Blocks
    out_b: Blocks
    role: str = "both"  # "both" | "m1" | "m2" (a separate head fed by the merged layout)


def assemble(a1: Tensor, a2: Tensor, b: Blocks, dim: int) -> Tensor:
    parts = []
    if b.n_m:
        parts.append((a1.index_select(dim, b.qm) + a2.index_select(dim, b.pm)) / 2)
    if b.n_s:
        parts += [a1.index_select(dim, b.qs), a2.index_select(dim, b.ps)]
    return torch.cat(parts, dim)


def _seg_masks(b: Blocks) -> dict[str, Tensor]:
    w = b.width
    idx = torch.arange(w)
    return {"m": idx < b.n_m, "s1": (idx >= b.n_m) & (idx < b.n_m + b.n_s),
            "s2": idx >= b.n_m + b.n_s}


def allowed_inputs(in_b: Blocks, out_seg: str) -> Tensor:
    s = _seg_masks(in_b)
    if out_seg == "m":
        return torch.ones(in_b.width, dtype=torch.bool)
    return s["m"] | s[out_seg]


def _out_segments(p: LayerPlan, cout: int):
    if p.role == "m1":
        return [("s1", torch.ones(cout, dtype=torch.bool))]
    if p.role == "m2":
        return [("s2", torch.ones(cout, dtype=torch.bool))]
    return [(k, v) for k, v in _seg_masks(p.out_b).items() if v.any()]


class _Inputs:
    """Forward hooks storing the input of named layers."""

    def __init__(self, model: nn.Module, paths):
        self.store: dict[str, Tensor] = {}
        self.hooks = []
        for path in set(paths):
            mod = model.get_submodule(path)
            self.hooks.append(mod.register_forward_hook(
                lambda m, a, o, path=path: self.store.__setitem__(path, a[0].detach())))

    def remove(self):
        for h in self.hooks:
            h.remove()


def _xy(p: LayerPlan, layer: nn.Module, l1: nn.Module, l2: nn.Module, ip1, ip2):
    dim = 1 if isinstance(layer, nn.Conv2d) else -1
    X = assemble(ip1, ip2, p.in_b, dim)
    if p.role == "m1":
        Y = l1(ip1)
    elif p.role == "m2":
        Y = l2(ip2)
    else:
        Y = assemble(l1(ip1), l2(ip2), p.out_b, dim)
    return X, Y


def _rows(layer: nn.Module, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(X, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), \
            Y.flatten(2).transpose(1, 2).reshape(-1, Y.shape[1])
    return X.reshape(-1, X.shape[-1]), Y.reshape(-1, Y.shape[-1])


def _forward_all(m1, m2, x):
    with torch.no_grad():
        for m in (m1, m2):
            m(*x) if isinstance(x, (tuple, list)) else m(x)


def accumulate(merged, m1, m2, plans: list[LayerPlan], batches, progress=None) -> dict:
    """Per layer: [X^T X, X^T Y, sum Y^2, count] in float64 (X with a ones column for the bias)."""
    cap1, cap2 = _Inputs(m1, [p.src1 for p in plans]), _Inputs(m2, [p.src2 for p in plans])
    acc: dict[str, list] = {}
    try:
        with (progress.task("PLeaS least squares: features", total=len(batches))
              if progress else _null()) as t:
            for x in batches:
                _forward_all(m1, m2, x)
                with torch.no_grad():
                    for p in plans:
                        layer = merged.get_submodule(p.path)
                        X, Y = _xy(p, layer, m1.get_submodule(p.src1), m2.get_submodule(p.src2),
                                   cap1.store[p.src1], cap2.store[p.src2])
                        Xr, Yr = _rows(layer, X, Y)
                        Xr = torch.cat([Xr, torch.ones(Xr.shape[0], 1)], 1).double()
                        Yr = Yr.double()
                        a = acc.setdefault(p.path, [0, 0, 0, 0])
                        a[0] = a[0] + Xr.T @ Xr
                        a[1] = a[1] + Xr.T @ Yr
                        a[2] = a[2] + (Yr * Yr).sum()
                        a[3] += Yr.numel()
                if t:
                    t.advance()
    finally:
        cap1.remove()
        cap2.remove()
    return acc


def _augmented(layer) -> Tensor:
    W = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    b = layer.bias.detach().double() if layer.bias is not None else \
        torch.zeros(W.shape[0], dtype=torch.float64)
    return torch.cat([W, b[:, None]], 1)  # (out, D+1)


def layer_losses(merged, m1, m2, plans, batches) -> dict[str, float]:
    """Teacher-forced MSE of each layer's current weights (the objective both solvers minimise)."""
    acc = accumulate(merged, m1, m2, plans, batches)
    return {p.path: _mse(_augmented(merged.get_submodule(p.path)), *acc[p.path]) for p in plans}


def fit_closed_form(merged, m1, m2, plans: list[LayerPlan], batches, ridge: float = 1e-4,
                    progress=None) -> dict[str, tuple[float, float]]:
    """Returns {layer: (mse before, mse after)} on the fitting data."""
    acc = accumulate(merged, m1, m2, plans, batches, progress)
    losses = {}
    for p in plans:
        layer = merged.get_submodule(p.path)
        G, H, yy, count = acc[p.path]
        Wa = _augmented(layer)
        W = Wa[:, :-1]  # (out, in * kernel positions)
        before = _mse(Wa, G, H, yy, count)
        k = W.shape[1] // p.in_b.width  # conv: kernel positions per input channel
        new = Wa.clone()
        for seg, rows in _out_segments(p, W.shape[0]):
            cols = allowed_inputs(p.in_b, seg).repeat_interleave(k)
            cols = torch.cat([cols, torch.ones(1, dtype=torch.bool)])  # bias column
            if layer.bias is None:
                cols[-1] = False
            Gaa = G[cols][:, cols]
            lam = ridge * torch.trace(Gaa) / Gaa.shape[0]
            W0 = Wa[rows][:, cols]
            rhs = H[cols][:, rows] - Gaa @ W0.T
            delta = torch.linalg.solve(Gaa + lam * torch.eye(Gaa.shape[0], dtype=Gaa.dtype), rhs)
            blk = new[rows]
            blk[:, cols] = W0 + delta.T
            new[rows] = blk
        after = _mse(new, G, H, yy, count)
        with torch.no_grad():
            layer.weight.copy_(new[:, :-1].reshape(layer.weight.shape).to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(new[:, -1].to(layer.bias.dtype))
        losses[p.path] = (before, after)
    return losses


def _mse(Wa, G, H, yy, count) -> float:
    return float((torch.einsum("od,de,oe->", Wa, G, Wa) - 2 * (Wa * H.T).sum() + yy) / count)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def cross_block_mask(p: LayerPlan, weight: Tensor) -> Tensor:
    """1 where a weight may train, 0 on the cross-model blocks (the [proj] fix of the reference's
    transposed mask: rows are outputs, columns inputs)."""
    mask = torch.ones(weight.shape[0], weight.shape[1])
    for seg, rows in _out_segments(p, weight.shape[0]):
        cols = allowed_inputs(p.in_b, seg)
        mask[rows.nonzero().squeeze(1)[:, None], (~cols).nonzero().squeeze(1)[None, :]] = 0
    return mask.view(*mask.shape, *([1] * (weight.ndim - 2)))


def fit_adam(merged, m1, m2, plans: list[LayerPlan], batches, steps: int = 400, lr: float = 5e-4,
             progress=None) -> list[float]:
    """The reference's solver: one Adam over all layers, MSE per layer summed, cosine schedule.
    Returns the loss per step."""
    layers = {p.path: merged.get_submodule(p.path) for p in plans}
    params = [q for m in layers.values() for q in m.parameters()]
    masks = {p.path: cross_block_mask(p, layers[p.path].weight) for p in plans}
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    cap1, cap2 = _Inputs(m1, [p.src1 for p in plans]), _Inputs(m2, [p.src2 for p in plans])
    losses = []
    try:
        with (progress.task("PLeaS least squares (adam)", total=steps) if progress else _null()) as t:
            for _, x in zip(range(steps), itertools.cycle(batches)):
                _forward_all(m1, m2, x)
                loss = 0.0
                for p in plans:
                    with torch.no_grad():
                        X, Y = _xy(p, layers[p.path], m1.get_submodule(p.src1),
                                   m2.get_submodule(p.src2), cap1.store[p.src1], cap2.store[p.src2])
                    loss = loss + F.mse_loss(layers[p.path](X), Y)
                opt.zero_grad()
                loss.backward()
                for p in plans:
                    layers[p.path].weight.grad.mul_(masks[p.path])
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if t:
                    t.advance()
    finally:
        cap1.remove()
        cap2.remove()
    return losses

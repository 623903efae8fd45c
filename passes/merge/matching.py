"""Matching units of two networks: weight matching (Git Re-Basin permutation coordinate descent)
and activation matching, both solved with linear assignment (scipy)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from surgery.progress import Progress

from .permspec import PermSpec

Tensor = torch.Tensor
_SKIP = ("running_mean", "running_var", "num_batches_tracked")  # statistics are not matched


def lsa(C: Tensor) -> Tensor:
    """P with unit i of A matched to unit P[i] of B, maximising sum_i C[i, P[i]]."""
    from scipy.optimize import linear_sum_assignment  # lazy: 0.5 s to import, only merges need it

    rows, cols = linear_sum_assignment(C.detach().cpu().numpy(), maximize=True)
    assert (rows == list(range(C.shape[0]))).all()
    return torch.as_tensor(cols, dtype=torch.long)


def _weight_cost(spec: PermSpec, gi: int, A: dict, B: dict, perms: dict, abt: dict) -> Tensor:
    g = spec.groups[gi]
    n = g.size
    C = torch.zeros(n, n, dtype=torch.float64)
    for name, ax in g.state:
        if name.endswith(_SKIP):
            continue
        wa, wb = A[name].double(), B[name].double()
        for ax2, gj in abt[name].items():  # B permuted on every other axis (incl. same group)
            if ax2 != ax:
                wb = torch.index_select(wb, ax2, perms[gj])
        C += torch.movedim(wa, ax, 0).reshape(n, -1) @ torch.movedim(wb, ax, 0).reshape(n, -1).T
    return C


def weight_matching(spec: PermSpec, A: dict, B: dict, *, max_iter: int = 100, seed: int = 0,
                    init: dict | None = None, progress=None) -> tuple[dict, dict]:
    """Permutation coordinate descent. Returns (perms, costs): `apply_perm(spec, perms, B)` aligns
    B to A; `costs[g]` is the final cost matrix in B's ORIGINAL unit order (the reference stores
    it in permuted coordinates and then indexes it with the permutation; fixed here)."""
    abt = spec.axes_by_tensor()
    perms = {gi: (init[gi].clone() if init and gi in init else torch.arange(g.size))
             for gi, g in enumerate(spec.groups)}
    rng = torch.Generator().manual_seed(seed)
    iters = 0
    with (progress or Progress()).task("weight matching", total=max_iter) as task:
        for _ in range(max_iter):
            iters += 1
            improved = False
            for gi in torch.randperm(len(spec.groups), generator=rng).tolist():
                C = _weight_cost(spec, gi, A, B, perms, abt)
                new = lsa(C)
                ar = torch.arange(C.shape[0])
                old_l, new_l = C[ar, perms[gi]].sum(), C[ar, new].sum()
                improved |= bool(new_l > old_l + 1e-12 * max(1.0, abs(float(old_l))))
                perms[gi] = new
            task.advance()
            if not improved:
                break
    costs = {gi: _weight_cost(spec, gi, A, B, perms, abt) for gi in range(len(spec.groups))}
    return perms, costs


class _Capture(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.out = wanted, {}

    def run_node(self, n):
        r = super().run_node(n)
        if n.name in self.wanted:
            self.out[n.name] = r
        return r


def _traced_units(model: nn.Module, spec: PermSpec) -> dict[str, fx.GraphModule]:
    return {u: fx.symbolic_trace(model.get_submodule(u) if u else model) for u in spec.units}


def collect_activations(spec: PermSpec, model: nn.Module, x,
                        units: dict | None = None) -> dict[tuple[str, str], Tensor]:
    """Outputs of every graph node that carries a group's units, for one input batch."""
    wanted: dict[str, set] = {}
    for g in spec.groups:
        for unit, node, _ in g.nodes:
            wanted.setdefault(unit, set()).add(node)
    units = units if units is not None else _traced_units(model, spec)
    found: dict = {}
    hooks = []
    for unit, gm in units.items():
        mod = model.get_submodule(unit) if unit else model

        def hook(m, args, out, unit=unit, gm=gm):
            cap = _Capture(gm, wanted.get(unit, set()))
            cap.run(*args)
            for k, v in cap.out.items():
                found[(unit, k)] = v
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x) if not isinstance(x, (tuple, list)) else model(*x)
    finally:
        for h in hooks:
            h.remove()
    return found


class CrossStats:
    """Sums over data of the statistics every similarity needs, per group."""

    def __init__(self, n: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sxy, self.sx, self.sy, self.sxx, self.syy, self.count = z(n, n), z(n), z(n), z(n), z(n), 0

    def add(self, x: Tensor, y: Tensor):
        self.sxy += x @ y.T
        self.sx += x.sum(1)
        self.sy += y.sum(1)
        self.sxx += (x * x).sum(1)
        self.syy += (y * y).sum(1)
        self.count += x.shape[1]

    def similarity(self, kind: str) -> Tensor:
        c = max(self.count, 1)
        if kind == "inner":  # E[a b^T]
            return self.sxy / c
        if kind == "pearson":
            mx, my = self.sx / c, self.sy / c
            cov = self.sxy / c - torch.outer(mx, my)
            sdx = (self.sxx / c - mx ** 2).clamp_min(0).sqrt()
            sdy = (self.syy / c - my ** 2).clamp_min(0).sqrt()
            return torch.nan_to_num(cov / torch.outer(sdx, sdy), nan=0.0, posinf=0.0, neginf=0.0)
        d2 = self.sxx[:, None] + self.syy[None, :] - 2 * self.sxy  # neg_l2 (PLeaS default)
        return -d2.clamp_min(0).sqrt()


def activation_matching(spec: PermSpec, m1: nn.Module, m2: nn.Module, batches: Iterable,
                        *, similarity: str = "neg_l2", progress=None) -> tuple[dict, dict]:
    """Match units by their activations on the same inputs, summed over every graph node of the
    group (layer outputs, norms, activations, residual sums). Returns (perms, similarity)."""
    stats = {gi: CrossStats(g.size) for gi, g in enumerate(spec.groups)}
    batches = list(batches)
    u1, u2 = _traced_units(m1, spec), _traced_units(m2, spec)
    with (progress or Progress()).task("activation matching", total=len(batches)) as task:
        for x in batches:
            a1, a2 = collect_activations(spec, m1, x, u1), collect_activations(spec, m2, x, u2)
            for gi, g in enumerate(spec.groups):
                for unit, node, ax in g.nodes:
                    if (unit, node) not in a1:
                        continue
                    xa = torch.movedim(a1[(unit, node)].double(), ax, 0).reshape(g.size, -1)
                    xb = torch.movedim(a2[(unit, node)].double(), ax, 0).reshape(g.size, -1)
                    stats[gi].add(xa, xb)
            task.advance()
    costs = {gi: s.similarity(similarity) for gi, s in stats.items()}
    return {gi: lsa(C) for gi, C in costs.items()}, costs

"""DSnoT (``zyxxmu/DSnoT: prune_DSnoT``; ops.md §7.2): training-free prune-and-grow on a mask.

Per output row i the expected reconstruction error of the pruned weights is
``e_i = Σ_{j pruned} W_ij · x̄_j``. Each cycle regrows one pruned weight (if e_i > 0 the one with
the largest ``W_ij x̄_j / Var(x_j)^γ``, else the smallest, walking the sorted list from that end)
and prunes one kept weight: for N:M the kept weight of the regrown weight's group with the smallest
initial metric; unstructured the next one from the pool [negative W·x̄ by ascending Wanda score …
positive W·x̄ by descending Wanda score], from the front if e_i >= 0, from the back if e_i < 0.
A swap is accepted while |e_i| > threshold and sign(e_i after) equals the initial sign; the first
rejection freezes the row. Weight values never change.

Fixes over the reference (it can prune more or fewer weights than asked): a candidate that is not
a valid swap (the regrow candidate is already kept, the prune candidate already pruned, or the
group has no initially kept weight left) is skipped instead of swapped; a row whose candidate list
is used up stops; zero variances are floored at 1e-12 (the reference divides by zero).
"""

from __future__ import annotations

import torch

VAR_FLOOR = 1e-12


def dsnot(W: torch.Tensor, keep: torch.Tensor, initial_metric: torch.Tensor, wanda_metric: torch.Tensor,
          mean: torch.Tensor, var: torch.Tensor, *, n: int | None = None, m: int | None = None,
          max_cycles: int = 50, threshold: float = 0.1, gamma: float = 1.0,
          same_sign: bool = True) -> torch.Tensor:
    """Return the refined keep mask (same number of kept weights in every row / N:M group).

    ``same_sign=False`` drops the sign condition (a swap then needs only |e_i| > threshold): what
    the reference runs for unstructured sparsity by default (its ``--without_same_sign`` is a
    ``type=bool`` flag defaulting to True); ops.md §7.2 and the reference's N:M path keep it.
    """
    W = W.float()
    rows, cols = W.shape
    keep = keep.clone()
    init_keep = keep.clone()
    ar = torch.arange(rows)
    dm = W * mean.view(1, -1).float()  # the DSnoT metric W_ij x̄_j
    e = (dm * ~keep).sum(1)
    sign0 = torch.sign(e)
    grow_key = dm / var.float().clamp_min(VAR_FLOOR).view(1, -1) ** gamma if gamma else dm
    # regrow candidates: pruned weights, ascending (smallest first) and descending lists
    asc = torch.sort(grow_key.masked_fill(keep, float("inf")), dim=1, stable=True).indices
    desc = torch.sort(grow_key.masked_fill(keep, float("-inf")), dim=1, descending=True,
                      stable=True).indices
    n_grow = (~keep).sum(1)
    ptr_lo = torch.zeros(rows, dtype=torch.long)
    ptr_hi = torch.zeros(rows, dtype=torch.long)
    if n is None:
        pool, n_pool = _prune_pool(dm, wanda_metric.float(), keep)
        pf = torch.zeros(rows, dtype=torch.long)
        pb = n_pool - 1
    else:
        metric = initial_metric.float().clone()
    active = torch.ones(rows, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        up = e > 0
        grow_ptr = torch.where(up, ptr_hi, ptr_lo)
        in_range = grow_ptr < n_grow
        gi = torch.where(up, desc.gather(1, ptr_hi.clamp_max(cols - 1).view(-1, 1)).view(-1),
                         asc.gather(1, ptr_lo.clamp_max(cols - 1).view(-1, 1)).view(-1))
        if n is None:
            front = e >= 0
            in_range &= pf <= pb
            pi = pool.gather(1, torch.where(front, pf, pb).clamp(0, cols - 1).view(-1, 1)).view(-1)
        else:  # the initially kept weight of the same group with the smallest initial metric
            start = gi - gi % m
            cols_g = start.view(-1, 1) + torch.arange(m).view(1, -1)
            cand = metric.gather(1, cols_g).masked_fill(~(init_keep & keep).gather(1, cols_g),
                                                        float("inf"))
            best = cand.argmin(1)
            in_range &= torch.isfinite(cand.gather(1, best.view(-1, 1)).view(-1))
            pi = cols_g.gather(1, best.view(-1, 1)).view(-1)
        valid = in_range & ~keep[ar, gi] & keep[ar, pi]
        e_after = e + dm[ar, pi] - dm[ar, gi]
        ok = e.abs() > threshold
        if same_sign:
            ok &= torch.sign(e_after) == sign0
        accept = active & valid & ok
        active &= in_range & (~valid | ok)  # a rejected valid swap freezes the row
        keep[ar[accept], pi[accept]] = False
        keep[ar[accept], gi[accept]] = True
        e = torch.where(accept, e_after, e)
        # advance the pointers that were used this cycle
        stepped = active | accept
        ptr_hi = torch.where(stepped & up, ptr_hi + 1, ptr_hi)
        ptr_lo = torch.where(stepped & ~up, ptr_lo + 1, ptr_lo)
        if n is None:
            pf = torch.where(stepped & front, pf + 1, pf)
            pb = torch.where(stepped & ~front, pb - 1, pb)
    return keep


def _prune_pool(dm: torch.Tensor, wanda: torch.Tensor, keep: torch.Tensor):
    """Kept weights ordered [W·x̄ < 0 by ascending Wanda, W·x̄ = 0, W·x̄ > 0 by descending Wanda];
    pruned weights sort after them. Returns (order, count of kept per row)."""
    secondary = torch.where(dm > 0, -wanda, torch.where(dm < 0, wanda, torch.zeros_like(wanda)))
    order = torch.sort(secondary, dim=1, stable=True).indices
    primary = torch.where(~keep, 3, torch.where(dm < 0, 0, torch.where(dm > 0, 2, 1)))
    order2 = torch.sort(primary.gather(1, order), dim=1, stable=True).indices
    return order.gather(1, order2), keep.sum(1)

"""SparseGPT (``IST-DASLab/sparsegpt: fasterprune``; ops.md §7.2) as a pure function of (W, H).

Columns are processed in lazy blocks; saliency ``w² / Hinv_jj²``; each pruned weight's error is
spread over the later columns of its row (OBS update ``W[:, j:] -= err ⊗ Hinv[j, j:]``), then the
block's accumulated error updates the columns after the block.
Differences from the reference, on purpose: N:M keeps N (our convention) and groups are aligned
to global columns (the block size is rounded down to a multiple of M); unstructured prunes exactly
its share of each block (the reference's ``<= quantile`` prunes one extra weight and more on ties).
"""

from __future__ import annotations

import torch

from surgery.passes.calib import prepare_hessian

from .masks import nm_keep, split_counts


def sparsegpt(W: torch.Tensor, H: torch.Tensor, *, n: int | None = None, m: int | None = None,
              fraction: float | None = None, blocksize: int = 128, percdamp: float = 0.01,
              consume_hessian: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (new weight in W's dtype, keep mask). Give either ``n, m`` or ``fraction``.
    ``consume_hessian``: H (float32) may be overwritten, saving a copy of it."""
    rows, cols = W.shape
    H = H if consume_hessian and H.dtype == torch.float32 else H.clone().float()
    Wf, Hinv, _, _ = prepare_hessian(H, W.clone().float(), percdamp)
    del H
    nm = n is not None
    bs = max(m, blocksize // m * m) if nm else blocksize
    keep = torch.ones(rows, cols, dtype=torch.bool)
    block_counts = None
    if not nm:
        starts = list(range(0, cols, bs))
        block_counts = split_counts(fraction, [rows * (min(s + bs, cols) - s) for s in starts])
    for b, i1 in enumerate(range(0, cols, bs)):
        i2 = min(i1 + bs, cols)
        W1 = Wf[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if not nm:  # one joint choice over every row of the block
            sal = (W1 ** 2 / d.view(1, -1) ** 2).flatten()
            order = torch.sort(sal, stable=True).indices[:block_counts[b]]
            pruned.view(-1)[order] = True
        for i in range(i2 - i1):
            if nm and i % m == 0:
                sal = W1[:, i:i + m] ** 2 / d[i:i + m].view(1, -1) ** 2
                pruned[:, i:i + m] = ~nm_keep(sal, n, m)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wf[:, i1:i2] = Q1
        Wf[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~pruned
    return Wf.to(W.dtype), keep

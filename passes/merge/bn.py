"""BatchNorm statistics after a weight-space merge: averaged weights make stored running
statistics wrong, so they are re-estimated on data (cumulative average, deterministic)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_bn_stats(model: nn.Module, batches: Iterable, num_batches: int = 100,
                       reset: bool = True) -> int:
    """Forward up to `num_batches` batches with only the BatchNorm layers in train mode and
    momentum=None (exact running average). Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        if reset:
            m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    with torch.no_grad():
        for x in batches:
            if used >= num_batches:
                break
            model(*x) if isinstance(x, (tuple, list)) else model(x)
            used += 1
    for m, mom in saved:
        m.momentum = mom
    model.train(was)
    return used

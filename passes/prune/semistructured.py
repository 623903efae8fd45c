"""Convert 2:4 fp16/bf16 SparseLinear weights to ``torch.sparse.to_sparse_semi_structured``
(ops.md §7.3) for GPU inference. Needs CUDA with compute capability >= 8.0; elsewhere it converts
nothing and says why."""

from __future__ import annotations

import torch
import torch.nn as nn

from .sparse_linear import SparseLinear


def semi_structured_reason(mod: SparseLinear) -> str | None:
    """Why ``mod`` cannot be converted, or None."""
    if (mod.n, mod.m) != (2, 4):
        return "not 2:4"
    if mod.weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {mod.weight.dtype} (needs float16 or bfloat16)"
    if not mod.weight.is_cuda:
        return "not on a CUDA device"
    if torch.cuda.get_device_capability(mod.weight.device) < (8, 0):
        return "GPU compute capability below 8.0"
    if mod.out_features % 32 or mod.in_features % 64:
        return f"shape ({mod.out_features}, {mod.in_features}) is not a multiple of (32, 64)"
    return None


def to_semi_structured(model: nn.Module) -> dict[str, str]:
    """Convert every eligible 2:4 SparseLinear in place (inference only). Returns
    ``{path: "converted" | reason skipped}``."""
    from torch.sparse import to_sparse_semi_structured

    out = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, SparseLinear):
            continue
        reason = semi_structured_reason(mod)
        if reason is None:
            w = mod.weight.detach().contiguous()
            mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            reason = "converted"
        out[path] = reason
    return out

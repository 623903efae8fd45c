"""``SparseLinear`` <-> a plain Linear: the dense weight (exact zeros where pruned) + the mask.

A pruned layer computes ``F.linear(x, weight, bias)`` with zeros in ``weight``, so a plain
``nn.Linear`` holding the same tensor is the same function. The mask is surgery-only state (later
passes respect it; it can keep a slot whose weight happens to be 0), so it goes to the extras,
bit-packed (one bit per weight, rows padded to whole bytes). compressed-tensors removed its
``sparse-24-bitmask`` format after 0.14, so 2:4 layers are stored dense here too.

A layer still in sparse *training* (a schedule recomputes its mask every forward) is not a plain
Linear: :func:`refusal` says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn


def refusal(module: nn.Module) -> str | None:
    if module.training_config is not None:
        return ("a sparse-training schedule is still attached (the mask is recomputed every "
                "forward); finish training first")
    return None


def to_dense(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weight = module.weight.detach()
    out = {"weight": weight}
    if module.bias is not None:
        out["bias"] = module.bias.detach()
    mask = module.weight_mask.detach().to(torch.bool).cpu().numpy()
    bits = torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little"))
    return out, {"weight_mask_bits": bits}


def from_dense(config: dict[str, Any], tensors: dict[str, torch.Tensor],
               extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state SparseLinear loads (dense weight + bool mask; it re-packs N:M itself)."""
    bits = extras["weight_mask_bits"].numpy()
    mask = np.unpackbits(bits, axis=-1, count=config["in_features"], bitorder="little")
    out = {"weight": tensors["weight"], "weight_mask": torch.from_numpy(mask.astype(bool))}
    if "bias" in tensors:
        out["bias"] = tensors["bias"]
    return out

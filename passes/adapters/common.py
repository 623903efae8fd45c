"""Helpers shared by the adapter passes: which layers can carry an adapter, freezing, seeding."""

from __future__ import annotations

import torch.nn as nn

from surgery.passapi import State
from surgery.passes.adapters.layers import (AdapterLayer, adapter_dtype,  # noqa: F401 - re-exported
                                           float_weight)
from surgery.seeding import name_generator

# States an `adapt` target may already carry. An adapter only calls base(x) (LoRA, Bone), so a
# pruned, quantized, merged or lowered base is fine; a second adapter on the same layer is not.
ADAPT_ACCEPTS = frozenset({State.MASKED, State.QUANTIZED, State.MERGED, State.SWAPPED,
                           State.LOWERED})
ADAPT_REFUSALS = {State.ADAPTED: "the layer already has an adapter; `merge adapters` first"}


def is_linear_like(module: nn.Module) -> bool:
    """A layer y = x W^T + b with known in/out features (nn.Linear or a packed QuantLinear)."""
    if isinstance(module, AdapterLayer):
        return False
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


def unsupported_reason(method: str, module: nn.Module) -> str | None:
    """Why ``method`` cannot adapt ``module`` (None when it can)."""
    if isinstance(module, AdapterLayer):
        return "the layer already has an adapter; `merge adapters` first"
    if not is_linear_like(module):
        return (f"{type(module).__name__} has no {method} adapter implementation "
                f"({method} adapts Linear layers, float or quantized)")
    return None


def generator_for(seed: int, path: str) -> "torch.Generator":
    """A per-layer generator, so one layer's init does not depend on which others were selected."""
    return name_generator(seed, path)


def freeze_all_but_adapters(model: nn.Module) -> tuple[int, int]:
    """Make exactly the adapter parameters trainable. Returns (trainable, total) parameter counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            for p in m.adapter_parameters():
                p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

"""Helpers shared by the adapter passes: which layers can carry an adapter, freezing, seeding."""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn

from surgery.passapi import State, register_state

# States an `adapt` target may already carry. An adapter only calls base(x) (LoRA, Bone), so a
# pruned, quantized, merged or lowered base is fine; a second adapter on the same layer is not.
ADAPT_ACCEPTS = frozenset({State.MASKED, State.QUANTIZED, State.MERGED, State.SWAPPED,
                           State.LOWERED})
ADAPT_REFUSALS = {State.ADAPTED: "the layer already has an adapter; `merge adapters` first"}


def _adapted(module: nn.Module) -> bool:
    from surgery.passes.adapters.layers import AdapterLayer

    return isinstance(module, AdapterLayer)


register_state(State.ADAPTED, _adapted)


def is_linear_like(module: nn.Module) -> bool:
    """A layer y = x W^T + b with known in/out features (nn.Linear or a packed QuantLinear)."""
    from surgery.passes.adapters.layers import AdapterLayer

    if isinstance(module, AdapterLayer):
        return False
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


def unsupported_reason(method: str, module: nn.Module) -> str | None:
    """Why ``method`` cannot adapt ``module`` (None when it can)."""
    from surgery.passes.adapters.layers import AdapterLayer

    if isinstance(module, AdapterLayer):
        return "the layer already has an adapter; `merge adapters` first"
    if not is_linear_like(module):
        return (f"{type(module).__name__} has no {method} adapter implementation "
                f"({method} adapts Linear layers, float or quantized)")
    return None


def float_weight(module: nn.Module) -> torch.Tensor | None:
    """The base layer's float weight, or None when it is packed (quantized) or absent."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2:
        return w
    return None


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in the base's float dtype, or float32 when the base is packed."""
    w = float_weight(base)
    return w.dtype if w is not None else torch.float32


def generator_for(seed: int, path: str) -> torch.Generator:
    """A per-layer generator, so one layer's init does not depend on which others were selected."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63))


def freeze_all_but_adapters(model: nn.Module) -> tuple[int, int]:
    """Make exactly the adapter parameters trainable. Returns (trainable, total) parameter counts."""
    from surgery.passes.adapters.layers import AdapterLayer

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            for p in m.adapter_parameters():
                p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

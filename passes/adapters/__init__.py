"""Adapters: `adapt SEL with lora(...)|bone(...)`, `merge adapters [in SEL]`.

Python API: :func:`merge_adapters`, :func:`unmerge`, :func:`adapter_layers`,
:func:`trainable_parameters`.
"""

import torch.nn as nn

from surgery.passes.adapters import bone, lora, merge  # noqa: F401  (registers the passes)
from surgery.passes.adapters.layers import AdapterLayer, BoneLinear, LoraLinear
from surgery.passes.adapters.merge import merge_adapters, unmerge


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter wrapper in ``model`` by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["AdapterLayer", "BoneLinear", "LoraLinear", "adapter_layers", "merge_adapters",
           "trainable_parameters", "unmerge"]

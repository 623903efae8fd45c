"""``CompensatedLinear``: a compressed layer plus the low-rank path that cancels its error.

``y = base(x) + B (A x)`` with ``base`` the compressed layer (a ``QuantLinear`` or a pruned
``SparseLinear``), ``A`` (r, in) and ``B`` (out, r) from `compensate` (passes/compensate/lowrank.py).
Structurally it is a LoRA adapter with scaling 1 (``alpha = r``), so everything that reads LoRA
layers reads it unchanged: `export peft` writes it as a LoRA adapter on the compressed base, a
fine-tune trains ``A`` and ``B`` from the compensation (the EoRA paper's proposal), `save` /
`surgery.load` rebuild it with its base. It carries the ``compensated`` state on top of
``adapted``; ``method`` records which projection produced it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from surgery.passes.adapters.layers import LoraLinear, _plain_base
from surgery.registry import register_module_type


@register_module_type
class CompensatedLinear(LoraLinear):
    kind = "lora"  # PEFT sees a LoRA adapter

    def __init__(self, base_layer: nn.Module, r: int, method: str = "eora"):
        super().__init__(base_layer, r, alpha=float(r))
        self.method = method

    @classmethod
    def from_factors(cls, base_layer: nn.Module, B: torch.Tensor, A: torch.Tensor,
                     method: str) -> "CompensatedLinear":
        layer = cls(base_layer, int(A.shape[0]), method)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A.to(layer.lora_A.weight.dtype))
            layer.lora_B.weight.copy_(B.to(layer.lora_B.weight.dtype))
        return layer

    def surgery_config(self) -> dict[str, Any]:
        return {**super().surgery_config(), "method": self.method}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "CompensatedLinear":
        return cls(_plain_base(cfg), cfg["r"], cfg.get("method", "eora"))

    def extra_repr(self) -> str:
        return f"{self.method}, r={self.r}"

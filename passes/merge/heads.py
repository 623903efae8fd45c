"""Separate classifier heads for models with different label spaces: the merged backbone feeds
both original heads and their logits are concatenated ([model 1 classes | model 2 classes])."""

from __future__ import annotations

import torch
import torch.nn as nn

from surgery.registry import register_module_type


@register_module_type
class ConcatHeads(nn.Module):
    def __init__(self, head1: nn.Linear, head2: nn.Linear):
        super().__init__()
        self.head1, self.head2 = head1, head2

    def forward(self, x):
        return torch.cat([self.head1(x), self.head2(x)], dim=-1)

    def surgery_config(self) -> dict:
        return {"in_features": self.head1.in_features, "out1": self.head1.out_features,
                "out2": self.head2.out_features, "bias1": self.head1.bias is not None,
                "bias2": self.head2.bias is not None}

    @classmethod
    def from_surgery_config(cls, cfg: dict) -> "ConcatHeads":
        return cls(nn.Linear(cfg["in_features"], cfg["out1"], bias=cfg["bias1"]),
                   nn.Linear(cfg["in_features"], cfg["out2"], bias=cfg["bias2"]))

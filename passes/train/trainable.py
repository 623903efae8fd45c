"""What a `train` target contributes to the optimizer, decided by the module's state.

- an adapter wrapper (ADAPTED): its adapter matrices only; the base layer, float, pruned or
  quantized, stays frozen (QLoRA);
- a pruned layer (MASKED) prepared for sparse training (`prune ... training=mdgf(...)`): its
  dense weight, whose effective mask the MDGF/SDGF/SR-STE schedule recomputes every forward;
  it is finalised to the exact N:M mask after the last step;
- a pruned layer without a schedule: its kept weights; gradients are masked and the pruned
  positions stay exactly zero;
- any other selected layer (dense Linear, embedding, norm): all its parameters.
A quantized layer is never a target on its own: the state rules of the pass refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from surgery.passes.adapters.layers import AdapterLayer
from surgery.passes.prune.sparse_linear import SparseLinear


@dataclass
class Trainable:
    params: list[nn.Parameter] = field(default_factory=list)  # in model order, each once
    names: list[str] = field(default_factory=list)
    fixed_masks: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    scheduled: list[str] = field(default_factory=list)  # SparseLinear paths with a schedule
    kinds: dict[str, str] = field(default_factory=dict)  # path -> what is trained there

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.params)


def is_train_leaf(module: nn.Module) -> bool:
    """A unit `train` acts on: an adapter wrapper, a linear-like layer, or a module holding
    parameters of its own (embedding, norm)."""
    if isinstance(module, AdapterLayer):
        return True
    if isinstance(getattr(module, "in_features", None), int):
        return True
    return any(p is not None for p in module._parameters.values())


def _own(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
    if isinstance(module, AdapterLayer):
        wanted = {id(p) for p in module.adapter_parameters()}
        return [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if id(p) in wanted]
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]


def collect(model: nn.Module, targets: dict[str, nn.Module]) -> Trainable:
    """The parameters the targets train, in the model's parameter order (so the optimizer state
    and checkpoints do not depend on how the selector listed them)."""
    chosen: dict[int, str] = {}
    out = Trainable()
    for path, mod in targets.items():
        for name, p in _own(mod, path):
            chosen.setdefault(id(p), name)
        if isinstance(mod, SparseLinear):
            if mod.training_config is not None:
                out.scheduled.append(path)
                out.kinds[path] = f"sparse training ({mod.training_config.method})"
            else:
                out.fixed_masks.append((mod.weight, mod.weight_mask))
                out.kinds[path] = "kept weights (fixed mask)"
        elif isinstance(mod, AdapterLayer):
            out.kinds[path] = f"{mod.kind} adapter"
        else:
            out.kinds[path] = "all parameters"
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in chosen and id(p) not in seen:
            seen.add(id(p))
            out.params.append(p)
            out.names.append(name)
    return out


def freeze_except(model: nn.Module, train: Trainable) -> dict[int, bool]:
    """Make exactly ``train.params`` require grad; returns the previous flags to restore."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train.params:
        p.requires_grad_(True)
    return before


def restore_flags(model: nn.Module, before: dict[int, bool]) -> None:
    for p in model.parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])


def mask_gradients(train: Trainable) -> None:
    """Pruned positions of a fixed-mask layer get no gradient (so AdamW never moves them)."""
    for p, keep in train.fixed_masks:
        if p.grad is not None:
            p.grad.mul_(keep)


def reapply_masks(train: Trainable) -> None:
    """Pruned positions are exactly zero after every step (weight decay cannot move a zero,
    but the invariant is cheap to enforce rather than argue)."""
    with torch.no_grad():
        for p, keep in train.fixed_masks:
            p.masked_fill_(~keep, 0)

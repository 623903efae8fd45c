"""SparseLinear: an nn.Linear that keeps its sparsity mask as state.

- ``weight_mask`` (bool buffer, True = kept) is the explicit mask later passes must respect; the
  weight itself holds exact zeros at pruned positions (so the forward is a plain ``F.linear`` and
  anything that reads ``.weight``, ONNX export included, sees the sparse weight).
- ``n``/``m`` record an N:M pattern (None for unstructured). An N:M layer saves compactly: its
  state dict holds ``weight_values`` + ``weight_indices`` (see compact.py) instead of the dense
  weight and mask, and loads either form.
- With a ``training`` schedule (MDGF/SDGF/SR-STE) the weight stays dense and the mask is
  recomputed every forward; :func:`finalize_sparse_training` bakes the final N:M mask in.
It subclasses nn.Linear so passes that select Linears (quantize, adapt) still find it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.registry import register_module_type

from .compact import MAX_M, pack_nm, unpack_nm
from .masks import is_nm, nm_keep
from .training import TrainingConfig, effective_weight, phase_at


@register_module_type
class SparseLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 n: int | None = None, m: int | None = None,
                 training: TrainingConfig | dict | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.n, self.m = n, m
        self.register_buffer("weight_mask", torch.ones(out_features, in_features,
                                                       dtype=torch.bool, device=device))
        self.training_config = (TrainingConfig(**training) if isinstance(training, dict)
                                else training)
        if self.training_config is not None:
            self.register_buffer("sparse_step", torch.zeros((), dtype=torch.int64, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear, keep: torch.Tensor, *, n: int | None, m: int | None,
                    training: TrainingConfig | None = None) -> "SparseLinear":
        """Wrap ``lin`` sharing its Parameter objects (optimizers and ties stay valid)."""
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, n=n, m=m,
                  training=training, device="meta")
        new.weight = lin.weight
        new.bias = lin.bias
        dev = lin.weight.device
        new.weight_mask = keep.to(device=dev, dtype=torch.bool)
        if training is not None:
            new.sparse_step = torch.zeros((), dtype=torch.int64, device=dev)
        new.train(lin.training)
        return new

    # -- rebuild by surgery.load ------------------------------------------------------------
    def surgery_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "n": self.n, "m": self.m,
                "dtype": str(self.weight.dtype).removeprefix("torch."),
                "training": (self.training_config.model_dump()
                             if self.training_config is not None else None)}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "SparseLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["bias"], n=cfg["n"], m=cfg["m"],
                   training=cfg.get("training"), dtype=getattr(torch, cfg.get("dtype", "float32")))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training_config is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self._training_weight(), self.bias)

    def _training_weight(self) -> torch.Tensor:
        cfg = self.training_config
        if not self.training:  # evaluation sees the final binary N:M mask
            with torch.no_grad():
                self.weight_mask.copy_(nm_keep(self.weight.abs(), self.n, self.m))
            return self.weight * self.weight_mask
        phase = phase_at(cfg, self.n, self.m, int(self.sparse_step))
        self.sparse_step += 1
        return effective_weight(self.weight, phase, cfg,
                                lambda w, n, m: nm_keep(w.abs(), n, m))

    def extra_repr(self) -> str:
        pattern = f"{self.n}:{self.m}" if self.n else f"{self.sparsity():.1%}"
        extra = f", training={self.training_config.method}" if self.training_config else ""
        return super().extra_repr() + f", sparsity={pattern}{extra}"

    def sparsity(self) -> float:
        return 1.0 - float(self.weight_mask.float().mean())

    # -- compact state dict ----------------------------------------------------------------------
    def compact(self) -> bool:
        """True when this layer saves as values + indices (N:M, mask baked into the weight)."""
        if self.n is None or self.m is None or self.m > MAX_M or self.training_config is not None:
            return False
        if self.weight.is_meta or not is_nm(self.weight_mask, self.n, self.m):
            return False
        return not bool((self.weight.detach()[~self.weight_mask] != 0).any())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.compact():
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        values, indices = pack_nm(self.weight.detach(), self.weight_mask, self.n, self.m)
        destination[prefix + "weight_values"] = values
        destination[prefix + "weight_indices"] = indices
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        vk, ik = prefix + "weight_values", prefix + "weight_indices"
        if vk in state_dict and ik in state_dict:
            w, keep = unpack_nm(state_dict.pop(vk), state_dict.pop(ik), self.n, self.m,
                                self.in_features)
            state_dict[prefix + "weight"] = w
            state_dict[prefix + "weight_mask"] = keep
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def finalize_sparse_training(model: nn.Module) -> int:
    """Bake the final N:M mask into every SparseLinear that has a training schedule and drop the
    schedule (the layer becomes an inference SparseLinear that saves compactly). Returns the count."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear) and mod.training_config is not None:
            finalize_layer(mod)
            count += 1
    return count


def finalize_layer(mod: SparseLinear) -> None:
    """Bake the final N:M mask into one sparse-training layer and drop its schedule."""
    with torch.no_grad():
        keep = nm_keep(mod.weight.abs(), mod.n, mod.m)
        mod.weight.mul_(keep)
        mod.weight_mask.copy_(keep)
    mod.training_config = None
    del mod._buffers["sparse_step"]


def set_training_step(model: nn.Module, step: int) -> None:
    """Set the schedule step of every sparse-training layer (e.g. when resuming, or with gradient
    accumulation, where several forwards make one optimizer step)."""
    for mod in model.modules():
        if isinstance(mod, SparseLinear) and mod.training_config is not None:
            mod.sparse_step.fill_(step)


def check_masks(model: nn.Module) -> list[str]:
    """Paths of SparseLinears whose weight is non-zero outside the mask (training layers skip)."""
    bad = []
    for path, mod in model.named_modules():
        if isinstance(mod, SparseLinear) and mod.training_config is None:
            if bool((mod.weight.detach()[~mod.weight_mask] != 0).any()):
                bad.append(path)
    return bad

"""Adapter wrappers: LoRA and Bone modules that hold the original layer as ``base_layer``.

Both follow PEFT's math exactly (same operation order), so an exported adapter reproduces our
outputs in PEFT. The base layer may be any linear-like module (nn.Linear, a pruned Linear, a
packed QuantLinear): LoRA and Bone's default variant only call ``base_layer(x)``; Bone's ``bat``
variant rebuilds the weight each forward and therefore needs a float base weight.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgery.passapi import module_device
from surgery.registry import register_module_type

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain_base(cfg: dict[str, Any]) -> nn.Module:
    """An uninitialised nn.Linear of the recorded shape; the loader fills it (or swaps in the
    recorded inner module, e.g. a QuantLinear, which is re-inserted after this outer one)."""
    return nn.utils.skip_init(nn.Linear, cfg["in_features"], cfg["out_features"],
                              bias=cfg["base_bias"], dtype=_DTYPES[cfg["dtype"]])


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


class AdapterLayer(nn.Module):
    """Common interface of adapter wrappers (used by freezing, merging and PEFT export)."""

    kind: ClassVar[str]

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)

    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W with the adapter folded in (computed in fp32, returned in W's dtype)."""
        raise NotImplementedError

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merged_weight`."""
        raise NotImplementedError

    def _base_config(self) -> dict[str, Any]:
        bias = getattr(self.base_layer, "bias", None)
        return {"in_features": self.in_features, "out_features": self.out_features,
                "base_bias": isinstance(bias, torch.Tensor),
                "dtype": _dtype_name(self.adapter_dtype)}

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.adapter_parameters()[0].dtype


@register_module_type
class LoraLinear(AdapterLayer):
    """y = base(x) + B(A(dropout(x))) * scaling, scaling = alpha/r (alpha/sqrt(r) with rslora)."""

    kind = "lora"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__(base_layer)
        if r < 1:
            raise ValueError("r must be >= 1")
        self.r, self.alpha, self.dropout_p, self.rslora = int(r), float(alpha), float(dropout), rslora
        self.scaling = self.alpha / (math.sqrt(self.r) if rslora else self.r)
        dtype, device = adapter_dtype(base_layer), module_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            self.lora_B.weight.zero_()

    def init_a(self, how: str, generator: torch.Generator, a: torch.Tensor | None = None) -> None:
        """PEFT's inits: 'default' = kaiming_uniform(a=sqrt(5)), 'gaussian' = N(0, 1/r^2),
        'given' copies ``a`` (EVA components). B stays zero, so the output is unchanged."""
        w = self.lora_A.weight
        with torch.no_grad():
            if how == "default":
                cpu = torch.empty(w.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
                w.copy_(cpu)
            elif how == "gaussian":
                w.copy_(torch.randn(w.shape, generator=generator) / self.r)
            elif how == "given":
                w.copy_(a.to(w.dtype))
            else:
                raise ValueError(f"unknown LoRA init {how!r}")
            self.lora_B.weight.zero_()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        result = result + self.lora_B(self.lora_A(h)) * self.scaling
        return result.to(out_dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() + self.delta_weight()).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() - self.delta_weight()).to(weight.dtype)

    def surgery_config(self) -> dict[str, Any]:
        return {**self._base_config(), "r": self.r, "alpha": self.alpha,
                "dropout": self.dropout_p, "rslora": self.rslora}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "LoraLinear":
        return cls(_plain_base(cfg), cfg["r"], cfg["alpha"], cfg["dropout"], cfg["rslora"])

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


@register_module_type
class BoneLinear(AdapterLayer):
    """Bone (PEFT's MiSS). ``bone``: one (block, out) matrix B added to every input block of W,
    i.e. y = base(x) + sum_c(x_c) @ B. ``bat``: per output block a (block, block) matrix B_a with
    W'_{a,c} = W_{a,c} (I + B_a) + B_a, the weight rebuilt every forward."""

    kind = "bone"

    def __init__(self, base_layer: nn.Module, block: int, variant: str = "bone",
                 dropout: float = 0.0):
        super().__init__(base_layer)
        self.block, self.variant, self.dropout_p = int(block), variant, float(dropout)
        dtype, device = adapter_dtype(base_layer), module_device(base_layer)
        if variant not in ("bone", "bat"):
            raise ValueError(f"unknown Bone variant {variant!r}")
        if self.in_features % self.block or (variant == "bat" and self.out_features % self.block):
            raise ValueError(f"{variant} block {block} must divide in_features {self.in_features}"
                             + (f" and out_features {self.out_features}" if variant == "bat" else ""))
        if variant == "bone":
            shape = (self.block, self.out_features)
        else:
            shape = (self.out_features // self.block, self.block, self.block)
        self.bone_block = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.bone_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.bone_block]

    # -- bat: W' = W + (W_blocks @ B + B); PEFT's reshape order, for bit-level parity
    def _bat_full(self, weight: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        b = self.bone_block.float()
        r, (out, inn) = self.block, weight.shape
        w = weight.float().reshape(out // r, r, inn // r, r).permute(2, 0, 1, 3)
        if reverse:
            eye = torch.eye(r, dtype=torch.float32, device=b.device)
            res = (w - b) @ torch.inverse(eye + b)
        else:
            res = w @ b + b
        return res.permute(1, 2, 0, 3).reshape(out, inn)

    def _bone_tiles(self) -> torch.Tensor:
        """B^T tiled along the input dim: the (out, in) matrix that `bone` adds to W."""
        return self.bone_block.float().t().repeat(1, self.in_features // self.block)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.variant == "bat":
            w = float_weight(self.base_layer)
            if w is None:
                raise RuntimeError("Bone bat needs a float base weight")
            w = w + self._bat_full(w).to(w.dtype)
            bias = getattr(self.base_layer, "bias", None)
            out = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
            return out.to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype, r = result.dtype, self.block
        h = self.bone_dropout(x.to(self.bone_block.dtype))
        result = result + h.reshape(*h.shape[:-1], h.shape[-1] // r, r).sum(dim=-2) @ self.bone_block
        return result.to(out_dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.variant == "bat":
            return (weight.float() + self._bat_full(weight)).to(weight.dtype)
        return (weight.float() + self._bone_tiles()).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.variant == "bat":
            return self._bat_full(weight, reverse=True).to(weight.dtype)
        return (weight.float() - self._bone_tiles()).to(weight.dtype)

    def surgery_config(self) -> dict[str, Any]:
        return {**self._base_config(), "block": self.block, "variant": self.variant,
                "dropout": self.dropout_p}

    @classmethod
    def from_surgery_config(cls, cfg: dict[str, Any]) -> "BoneLinear":
        return cls(_plain_base(cfg), cfg["block"], cfg["variant"], cfg["dropout"])

    def extra_repr(self) -> str:
        return f"block={self.block}, variant={self.variant}"

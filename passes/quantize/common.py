"""What every quantisation method shares: the format parameters, states, plan-time checks, the
mask of an already-pruned layer, and the step report."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import field_validator, model_validator

from surgery.passapi import (Granularity, ModulePass, PassError, PassParams, PassResult,
                             ShapeProblem, State, StepReport, register_state, replace_module)
from surgery.passes.quantize.formats import ClipSearch, Format
from surgery.passes.quantize.qlinear import QuantLinear


class QuantParams(PassParams):
    format: Literal["int2", "int3", "int4", "int5", "int6", "int7", "int8"]
    group: int | None = None  # input columns per scale; None = per output channel
    symmetric: bool | None = None  # None = true for int8, false for int2..int7
    clip: bool = False  # grid-search a clipping ratio per group (minimises weight MSE)
    clip_grid: int = 20  # number of shrink steps tried
    clip_min: float = 0.5  # smallest clipping ratio tried

    @field_validator("group")
    @classmethod
    def _group(cls, v):
        if v is not None and v < 2:
            raise ValueError("group must be at least 2 (omit it for per-channel scales)")
        return v

    @field_validator("clip_grid")
    @classmethod
    def _grid(cls, v):
        if v < 1:
            raise ValueError("clip_grid must be >= 1")
        return v

    @field_validator("clip_min")
    @classmethod
    def _cmin(cls, v):
        if not 0.0 < v < 1.0:
            raise ValueError("clip_min must be in (0, 1)")
        return v

    @property
    def bits(self) -> int:
        return int(self.format.removeprefix("int"))

    @property
    def is_symmetric(self) -> bool:
        return self.format == "int8" if self.symmetric is None else self.symmetric

    def fmt(self) -> Format:
        return Format(self.bits, self.is_symmetric)

    def clip_search(self) -> ClipSearch | None:
        return ClipSearch(self.clip_grid, self.clip_min) if self.clip else None

    def group_for(self, in_features: int) -> int:
        return in_features if self.group is None else self.group


def valid_groups(n: int) -> list[int]:
    """Practical group sizes for ``n`` input features (divisors that are multiples of 8)."""
    divs = [d for d in range(2, n + 1) if n % d == 0]
    nice = [d for d in divs if d % 8 == 0]
    return nice or divs


register_state(State.QUANTIZED, lambda m: isinstance(m, QuantLinear))


class QuantizePass(ModulePass):
    """Base of `quantize` methods: states, leaf types, the divisibility check, the structure."""

    verb = "quantize"
    statement_fields = frozenset({"format"})
    permuted: ClassVar[bool] = False  # the layers keep a column permutation (GPTQ act_order)
    leaf_types: ClassVar[tuple[type, ...]] = (nn.Linear, QuantLinear)
    accepts = frozenset({State.MASKED, State.MERGED, State.SWAPPED})
    produces = frozenset({State.QUANTIZED})
    refusals = {
        State.QUANTIZED: "already quantized",
        State.ADAPTED: "an adapter is attached; quantize the base layer before `adapt`, "
                       "or `merge adapters` first",
        State.LOWERED: "already lowered to backend kernels; quantize before `lower`",
    }

    def check_module(self, path: str, module: nn.Module) -> str | None:
        if isinstance(module, QuantLinear):
            return f"already quantized (int{module.bits})"
        p = self.params
        if p.group is not None and module.in_features % p.group:
            groups = ", ".join(map(str, valid_groups(module.in_features)))
            return ShapeProblem(f"group {p.group} does not divide in_features "
                                f"{module.in_features} (valid groups: {groups}; or omit group "
                                "for per-channel)")
        return None

    def quant_config(self, module: nn.Module) -> dict[str, Any]:
        """The `QuantLinear.surgery_config` this pass gives ``module``."""
        p = self.params
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bits": p.bits, "group": p.group_for(module.in_features),
                "symmetric": p.is_symmetric, "bias": module.bias is not None,
                "permuted": self.permuted,
                "dtype": str(module.weight.dtype).removeprefix("torch.")}

    def rewrite_skeleton(self, model, targets, models):
        with torch.device("meta"):
            for path, mod in targets.items():
                replace_module(model, path, QuantLinear.from_surgery_config(self.quant_config(mod)))
        return model

    def ensures(self, model: nn.Module, targets, result: PassResult) -> None:
        p = self.params
        for path, before in targets.items():
            q = model.get_submodule(path)
            if (q.bits, q.group, q.symmetric) != (p.bits, p.group_for(before.in_features),
                                                  p.is_symmetric):
                raise PassError(f"internal: `{path}` was quantized as int{q.bits}/group {q.group}"
                                f", not as asked", module=path)

    def estimate_memory(self, modules: dict[str, nn.Module]) -> int:
        # One float32 copy of the largest weight while it is being quantised.
        return max((m.weight.numel() * 4 for m in modules.values() if hasattr(m, "weight")),
                   default=0)


def existing_mask(module: nn.Module) -> torch.Tensor | None:
    """The sparsity mask of a pruned layer (a bool/0-1 ``weight_mask`` buffer), if any."""
    mask = getattr(module, "weight_mask", None)
    if isinstance(mask, torch.Tensor) and mask.shape == module.weight.shape:
        return mask.to(torch.bool)
    return None


def float_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def build_report(results: dict[str, dict[str, Any]], before: int, after: int,
                 params: QuantParams, extra: dict[str, Any] | None = None) -> StepReport:
    n_params = sum(r["parameters"] for r in results.values())
    metrics = {
        "format": params.format,
        "group": params.group or "per-channel",
        "symmetric": params.is_symmetric,
        "bytes_before": before,
        "bytes_after": after,
        "compression": round(before / after, 3) if after else None,
    }
    errs = [r["rel_error"] for r in results.values() if "rel_error" in r]
    if errs:
        metrics["mean_rel_weight_error"] = float(sum(errs) / len(errs))
    metrics.update(extra or {})
    return StepReport(modules=len(results), parameters=n_params, metrics=metrics,
                      per_module=results)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat||_F / ||w||_F (0 for an all-zero weight)."""
    denom = float(w.float().norm())
    return float((w.float() - w_hat.float()).norm()) / denom if denom else 0.0


def to_quantlinear(module: nn.Linear, codes: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, fmt: Format,
                   perm: torch.Tensor | None = None) -> QuantLinear:
    """The QuantLinear replacing ``module`` from its integer codes (every quantize method):
    the float layer's bias and dtype carry over."""
    return QuantLinear.from_codes(codes, scale, zero, bits=fmt.bits, bias=module.bias,
                                  perm=perm, dtype=module.weight.dtype)

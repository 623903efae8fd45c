"""`adapt SEL with bone(block=64, variant=bone|bat, dropout=0)`: Bone / PEFT MiSS adapters."""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from surgery.passapi import (Granularity, ModulePass, PassParams, PassResult, RunContext,
                             ShapeProblem, State, StepReport, replace_module)
from surgery.passes.adapters.common import (ADAPT_ACCEPTS, ADAPT_REFUSALS, float_weight,
                                            freeze_all_but_adapters, is_linear_like,
                                            unsupported_reason)
from surgery.passes.adapters.layers import BoneLinear
from surgery.registry import register

BAT_ON_QUANTIZED = ("Bone bat rebuilds the float weight every forward; a quantized base has none "
                    "(use variant=bone)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class BoneParams(PassParams):
    block: int = Field(64, ge=1, description="block size r (PEFT's r)")
    variant: Literal["bone", "bat"] = "bone"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input (MiSS)")


@register
class Bone(ModulePass):
    verb = "adapt"
    method = "bone"
    summary = "Bone / MiSS block adapters: `bone` (shared block added to W) or `bat` (block affine)"
    Params = BoneParams
    leaf_types = (nn.Linear,)
    accepts = ADAPT_ACCEPTS
    produces = frozenset({State.ADAPTED})
    refusals = ADAPT_REFUSALS
    granularity = Granularity.TENSOR

    def __init__(self, params: BoneParams):
        super().__init__(params)
        if params.variant == "bat":  # bat needs a float weight: refuse quantized bases
            self.accepts = ADAPT_ACCEPTS - {State.QUANTIZED}
            self.refusals = {**ADAPT_REFUSALS, State.QUANTIZED: BAT_ON_QUANTIZED}

    def is_leaf(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def check_module(self, path: str, module: nn.Module) -> str | None:
        reason = unsupported_reason("bone", module)
        if reason:
            return reason
        r, fin, fout = self.params.block, module.in_features, module.out_features
        bat = self.params.variant == "bat"
        if fin % r or (bat and fout % r):
            # PEFT's MiSS would zero-pad a partial last block; we refuse it: the padded block
            # trains fewer effective weights than the budget the user asked for.
            bad, size = ("in_features", fin) if fin % r else ("out_features", fout)
            fits = [d for d in _divisors(fin) if d > 1 and (not bat or fout % d == 0)]
            return ShapeProblem(f"{self.params.variant} block {r} does not divide {bad} {size} "
                                f"(layer is {fout}x{fin}; blocks that fit: "
                                f"{', '.join(map(str, fits[-8:])) or 'none'})")
        if bat and float_weight(module) is None:
            return BAT_ON_QUANTIZED
        return None

    def rewrite_skeleton(self, model, targets, models):
        p = self.params
        for path, base in targets.items():
            replace_module(model, path, BoneLinear(base, p.block, p.variant, p.dropout))
        return model

    def apply(self, ctx: RunContext, modules: dict[str, nn.Module]) -> PassResult:
        p = self.params
        report = StepReport(modules=len(modules))
        with ctx.progress.task("Bone", total=len(modules)) as task:
            for path, base in modules.items():
                layer = BoneLinear(base, p.block, p.variant, p.dropout)
                replace_module(ctx.model, path, layer)
                n = layer.bone_block.numel()
                report.parameters += n
                report.per_module[path] = {"block": p.block, "variant": p.variant, "parameters": n}
                task.advance()
        trainable, total = freeze_all_but_adapters(ctx.model)
        report.metrics.update({"adapters": len(modules), "trainable_parameters": trainable,
                               "total_parameters": total,
                               "trainable_percent": round(100.0 * trainable / max(total, 1), 4)})
        report.notes.append(f"{trainable:,} trainable parameters ({100.0 * trainable / max(total, 1):.3f} %"
                            f" of {total:,}); everything else is frozen")
        return self.result(ctx, report)
